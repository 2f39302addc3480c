#include "config.h"

#include <charconv>
#include <fstream>
#include <sstream>

namespace kvmx::config {
namespace {

Error bad(std::string_view key, const std::string& why) {
  return make_error("bad-config", "'" + std::string(key) + "' " + why);
}

Result<uint64_t> parse_uint(std::string_view key, std::string_view value,
                            uint64_t min, uint64_t max, int base = 10) {
  uint64_t v = 0;
  auto [ptr, ec] =
      std::from_chars(value.data(), value.data() + value.size(), v, base);
  if (ec != std::errc() || ptr != value.data() + value.size() || value.empty())
    return bad(key, "must be an integer, not '" + std::string(value) + "'");
  if (v < min || v > max)
    return bad(key, "must be between " + std::to_string(min) + " and " +
                        std::to_string(max));
  return v;
}

Result<void> set_path(std::string_view key, std::string_view value,
                      std::string& out) {
  if (value.empty() || value.front() != '/')
    return bad(key, "must be an absolute path");
  out = value;
  return {};
}

std::string_view trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t' || s.back() == '\r'))
    s.remove_suffix(1);
  return s;
}

}  // namespace

const std::vector<std::string_view>& keys() {
  static const std::vector<std::string_view> k = {
      "socket",           "socket-mode",      "state-dir",
      "log-level",        "log-format",       "max-clients",
      "max-vms",          "max-request-bytes", "max-output-bytes",
      "max-violations",   "max-qmp-message-bytes", "max-devices-bytes",
      "attach-timeout-ms", "qmp-timeout-ms", "reconnect-min-ms",
      "reconnect-max-ms", "client-idle-timeout-ms", "libvirt-uri"};
  return k;
}

Result<void> set(Config& cfg, std::string_view key, std::string_view value) {
  auto num = [&](uint64_t min, uint64_t max, auto& out) -> Result<void> {
    auto v = parse_uint(key, value, min, max);
    if (!v) return v.error();
    out = static_cast<std::remove_reference_t<decltype(out)>>(*v);
    return {};
  };
  if (key == "socket") {
    if (value.size() > 107) return bad(key, "is longer than 107 bytes");
    return set_path(key, value, cfg.socket);
  }
  if (key == "state-dir") return set_path(key, value, cfg.state_dir);
  if (key == "socket-mode") {
    auto v = parse_uint(key, value, 0, 0777, 8);
    if (!v) return v.error();
    cfg.socket_mode = static_cast<unsigned>(*v);
    return {};
  }
  if (key == "log-level") {
    static constexpr std::string_view kLevels[] = {
        "trace", "debug", "info", "warn", "error", "critical", "off"};
    for (auto l : kLevels)
      if (l == value) {
        cfg.log_level = value;
        return {};
      }
    return bad(key, "must be trace, debug, info, warn, error, critical or off");
  }
  if (key == "log-format") {
    if (value != "text" && value != "json")
      return bad(key, "must be 'text' or 'json'");
    cfg.log_format = value;
    return {};
  }
  if (key == "max-clients") return num(1, 4096, cfg.max_clients);
  if (key == "max-vms") return num(1, 4096, cfg.max_vms);
  if (key == "max-request-bytes")
    return num(1024, 16 << 20, cfg.max_request_bytes);
  if (key == "max-output-bytes")
    return num(64 << 10, 1ull << 30, cfg.max_output_bytes);
  if (key == "max-violations") return num(1, 10000000, cfg.max_violations);
  if (key == "max-qmp-message-bytes")
    return num(64 << 10, 64 << 20, cfg.max_qmp_message_bytes);
  if (key == "max-devices-bytes")
    return num(4 << 10, 64 << 20, cfg.max_devices_bytes);
  if (key == "client-idle-timeout-ms")
    return num(0, 86400000, cfg.client_idle_timeout_ms);
  if (key == "attach-timeout-ms") return num(0, 600000, cfg.attach_timeout_ms);
  if (key == "qmp-timeout-ms") return num(100, 600000, cfg.qmp_timeout_ms);
  if (key == "reconnect-min-ms") return num(10, 600000, cfg.reconnect_min_ms);
  if (key == "reconnect-max-ms") return num(10, 3600000, cfg.reconnect_max_ms);
  if (key == "libvirt-uri") {
    // Empty turns it off; otherwise a URI as virConnectOpen takes it.
    if (value.size() > 1024) return bad(key, "is longer than 1024 bytes");
    for (char c : value)
      if (static_cast<unsigned char>(c) <= ' ' || c == 0x7f)
        return bad(key, "must not contain spaces or control characters");
    if (!value.empty() && value.find(':') == std::string_view::npos)
      return bad(key, "must be a libvirt URI such as qemu:///system");
    cfg.libvirt_uri = value;
    return {};
  }
  return make_error("bad-config", "unknown key '" + std::string(key) + "'");
}

Result<void> apply_text(Config& cfg, std::string_view text,
                        std::string_view origin) {
  size_t lineno = 0;
  while (!text.empty()) {
    size_t nl = text.find('\n');
    std::string_view line = text.substr(0, nl);
    text = nl == std::string_view::npos ? std::string_view()
                                        : text.substr(nl + 1);
    lineno++;
    line = trim(line);
    if (line.empty() || line.front() == '#') continue;
    auto where = std::string(origin) + ":" + std::to_string(lineno) + ": ";
    size_t eq = line.find('=');
    if (eq == std::string_view::npos)
      return make_error("bad-config", where + "expected 'key = value'");
    auto r = set(cfg, trim(line.substr(0, eq)), trim(line.substr(eq + 1)));
    if (!r) return make_error("bad-config", where + r.error().message);
  }
  return validate(cfg);
}

Result<void> apply_file(Config& cfg, const std::string& path) {
  std::ifstream in(path);
  if (!in) return sys_error("bad-config", "Failed to open config '" + path + "'");
  std::ostringstream text;
  text << in.rdbuf();
  if (in.bad())
    return sys_error("bad-config", "Failed to read config '" + path + "'");
  return apply_text(cfg, text.str(), path);
}

Result<void> validate(const Config& cfg) {
  if (cfg.reconnect_min_ms > cfg.reconnect_max_ms)
    return make_error("bad-config",
                      "'reconnect-min-ms' is larger than 'reconnect-max-ms'");
  return {};
}

}  // namespace kvmx::config
