#include "request.h"

#include <initializer_list>

#include "common/json_util.h"
#include "common/unix_socket.h"

namespace kvmx::api {

using nlohmann::json;

namespace {

Error invalid(std::string message) {
  return make_error(code::kInvalid, std::move(message));
}

// Quotes a client-supplied string for an error message, shortened.
std::string quote(std::string_view s) {
  std::string out(s.substr(0, 64));
  for (char& c : out)
    if (static_cast<unsigned char>(c) < 0x20 || c == '\'') c = '?';
  return "'" + out + (s.size() > 64 ? "...'" : "'");
}

Result<void> only_fields(const json& obj, std::string_view op,
                         std::initializer_list<std::string_view> allowed) {
  for (const auto& [key, value] : obj.items()) {
    if (key == "op" || key == "id") continue;
    bool ok = false;
    for (auto a : allowed) ok = ok || key == a;
    if (!ok)
      return invalid("unknown field " + quote(key) + " for op " +
                     std::string(op));
  }
  return {};
}

Result<std::string> vm_field(const json& obj, bool required_field = true) {
  auto it = obj.find("vm");
  if (it == obj.end()) {
    if (required_field) return invalid("missing field 'vm'");
    return std::string();
  }
  if (!it->is_string()) return invalid("'vm' must be a string");
  const auto& name = it->get_ref<const std::string&>();
  if (!valid_vm_name(name))
    return invalid("'vm' must be 1-64 characters of A-Z a-z 0-9 . _ -, "
                   "not starting with . or -");
  return name;
}

Result<Op> parse_args(const std::string& op, const json& obj) {
  if (op == "ping" || op == "version" || op == "list-vms" || op == "stats" ||
      op == "subscribe") {
    if (auto r = only_fields(obj, op, {}); !r) return r.error();
    if (op == "ping") return Op(Ping{});
    if (op == "version") return Op(Version{});
    if (op == "list-vms") return Op(ListVms{});
    if (op == "stats") return Op(Stats{});
    return Op(Subscribe{});
  }
  if (op == "attach") {
    if (auto r = only_fields(obj, op, {"vm", "qmp"}); !r) return r.error();
    auto vm = vm_field(obj);
    if (!vm) return vm.error();
    auto it = obj.find("qmp");
    if (it == obj.end()) return invalid("missing field 'qmp'");
    if (!it->is_string()) return invalid("'qmp' must be a string");
    const auto& path = it->get_ref<const std::string&>();
    if (!valid_qmp_path(path))
      return invalid("'qmp' must be an absolute socket path of at most 107 "
                     "bytes");
    return Op(Attach{*vm, path});
  }
  if (op == "detach" || op == "protections") {
    if (auto r = only_fields(obj, op, {"vm"}); !r) return r.error();
    auto vm = vm_field(obj);
    if (!vm) return vm.error();
    if (op == "detach") return Op(Detach{*vm});
    return Op(Protections{*vm});
  }
  if (op == "violations") {
    if (auto r = only_fields(obj, op, {"vm", "since_seq", "limit"}); !r)
      return r.error();
    Violations v;
    auto vm = vm_field(obj, false);
    if (!vm) return vm.error();
    v.vm = *vm;
    if (auto it = obj.find("since_seq"); it != obj.end()) {
      if (!it->is_number_unsigned())
        return invalid("'since_seq' must be a non-negative integer");
      v.since_seq = it->get<uint64_t>();
    }
    if (auto it = obj.find("limit"); it != obj.end()) {
      if (!it->is_number_unsigned() || it->get<uint64_t>() == 0)
        return invalid("'limit' must be a positive integer");
      uint64_t limit = it->get<uint64_t>();
      v.limit = limit > kMaxViolationLimit ? kMaxViolationLimit
                                           : static_cast<size_t>(limit);
    }
    return Op(v);
  }
  return make_error(code::kUnknownOp, "unknown op " + quote(op));
}

}  // namespace

bool valid_qmp_path(std::string_view path) {
  return !path.empty() && path.front() == '/' && path.size() <= kMaxUnixPath &&
         path.find('\0') == std::string_view::npos;
}

bool valid_vm_name(std::string_view name) {
  if (name.empty() || name.size() > kMaxVmName) return false;
  if (name.front() == '.' || name.front() == '-') return false;
  for (char c : name) {
    bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
              (c >= '0' && c <= '9') || c == '.' || c == '_' || c == '-';
    if (!ok) return false;
  }
  return true;
}

Result<Request> parse_request(std::string_view line, json* id) {
  if (id) *id = nullptr;
  // A request is flat; the depth limit keeps hostile nesting from costing
  // stack (nlohmann::json copies and dumps recursively).
  auto parsed = parse_json(line, JsonLimits{kMaxRequestDepth, line.size()});
  if (!parsed) {
    if (parsed.error().code == "json-parse")
      return make_error(code::kParse, "request is " + parsed.error().message);
    return invalid("request " + parsed.error().message.substr(5));
  }
  json obj = std::move(*parsed);
  if (!obj.is_object()) return invalid("request must be a JSON object");

  Request req;
  if (auto it = obj.find("id"); it != obj.end()) {
    bool ok = it->is_number_integer() ||
              (it->is_string() &&
               it->get_ref<const std::string&>().size() <= kMaxIdBytes) ||
              it->is_null();
    if (!ok)
      return invalid("'id' must be an integer or a string of at most 128 "
                     "bytes");
    req.id = *it;
    if (id) *id = *it;
  }
  auto op = obj.find("op");
  if (op == obj.end()) return invalid("missing field 'op'");
  if (!op->is_string()) return invalid("'op' must be a string");
  req.op = op->get<std::string>();
  auto args = parse_args(req.op, obj);
  if (!args) return args.error();
  req.args = std::move(*args);
  return req;
}

json ok_response(const json& id, json result) {
  json r = json::object();
  if (!id.is_null()) r["id"] = id;
  r["result"] = std::move(result);
  return r;
}

json error_response(const json& id, const Error& error) {
  json r = json::object();
  if (!id.is_null()) r["id"] = id;
  r["error"] = json{{"code", error.code}, {"message", error.message}};
  return r;
}

}  // namespace kvmx::api
