#include "request.h"

#include <algorithm>
#include <cctype>
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

// An optional boolean field.
Result<void> bool_field(const json& obj, const char* key, bool& out) {
  auto it = obj.find(key);
  if (it == obj.end()) return {};
  if (!it->is_boolean())
    return invalid("'" + std::string(key) + "' must be true or false");
  out = it->get<bool>();
  return {};
}

// An optional integer field in [min, max].
template <typename T>
Result<void> uint_field(const json& obj, const char* key, uint64_t min,
                        uint64_t max, T& out) {
  auto it = obj.find(key);
  if (it == obj.end()) return {};
  if (!it->is_number_unsigned() || it->get<uint64_t>() < min ||
      it->get<uint64_t>() > max)
    return invalid("'" + std::string(key) + "' must be an integer from " +
                   std::to_string(min) + " to " + std::to_string(max));
  out = static_cast<T>(it->get<uint64_t>());
  return {};
}

Result<void> opt_uint_field(const json& obj, const char* key, uint64_t min,
                            uint64_t max, std::optional<uint64_t>& out) {
  if (!obj.contains(key)) return {};
  uint64_t v = 0;
  if (auto r = uint_field(obj, key, min, max, v); !r) return r;
  out = v;
  return {};
}

Result<std::string> uri_field(const json& obj, const char* key) {
  auto it = obj.find(key);
  if (it == obj.end()) return std::string();
  if (!it->is_string()) return invalid("'" + std::string(key) + "' must be a string");
  const auto& uri = it->get_ref<const std::string&>();
  if (!valid_migration_uri(uri))
    return invalid("'" + std::string(key) + "' must be unix:/ABSOLUTE/PATH "
                   "(at most 107 bytes) or tcp:HOST:PORT, not " + quote(uri));
  return uri;
}

Result<std::string> dest_field(const json& obj, const std::string& vm,
                               bool required_field) {
  auto it = obj.find("dest");
  if (it == obj.end()) {
    if (required_field) return invalid("missing field 'dest'");
    return std::string();
  }
  if (!it->is_string() || !valid_vm_name(it->get_ref<const std::string&>()))
    return invalid("'dest' must be the name of a VM registered in hostd "
                   "(1-64 characters of A-Z a-z 0-9 . _ -)");
  if (it->get_ref<const std::string&>() == vm)
    return invalid("'dest' must be another VM than 'vm'");
  return it->get<std::string>();
}

Result<void> dedup_field(const json& obj, std::string& out) {
  auto it = obj.find("disk_dedup");
  if (it == obj.end()) return {};
  if (!it->is_string() || (*it != "auto" && *it != "on" && *it != "off"))
    return invalid("'disk_dedup' must be auto, on or off");
  out = it->get<std::string>();
  return {};
}

Result<std::string> file_field(const json& obj) {
  auto it = obj.find("file");
  if (it == obj.end()) return invalid("missing field 'file'");
  if (!it->is_string()) return invalid("'file' must be a string");
  const auto& f = it->get_ref<const std::string&>();
  if (!valid_file_path(f))
    return invalid("'file' must be an absolute path of at most 4095 bytes "
                   "without control characters, commas, '.' or '..' "
                   "components or a trailing '/', not " + quote(f));
  return f;
}

Result<Op> parse_snapshot(const json& obj) {
  if (auto r = only_fields(obj, "snapshot",
                           {"vm", "file", "disk_dedup", "force", "resume",
                            "max_bandwidth", "interval_ms", "wait"});
      !r)
    return r.error();
  Snapshot s;
  auto vm = vm_field(obj);
  if (!vm) return vm.error();
  s.vm = *vm;
  auto f = file_field(obj);
  if (!f) return f.error();
  s.file = *f;
  if (auto r = dedup_field(obj, s.disk_dedup); !r) return r.error();
  for (auto [key, out] : {std::pair{"force", &s.force},
                          std::pair{"resume", &s.resume},
                          std::pair{"wait", &s.wait}})
    if (auto r = bool_field(obj, key, *out); !r) return r.error();
  if (auto r = opt_uint_field(obj, "max_bandwidth", 1, kMaxBandwidth,
                              s.max_bandwidth);
      !r)
    return r.error();
  if (auto r = uint_field(obj, "interval_ms", kMinIntervalMs, kMaxIntervalMs,
                          s.interval_ms);
      !r)
    return r.error();
  return Op(std::move(s));
}

