#include "violation.h"

#include "common/json_util.h"
#include "common/time_util.h"

namespace kvmx::violations {

using nlohmann::json;

namespace {

Error bad(const std::string& what) {
  return make_error("bad-violation", what);
}

// Copies the field `key` of `j` into `out`; `required` fields must exist.
Result<void> take_string(const json& j, const char* key, bool required,
                         std::string& out) {
  auto* f = json_field(j, key);
  if (!f) {
    if (required) return bad(std::string("missing field '") + key + "'");
    return {};
  }
  if (!f->is_string()) return bad(std::string("'") + key + "' is not a string");
  const auto& s = f->get_ref<const std::string&>();
  if (s.size() > kMaxStringField)
    return bad(std::string("'") + key + "' is longer than 128 bytes");
  out = s;
  return {};
}

Result<void> take_u64(const json& j, const char* key, bool required,
                      uint64_t& out) {
  auto* f = json_field(j, key);
  if (!f) {
    if (required) return bad(std::string("missing field '") + key + "'");
    return {};
  }
  auto v = json_u64(j, key);
  if (!v) return bad(std::string("'") + key + "' is not an unsigned integer");
  out = *v;
  return {};
}

Result<void> take_i64(const json& j, const char* key, int64_t& out) {
  auto* f = json_field(j, key);
  if (!f) return {};
  auto v = json_i64(j, key);
  if (!v) return bad(std::string("'") + key + "' is not an integer");
  out = *v;
  return {};
}

// Fields shared by events and records.
Result<void> take_common(const json& j, const char* seq_key, Violation& v) {
  for (auto r : {take_string(j, "device", true, v.device),
                 take_u64(j, seq_key, true, v.device_seq),
                 take_u64(j, "gpa", true, v.gpa),
                 take_string(j, "access", true, v.access),
                 take_string(j, "action", true, v.action),
                 take_u64(j, "id", false, v.id),
                 take_u64(j, "size", false, v.size),
                 take_i64(j, "pid", v.pid),
                 take_u64(j, "vaddr", false, v.vaddr),
                 take_u64(j, "suppressed", false, v.suppressed)})
    if (!r) return r;
  return {};
}

}  // namespace

std::optional<uint32_t> action_code(std::string_view name) {
  for (const auto& a : kActions)
    if (name == a.name) return a.code;
  return std::nullopt;
}

std::optional<uint32_t> access_code(std::string_view name) {
  for (const auto& a : kAccesses)
    if (name == a.name) return a.code;
  return std::nullopt;
}

json to_json(const Violation& v) {
  return json{{"seq", v.seq},           {"vm", v.vm},
              {"device", v.device},     {"device_seq", v.device_seq},
              {"id", v.id},             {"gpa", v.gpa},
              {"access", v.access},     {"action", v.action},
              {"size", v.size},         {"pid", v.pid},
              {"vaddr", v.vaddr},       {"suppressed", v.suppressed},
              {"host_time", v.host_time}, {"qemu_time", v.qemu_time}};
}

Result<Violation> from_json(const json& j) {
  if (!j.is_object()) return bad("violation record is not an object");
  Violation v;
  if (auto r = take_u64(j, "seq", true, v.seq); !r) return r.error();
  if (auto r = take_string(j, "vm", true, v.vm); !r) return r.error();
  if (auto r = take_common(j, "device_seq", v); !r) return r.error();
  if (auto r = take_string(j, "host_time", false, v.host_time); !r)
    return r.error();
  if (auto r = take_string(j, "qemu_time", false, v.qemu_time); !r)
    return r.error();
  return v;
}

Result<Violation> from_event(const std::string& vm, const json& data,
                             int64_t qemu_seconds, int64_t qemu_micros,
                             std::string host_time) {
  if (!data.is_object()) return bad("event data is not an object");
  Violation v;
  v.vm = vm;
  if (auto r = take_common(data, "seq", v); !r) return r.error();
  if (!action_code(v.action)) return bad("unknown action '" + v.action + "'");
  if (!access_code(v.access)) return bad("unknown access '" + v.access + "'");
  v.host_time = std::move(host_time);
  if (qemu_seconds > 0 || qemu_micros > 0)
    v.qemu_time = format_utc(qemu_seconds, qemu_micros);
  return v;
}

}  // namespace kvmx::violations
