// Accessors for JSON that came from a peer: they never throw.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

namespace kvmx {

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