// A memory backend's id: QEMU's id syntax (a letter, then letters, digits,
// '-', '.', '_'), at most kMaxBackendId bytes.
Result<std::string> nvdimm_field(const json& obj, bool required_field) {
  auto it = obj.find("nvdimm");
  if (it == obj.end()) {
    if (required_field) return invalid("'nvdimm' is required");
    return std::string();
  }
  if (!it->is_string()) return invalid("'nvdimm' must be a string");
  const auto& id = it->get_ref<const std::string&>();
  bool ok = !id.empty() && id.size() <= kMaxBackendId &&
            std::isalpha(static_cast<unsigned char>(id[0]));
  for (char c : id)
    ok = ok && (std::isalnum(static_cast<unsigned char>(c)) || c == '-' ||
                c == '.' || c == '_');
  if (!ok)
    return invalid("'nvdimm' must be a memory backend id (a letter, then "
                   "letters, digits, '-', '.', '_'; at most " +
                   std::to_string(kMaxBackendId) + ")");
  return id;
}

Result<Op> parse_purge(const json& obj, const std::string& op) {
  if (op == "purge-status") {
    if (auto r = only_fields(obj, op, {"vm", "nvdimm"}); !r) return r.error();
    auto vm = vm_field(obj, false);
    if (!vm) return vm.error();
    auto nv = nvdimm_field(obj, false);
    if (!nv) return nv.error();
    if (vm->empty() && !nv->empty()) return invalid("'nvdimm' needs 'vm'");
    return Op(PurgeStatus{*vm, *nv});
  }
  if (op == "purge-policy") {
    if (auto r = only_fields(obj, op, {"vm", "nvdimm", "policy", "block_size",
                                       "probe_interval_ms", "table_dir",
                                       "disk_bytes"});
        !r)
      return r.error();
    PurgePolicy p;
    auto vm = vm_field(obj);
    if (!vm) return vm.error();
    auto nv = nvdimm_field(obj, true);
    if (!nv) return nv.error();
    p.vm = *vm;
    p.nvdimm = *nv;
    if (auto it = obj.find("policy"); it != obj.end()) {
      if (!it->is_object()) return invalid("'policy' must be an object");
      p.policy = *it;
    }
    uint64_t bs = 0;
    if (auto r = uint_field(obj, "block_size", 65536, 1ull << 30, bs); !r)
      return r.error();
    if (bs) {
      if (bs & (bs - 1))
        return invalid("'block_size' must be a power of two");
      p.block_shift = static_cast<uint32_t>(__builtin_ctzll(bs));
    }
    if (auto r = uint_field(obj, "probe_interval_ms", kMinIntervalMs,
                            kMaxIntervalMs, p.probe_interval_ms);
        !r)
      return r.error();
    if (auto r = uint_field(obj, "disk_bytes", 1ull << 16, 1ull << 50,
                            p.disk_bytes);
        !r)
      return r.error();
    if (auto it = obj.find("table_dir"); it != obj.end()) {
      if (!it->is_string() || !valid_file_path(it->get<std::string>()))
        return invalid("'table_dir' must be an absolute path without "
                       "commas, '.' or '..'");
      p.table_dir = it->get<std::string>();
    }
    return Op(std::move(p));
  }
  bool now = op == "purge-now";
  if (auto r = now ? only_fields(obj, op, {"vm", "nvdimm", "first", "count",
                                           "ignore_idle"})
                   : only_fields(obj, op, {"vm", "nvdimm", "first", "count"});
      !r)
    return r.error();
  auto vm = vm_field(obj);
  if (!vm) return vm.error();
  auto nv = nvdimm_field(obj, true);
  if (!nv) return nv.error();
  uint64_t first = 0, count = 0;
  if (auto r = uint_field(obj, "first", 0, kMaxBlocks, first); !r)
    return r.error();
  if (auto r = uint_field(obj, "count", 0, kMaxBlocks, count); !r)
    return r.error();
  if (!now) return Op(Unpurge{*vm, *nv, first, count});
  PurgeNow p{*vm, *nv, first, count, false};
  if (auto r = bool_field(obj, "ignore_idle", p.ignore_idle); !r)
    return r.error();
  return Op(std::move(p));
}

Result<Op> parse_restore(const json& obj) {
  if (auto r = only_fields(obj, "restore",
                           {"vm", "file", "disk_dedup", "paused",
                            "interval_ms", "wait"});
      !r)
    return r.error();
  Restore s;
  auto vm = vm_field(obj);
  if (!vm) return vm.error();
  s.vm = *vm;
  auto f = file_field(obj);
  if (!f) return f.error();
  s.file = *f;
  if (auto r = dedup_field(obj, s.disk_dedup); !r) return r.error();
  for (auto [key, out] : {std::pair{"paused", &s.paused},
                          std::pair{"wait", &s.wait}})
    if (auto r = bool_field(obj, key, *out); !r) return r.error();
  if (auto r = uint_field(obj, "interval_ms", kMinIntervalMs, kMaxIntervalMs,
                          s.interval_ms);
      !r)
    return r.error();
  return Op(std::move(s));
}

