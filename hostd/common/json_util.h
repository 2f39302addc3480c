// Accessors for JSON that came from a peer: they never throw.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

#include "result.h"

namespace kvmx {

// What JSON from a peer (QMP, an API client, the journal) may cost.
// nlohmann::json copies, compares and dumps recursively, so the nesting
// depth bounds stack use; the number of values bounds the memory of the
// parsed document (tens of bytes each, whatever the text's size).
struct JsonLimits {
  size_t max_depth = 64;
  size_t max_values = 1 << 20;
};
constexpr size_t kMaxJsonDepth = 64;

// Parses `text` after checking depth and value count on the text itself
// (nothing is built for input over a limit).  Error codes: "json-too-deep",
// "json-too-many-values", "json-parse".
Result<nlohmann::json> parse_json(std::string_view text,
                                  const JsonLimits& limits = {});

inline const nlohmann::json* json_field(const nlohmann::json& obj,
                                        std::string_view key) {
  if (!obj.is_object()) return nullptr;
  auto it = obj.find(key);
  return it == obj.end() ? nullptr : &*it;
}

inline std::optional<std::string> json_string(const nlohmann::json& obj,
                                              std::string_view key) {
  auto* v = json_field(obj, key);
  if (!v || !v->is_string()) return std::nullopt;
  return v->get<std::string>();
}

// A non-negative integer (parsed text gives "unsigned", values built in
// code may be "integer").
inline std::optional<uint64_t> json_u64(const nlohmann::json& obj,
                                        std::string_view key) {
  auto* v = json_field(obj, key);
  if (!v || !v->is_number_integer()) return std::nullopt;
  if (v->is_number_unsigned()) return v->get<uint64_t>();
  int64_t i = v->get<int64_t>();
  if (i < 0) return std::nullopt;
  return static_cast<uint64_t>(i);
}

inline std::optional<int64_t> json_i64(const nlohmann::json& obj,
                                       std::string_view key) {
  auto* v = json_field(obj, key);
  if (!v || !v->is_number_integer()) return std::nullopt;
  if (v->is_number_unsigned()) {
    uint64_t u = v->get<uint64_t>();
    if (u > static_cast<uint64_t>(INT64_MAX)) return std::nullopt;
    return static_cast<int64_t>(u);
  }
  return v->get<int64_t>();
}

// Dumps without throwing on invalid UTF-8 (replaced by U+FFFD).
inline std::string json_dump(const nlohmann::json& j) {
  return j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

}  // namespace kvmx
