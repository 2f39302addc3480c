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
      "vm", "dest", "qmp", "uri", "recover_uri", "prefetch", "transport",
      "switch",
      "file", "disk_dedup", "nvdimm", "table_dir"};
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
  return op == "migrate" || op == "migrate-recover" || op == "snapshot" ||
         op == "restore";
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
  // Which ops take which flag.
  auto allowed = [&](const std::string& key) {
    if (key == "wait")
      return migrate || op == "migrate-recover" || op == "snapshot" ||
             op == "restore";
    if (key == "disk_dedup")
      return migrate || op == "snapshot" || op == "restore";
    if (key == "force" || key == "resume") return op == "snapshot";
    if (key == "paused") return op == "restore";
    return migrate;
  };
  auto put = [&](const char* flag, const char* key, json value) -> Result<void> {
    std::string k = key;
    if (!allowed(k))
      return usage(std::string(flag) + " is for " +
                   (k == "wait"         ? "migrate, migrate-recover, snapshot and restore"
                    : k == "disk_dedup" ? "migrate, snapshot and restore"
                    : k == "force" || k == "resume" ? "snapshot"
                    : k == "paused"     ? "restore"
                                        : "migrate"));
    if (req.contains(key))
      return usage(std::string(flag) + " and " + key + "= both given");
    req[key] = std::move(value);
    return {};
  };
  if (flags.disk_dedup) {
    const auto& d = *flags.disk_dedup;
    if (d != "auto" && d != "on" && d != "off")
      return usage("--disk-dedup takes auto, on or off, not '" + d + "'");
    if (auto r = put("--disk-dedup", "disk_dedup", d); !r) return r.error();
  }
  if (flags.force)
    if (auto r = put("--force", "force", true); !r) return r.error();
  if (flags.resume)
    if (auto r = put("--resume", "resume", true); !r) return r.error();
  if (flags.paused)
    if (auto r = put("--paused", "paused", true); !r) return r.error();
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
  if (flags.transport) {
    const auto& t = *flags.transport;
    if (t != "tcp" && t != "rdma")
      return usage("--transport takes tcp or rdma, not '" + t + "'");
    if (auto r = put("--transport", "transport", t); !r) return r.error();
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

namespace {

// "  refs 1234 (4.8 MiB saved)" when the event carries dedup numbers.
std::string dedup_part(const json& ev) {
  if (!ev.value("dedup", false)) return "";
  auto it = ev.find("dedup_stats");
  if (it == ev.end() || !it->is_object()) return "";
  const json& d = *it;
  std::string out = "  refs " + u64(d, "pages_as_reference") + " (" +
                    format_bytes(num(d, "bytes_saved")) + " saved)";
  if (num(d, "references_resolved") > 0)
    out += " resolved " + u64(d, "references_resolved");
  if (num(d, "images_refused") > 0) out += " refused " + u64(d, "images_refused");
  if (num(d, "mismatches") > 0) out += " mismatches " + u64(d, "mismatches");
  if (num(d, "read_errors") > 0) out += " read-errors " + u64(d, "read_errors");
  return out;
}

}  // namespace

std::string format_event(const json& ev) {
  char head[32];
  std::snprintf(head, sizeof(head), "[%7.1f s] ",
                static_cast<double>(num(ev, "elapsed_ms")) / 1000.0);
  std::string msg = str(ev, "message");
  if (!msg.empty()) return head + msg;
  std::string state = str(ev, "state");
  char line[512];
  if (ev.contains("kind")) {  // snapshot or restore
    if (str(ev, "kind") == "restore") {
      std::snprintf(line, sizeof(line), "%-10s", state.c_str());
      std::string out = head + std::string(line);
      if (ev.value("dedup", false) && ev.contains("dedup_stats"))
        out += "  references read " +
               u64(ev["dedup_stats"], "references_resolved");
      return out + "  (QEMU " + str(ev, "status") + ")";
    }
    std::snprintf(line, sizeof(line), "%-10s remaining %s  written %s  %s/s",
                  state.c_str(), format_bytes(num(ev, "remaining")).c_str(),
                  format_bytes(num(ev, "transferred")).c_str(),
                  format_bytes(num(ev, "bytes_per_s")).c_str());
    return head + std::string(line) + dedup_part(ev) + "  (QEMU " +
           str(ev, "status") + ")";
  }
  std::snprintf(line, sizeof(line),
                "%-10s pass %s  remaining %s  sent %s  %s/s", state.c_str(),
                u64(ev, "pass").c_str(),
                format_bytes(num(ev, "remaining")).c_str(),
                format_bytes(num(ev, "transferred")).c_str(),
                format_bytes(num(ev, "bytes_per_s")).c_str());
  std::string out = head + std::string(line);
  if (num(ev, "postcopy_requests") > 0 || state == "postcopy")
    out += "  page requests " + u64(ev, "postcopy_requests");
  out += dedup_part(ev);
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
  if (r.contains("kind")) {
    bool restore = str(r, "kind") == "restore";
    std::string what = restore ? "restore of '" + vm + "' from '" +
                                     str(r, "file") + "'"
                               : "snapshot of '" + vm + "' to '" +
                                     str(r, "file") + "'";
    if (state != "completed")
      return what + " is " + state + " (QEMU: " + str(r, "status") + ")";
    std::string out = what + " completed";
    if (!restore) out += ": " + format_bytes(num(r, "transferred")) + " written";
    if (r.value("dedup", false) && r.contains("dedup_stats")) {
      const json& d = r["dedup_stats"];
      out += restore ? ", " + u64(d, "references_resolved") +
                           " pages read from the disk by reference"
                     : ", " + u64(d, "pages_as_reference") +
                           " pages as references (" +
                           format_bytes(num(d, "bytes_saved")) + " saved)";
    } else {
      out += ", disk dedup off" + (str(r, "dedup_reason").empty()
                                       ? std::string()
                                       : " (" + str(r, "dedup_reason") + ")");
    }
    bool runs = restore ? r.value("resume", true)
                        : r.value("resume", false) && r.value("was_running", false);
    out += runs ? "; the guest runs" : "; the VM is paused";
    return out;
  }
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
    if (r.value("dedup", false) && r.contains("dedup_stats")) {
      const json& d = r["dedup_stats"];
      out += "; disk dedup: " + u64(d, "pages_as_reference") +
             " pages as references (" + format_bytes(num(d, "bytes_saved")) +
             " saved), the destination resolved " +
             u64(d, "references_resolved") + ", refused " +
             u64(d, "images_refused") + " disks" +
             (str(d, "refused_reason").empty()
                  ? ""
                  : " (" + str(d, "refused_reason") + ")") +
             ", " + u64(d, "mismatches") + " mismatches, " +
             u64(d, "read_errors") + " read errors";
    } else if (r.contains("dedup")) {
      out += "; disk dedup off" + (str(r, "dedup_reason").empty()
                                       ? std::string()
                                       : " (" + str(r, "dedup_reason") + ")");
    }
    if (r.contains("rdma") && r["rdma"].is_object()) {
      const json& d = r["rdma"];
      std::string st = str(d, "status"), why = str(d, "reason");
      if (st == "active" || st == "closed")
        out += "; RDMA: the destination read " + u64(d, "pages_read") +
               " pages by RDMA READ";
      else
        out += std::string(st == "failed" ? "; RDMA failed after " +
                                                u64(d, "pages_read") +
                                                " pages read"
                                          : "; RDMA not used") +
               (why.empty() ? "" : " (" + why + ")") +
               ": post-copy went over the stream";
    }
    return out;
  }
  return "migration of '" + vm + "' to '" + dest + "' is " + state +
         " (QEMU: " + str(r, "status") +
         "); follow it with kvmx-hostctl migrate-status vm=" + vm +
         " or subscribe";
}

}  // namespace kvmx::ctl