Result<Op> parse_migrate(const json& obj) {
  if (auto r = only_fields(
          obj, "migrate",
          {"vm", "dest", "uri", "recover_uri", "postcopy", "prefetch",
           "transport", "shared_storage", "switch", "switch_after_passes",
           "switch_stall_samples", "switch_after_s", "max_bandwidth",
           "max_postcopy_bandwidth", "downtime_limit_ms", "recover_attempts",
           "interval_ms", "wait", "disk_dedup", "multifd_channels"});
      !r)
    return r.error();
  Migrate m;
  auto vm = vm_field(obj);
  if (!vm) return vm.error();
  m.vm = *vm;
  auto dest = dest_field(obj, m.vm, true);
  if (!dest) return dest.error();
  m.dest = *dest;
  auto uri = uri_field(obj, "uri");
  if (!uri) return uri.error();
  m.uri = *uri;
  auto ruri = uri_field(obj, "recover_uri");
  if (!ruri) return ruri.error();
  m.recover_uri = *ruri;
  for (auto [key, out] : {std::pair{"postcopy", &m.postcopy},
                          std::pair{"shared_storage", &m.shared_storage},
                          std::pair{"wait", &m.wait}})
    if (auto r = bool_field(obj, key, *out); !r) return r.error();
  if (auto it = obj.find("prefetch"); it != obj.end()) {
    static constexpr std::string_view kModes[] = {"off", "pattern",
                                                  "page-table", "both"};
    bool ok = false;
    if (it->is_string())
      for (auto mode : kModes) ok = ok || it->get_ref<const std::string&>() == mode;
    if (!ok)
      return invalid("'prefetch' must be off, pattern, page-table or both");
    m.prefetch = it->get<std::string>();
  }
  if (auto it = obj.find("transport"); it != obj.end()) {
    if (!it->is_string() || (*it != "tcp" && *it != "rdma"))
      return invalid("'transport' must be tcp or rdma");
    m.transport = it->get<std::string>();
  }
  if (auto r = dedup_field(obj, m.disk_dedup); !r) return r.error();
  bool switch_given = obj.contains("switch") ||
                      obj.contains("switch_after_passes") ||
                      obj.contains("switch_stall_samples") ||
                      obj.contains("switch_after_s");
  if (auto it = obj.find("switch"); it != obj.end()) {
    if (!it->is_string() || (*it != "auto" && *it != "manual"))
      return invalid("'switch' must be auto or manual");
    m.switch_manual = *it == "manual";
  }
  if (auto r = uint_field(obj, "switch_after_passes", 0, kMaxSwitchAfterPasses,
                          m.switch_after_passes);
      !r)
    return r.error();
  if (auto r = uint_field(obj, "switch_stall_samples", 0,
                          kMaxSwitchStallSamples, m.switch_stall_samples);
      !r)
    return r.error();
  if (auto r = uint_field(obj, "switch_after_s", 0, kMaxSwitchAfterS,
                          m.switch_after_s);
      !r)
    return r.error();
  if (auto r = opt_uint_field(obj, "max_bandwidth", 1, kMaxBandwidth,
                              m.max_bandwidth);
      !r)
    return r.error();
  if (auto r = opt_uint_field(obj, "max_postcopy_bandwidth", 1, kMaxBandwidth,
                              m.max_postcopy_bandwidth);
      !r)
    return r.error();
  if (auto r = opt_uint_field(obj, "downtime_limit_ms", 1, kMaxDowntimeLimitMs,
                              m.downtime_limit_ms);
      !r)
    return r.error();
  if (auto r = uint_field(obj, "recover_attempts", 0, kMaxRecoverAttempts,
                          m.recover_attempts);
      !r)
    return r.error();
  if (auto r = uint_field(obj, "interval_ms", kMinIntervalMs, kMaxIntervalMs,
                          m.interval_ms);
      !r)
    return r.error();
  if (auto r = uint_field(obj, "multifd_channels", 0, kMaxMultifdChannels,
                          m.multifd_channels);
      !r)
    return r.error();
  if (m.multifd_channels && m.postcopy)
    return invalid("'multifd_channels' does not work with 'postcopy': QEMU "
                   "10.0 refuses multifd with post-copy");
  // What only means something with post-copy is an error without it: the
  // client believes it asked for something.
  if (!m.postcopy) {
    if (m.prefetch != "off")
      return invalid("'prefetch' needs 'postcopy': prefetching fetches "
                     "pages after the switch to post-copy");
    if (m.transport == "rdma")
      return invalid("'transport' rdma needs 'postcopy': only post-copy "
                     "faults are served by RDMA READ");
    if (switch_given)
      return invalid("'switch*' fields need 'postcopy'");
    if (m.max_postcopy_bandwidth)
      return invalid("'max_postcopy_bandwidth' needs 'postcopy'");
    if (!m.recover_uri.empty() || obj.contains("recover_attempts"))
      return invalid("'recover_uri' and 'recover_attempts' need 'postcopy' "
                     "(only a post-copy migration can be recovered)");
  }
  if (m.transport == "rdma" && m.uri.rfind("tcp:", 0) != 0)
    return invalid("'transport' rdma needs a tcp: 'uri': the source's QEMU "
                   "uses the RDMA device that has the local address of the "
                   "migration connection");
  if (m.switch_manual &&
      (obj.contains("switch_after_passes") ||
       obj.contains("switch_stall_samples") || obj.contains("switch_after_s")))
    return invalid("'switch' manual takes no switch_after_passes, "
                   "switch_stall_samples or switch_after_s");
  if (!m.recover_uri.empty() && m.recover_uri == m.uri)
    m.recover_uri.clear();
  return Op(std::move(m));
}

