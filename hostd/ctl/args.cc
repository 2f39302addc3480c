#include "args.h"

#include <cinttypes>
#include <cstdio>
#include <set>

namespace kvmx::ctl {

using nlohmann::json;

namespace {

Error usage(std::string message) {
  return make_error("usage", std::move(message));
}

bool valid_key(const std::string& key) {
  if (key.empty() || key.size() > 64) return false;
  for (char c : key)
    if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_' ||
          c == '-'))
      return false;
  return true;
}

const std::set<std::string>& string_fields() {
  static const std::set<std::string> k = {
      "vm", "dest", "qmp", "uri", "recover_uri", "prefetch", "switch"};
  return k;
}

std::string u64(const json& j, const char* key) {
  auto it = j.find(key);
  if (it == j.end() || !it->is_number_integer()) return "?";
  if (it->is_number_unsigned()) return std::to_string(it->get<uint64_t>());
  int64_t v = it->get<int64_t>();
  return v < 0 ? "?" : std::to_string(v);
}

uint64_t num(const json& j, const char* key) {
  auto it = j.find(key);
  if (it == j.end() || !it->is_number_integer()) return 0;
  if (it->is_number_unsigned()) return it->get<uint64_t>();
  int64_t v = it->get<int64_t>();
  return v < 0 ? 0 : static_cast<uint64_t>(v);
}

std::string str(const json& j, const char* key) {
  auto it = j.find(key);
  return it != j.end() && it->is_string() ? it->get<std::string>() : "";
}

}  // namespace

bool follows_migration(const std::string& op) {
  return op == "migrate" || op == "migrate-recover";
}

Result<json> build_request(const std::string& op,
                           const std::vector<std::string>& args,
                           const Flags& flags) {
  json req = {{"op", op}};
  for (const auto& a : args) {
    auto eq = a.find('=');
    if (eq == std::string::npos)
      return usage("expected KEY=VALUE, not '" + a + "'");
    std::string key = a.substr(0, eq), value = a.substr(eq + 1);
    if (!valid_key(key) || key == "op")
      return usage("'" + key + "' is not a field name");
    if (req.contains(key)) return usage("'" + key + "' given twice");
    if (string_fields().count(key)) {
      req[key] = value;
      continue;
    }
    json v = json::parse(value, nullptr, false);
    req[key] = v.is_discarded() ? json(value) : v;
  }
  bool migrate = op == "migrate";
  auto put = [&](const char* flag, const char* key, json value) -> Result<void> {
    if (!migrate && !(op == "migrate-recover" && std::string(key) == "wait"))
      return usage(std::string(flag) + " is for migrate" +
                   (std::string(key) == "wait" ? " and migrate-recover" : ""));
    if (req.contains(key))
      return usage(std::string(flag) + " and " + key + "= both given");
    req[key] = std::move(value);
    return {};
  };
  if (flags.postcopy)
    if (auto r = put("--postcopy", "postcopy", true); !r) return r.error();
  if (flags.shared_storage)
    if (auto r = put("--shared-storage", "shared_storage", true); !r)
      return r.error();
  if (flags.prefetch) {
    const auto& p = *flags.prefetch;
    if (p != "off" && p != "pattern" && p != "page-table" && p != "both")
      return usage("--prefetch takes off, pattern, page-table or both, not '" +
                   p + "'");
    if (auto r = put("--prefetch", "prefetch", p); !r) return r.error();
  }
  if (flags.switch_mode) {
    const auto& m = *flags.switch_mode;
    if (m != "auto" && m != "manual")
      return usage("--switch takes auto or manual, not '" + m + "'");
    if (auto r = put("--switch", "switch", m); !r) return r.error();
  }
  if (flags.no_wait)
    if (auto r = put("--no-wait", "wait", false); !r) return r.error();
  return req;
}

std::string format_bytes(uint64_t bytes) {
  static const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  double v = static_cast<double>(bytes);
  int u = 0;
  while (v >= 1024 && u < 4) {
    v /= 1024;
    u++;
  }
  char buf[32];
  if (u == 0)
    std::snprintf(buf, sizeof(buf), "%" PRIu64 " B", bytes);
  else
    std::snprintf(buf, sizeof(buf), "%.1f %s", v, units[u]);
  return buf;
}

std::string format_event(const json& ev) {
  char head[32];
  std::snprintf(head, sizeof(head), "[%7.1f s] ",
                static_cast<double>(num(ev, "elapsed_ms")) / 1000.0);
  std::string msg = str(ev, "message");
  if (!msg.empty()) return head + msg;
  std::string state = str(ev, "state");
  char line[512];
  std::snprintf(line, sizeof(line),
                "%-10s pass %s  remaining %s  sent %s  %s/s", state.c_str(),
                u64(ev, "pass").c_str(),
                format_bytes(num(ev, "remaining")).c_str(),
                format_bytes(num(ev, "transferred")).c_str(),
                format_bytes(num(ev, "bytes_per_s")).c_str());
  std::string out = head + std::string(line);
  if (num(ev, "postcopy_requests") > 0 || state == "postcopy")
    out += "  page requests " + u64(ev, "postcopy_requests");
  out += "  (source " + str(ev, "status") + ", destination " +
         str(ev, "dest_status") + ")";
  return out;
}

std::string format_outcome(const json& response) {
  if (auto err = response.find("error"); err != response.end()) {
    return str(*err, "code") + ": " + str(*err, "message");
  }
  auto it = response.find("result");
  if (it == response.end() || !it->is_object()) return response.dump();
  const json& r = *it;
  std::string vm = str(r, "vm"), dest = str(r, "dest"), state = str(r, "state");
  if (state == "completed") {
    std::string out = "migration of '" + vm + "' to '" + dest +
                      "' completed: " + format_bytes(num(r, "transferred")) +
                      " sent";
    if (r.value("switched", false))
      out += ", post-copy (" + str(r, "switch_reason") + "), " +
             u64(r, "postcopy_requests") + " page requests";
    else
      out += ", precopy only";
    if (r.contains("downtime_ms") && r["downtime_ms"].is_number())
      out += ", downtime " + u64(r, "downtime_ms") + " ms";
    if (num(r, "recoveries") > 0)
      out += ", " + u64(r, "recoveries") + " recoveries";
    return out;
  }
  return "migration of '" + vm + "' to '" + dest + "' is " + state +
         " (QEMU: " + str(r, "status") +
         "); follow it with kvmx-hostctl migrate-status vm=" + vm +
         " or subscribe";
}

}  // namespace kvmx::ctl
