#include "log.h"

#include <spdlog/sinks/stdout_sinks.h>
#include <spdlog/sinks/syslog_sink.h>
#include <spdlog/spdlog.h>

#include <syslog.h>

namespace kvmx::log {
namespace {

Format g_format = Format::kText;

bool bare_word(std::string_view s) {
  if (s.empty()) return false;
  for (char c : s) {
    bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
              (c >= '0' && c <= '9') || c == '.' || c == '_' || c == '-' ||
              c == '/' || c == ':' || c == '+';
    if (!ok) return false;
  }
  return true;
}

void emit(spdlog::level::level_enum level, std::string_view msg,
          Fields fields) {
  if (!spdlog::should_log(level)) return;
  spdlog::log(level, "{}", render(g_format, msg, fields));
}

}  // namespace

std::string render(Format format, std::string_view msg, Fields fields) {
  // dump() with error_handler::replace: invalid UTF-8 from a peer becomes
  // U+FFFD instead of throwing.
  constexpr auto kReplace = nlohmann::json::error_handler_t::replace;
  std::string out;
  if (format == Format::kJson) {
    out = "\"msg\":" + nlohmann::json(msg).dump(-1, ' ', false, kReplace);
    for (const auto& [key, value] : fields) {
      if (key == "ts" || key == "level" || key == "msg") continue;
      out += ',';
      out += nlohmann::json(key).dump(-1, ' ', false, kReplace);
      out += ':';
      out += value.dump(-1, ' ', false, kReplace);
    }
    return out;
  }
  out = msg;
  for (const auto& [key, value] : fields) {
    out += ' ';
    out += key;
    out += '=';
    if (value.is_string() && bare_word(value.get_ref<const std::string&>()))
      out += value.get_ref<const std::string&>();
    else
      out += value.dump(-1, ' ', false, kReplace);
  }
  return out;
}

bool valid_level(std::string_view level) {
  static constexpr std::string_view kLevels[] = {
      "trace", "debug", "info", "warn", "error", "critical", "off"};
  for (auto l : kLevels)
    if (l == level) return true;
  return false;
}

Result<Format> parse_format(std::string_view name) {
  if (name == "text") return Format::kText;
  if (name == "json") return Format::kJson;
  return make_error("bad-log-format", "log format must be 'text' or 'json'");
}

Result<void> setup(std::string_view level, Format format, Sink sink) {
  if (!valid_level(level))
    return make_error("bad-log-level",
                      "log level must be one of trace, debug, info, warn, "
                      "error, critical, off");
  std::shared_ptr<spdlog::logger> logger;
  if (sink == Sink::kSyslog) {
    logger = std::make_shared<spdlog::logger>(
        "kvmx-hostd", std::make_shared<spdlog::sinks::syslog_sink_mt>(
                          "kvmx-hostd", LOG_PID, LOG_DAEMON, true));
  } else {
    logger = std::make_shared<spdlog::logger>(
        "kvmx-hostd", std::make_shared<spdlog::sinks::stderr_sink_mt>());
  }
  g_format = format;
  if (format == Format::kJson) {
    logger->set_pattern(
        R"({"ts":"%Y-%m-%dT%H:%M:%S.%fZ","level":"%l",%v})",
        spdlog::pattern_time_type::utc);
  } else if (sink == Sink::kSyslog) {
    logger->set_pattern("%l %v");
  } else {
    logger->set_pattern("%Y-%m-%dT%H:%M:%S.%fZ %l %v",
                        spdlog::pattern_time_type::utc);
  }
  logger->set_level(spdlog::level::from_str(std::string(level)));
  logger->flush_on(spdlog::level::trace);
  spdlog::set_default_logger(std::move(logger));
  return {};
}

void debug(std::string_view msg, Fields fields) {
  emit(spdlog::level::debug, msg, fields);
}
void info(std::string_view msg, Fields fields) {
  emit(spdlog::level::info, msg, fields);
}
void warn(std::string_view msg, Fields fields) {
  emit(spdlog::level::warn, msg, fields);
}
void error(std::string_view msg, Fields fields) {
  emit(spdlog::level::err, msg, fields);
}

}  // namespace kvmx::log