Result<Op> parse_migrate_recover(const json& obj) {
  if (auto r = only_fields(obj, "migrate-recover",
                           {"vm", "dest", "uri", "interval_ms", "wait"});
      !r)
    return r.error();
  MigrateRecover m;
  auto vm = vm_field(obj);
  if (!vm) return vm.error();
  m.vm = *vm;
  auto dest = dest_field(obj, m.vm, false);
  if (!dest) return dest.error();
  m.dest = *dest;
  auto uri = uri_field(obj, "uri");
  if (!uri) return uri.error();
  m.uri = *uri;
  if (auto r = uint_field(obj, "interval_ms", kMinIntervalMs, kMaxIntervalMs,
                          m.interval_ms);
      !r)
    return r.error();
  if (auto r = bool_field(obj, "wait", m.wait); !r) return r.error();
  return Op(std::move(m));
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
  if (op == "migrate") return parse_migrate(obj);
  if (op == "migrate-recover") return parse_migrate_recover(obj);
  if (op == "snapshot") return parse_snapshot(obj);
  if (op == "restore") return parse_restore(obj);
  if (op == "purge-status" || op == "purge-policy" || op == "purge-now" ||
      op == "unpurge")
    return parse_purge(obj, op);
  if (op == "migrate-postcopy" || op == "migrate-cancel" ||
      op == "migrate-status") {
    if (auto r = only_fields(obj, op, {"vm"}); !r) return r.error();
    auto vm = vm_field(obj);
    if (!vm) return vm.error();
    if (op == "migrate-postcopy") return Op(MigratePostcopy{*vm});
    if (op == "migrate-cancel") return Op(MigrateCancel{*vm});
    return Op(MigrateStatus{*vm});
  }
  return make_error(code::kUnknownOp, "unknown op " + quote(op));
}

bool valid_host(std::string_view host) {
  if (host.empty() || host.size() > kMaxTcpHost) return false;
  if (host.front() == '[') {  // an IPv6 literal
    if (host.size() < 3 || host.back() != ']') return false;
    for (char c : host.substr(1, host.size() - 2))
      if (!(std::isxdigit(static_cast<unsigned char>(c)) || c == ':' ||
            c == '.'))
        return false;
    return true;
  }
  if (host.front() == '-' || host.front() == '.') return false;
  for (char c : host)
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '-' ||
          c == '.'))
      return false;
  return true;
}

}  // namespace

bool valid_migration_uri(std::string_view uri) {
  if (uri.starts_with("unix:")) {
    std::string_view path = uri.substr(5);
    // QEMU parses options after a comma in some socket addresses: none.
    return valid_qmp_path(path) && path.find(',') == std::string_view::npos &&
           std::all_of(path.begin(), path.end(), [](char c) {
             return static_cast<unsigned char>(c) >= 0x20 && c != 0x7f;
           });
  }
  if (uri.starts_with("tcp:")) {
    std::string_view rest = uri.substr(4);
    size_t colon = rest.rfind(':');
    if (colon == std::string_view::npos) return false;
    std::string_view host = rest.substr(0, colon), port = rest.substr(colon + 1);
    if (port.empty() || port.size() > 5) return false;
    unsigned p = 0;
    for (char c : port) {
      if (c < '0' || c > '9') return false;
      p = p * 10 + static_cast<unsigned>(c - '0');
    }
    return p >= 1 && p <= 65535 && valid_host(host);
  }
  return false;
}

bool valid_file_path(std::string_view path) {
  if (path.empty() || path.front() != '/' || path.size() > kMaxFilePath ||
      path.back() == '/')
    return false;
  for (char c : path)
    if (static_cast<unsigned char>(c) < 0x20 || c == 0x7f || c == ',')
      return false;
  size_t i = 1;
  while (i <= path.size()) {
    size_t j = path.find('/', i);
    if (j == std::string_view::npos) j = path.size();
    std::string_view comp = path.substr(i, j - i);
    if (comp.empty() || comp == "." || comp == "..") return false;
    i = j + 1;
  }
  return true;
}

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
