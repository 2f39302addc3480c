// Structured logging on top of spdlog.  Every line has a message and
// key/value fields.  Text format: "<ts> <level> <msg> key=value ...";
// JSON format: one object per line {"ts", "level", "msg", fields...}.
#pragma once

#include <initializer_list>
#include <string_view>
#include <utility>

#include <nlohmann/json.hpp>

#include "result.h"

namespace kvmx::log {

enum class Format { kText, kJson };
enum class Sink { kStderr, kSyslog };

using Fields =
    std::initializer_list<std::pair<std::string_view, nlohmann::json>>;

// Installs the default logger.  `level`: trace, debug, info, warn, error,
// critical or off.  Safe to call again (replaces the logger).
Result<void> setup(std::string_view level, Format format, Sink sink);
Result<Format> parse_format(std::string_view name);
bool valid_level(std::string_view level);

void debug(std::string_view msg, Fields fields = {});
void info(std::string_view msg, Fields fields = {});
void warn(std::string_view msg, Fields fields = {});
void error(std::string_view msg, Fields fields = {});

// The payload that follows the timestamp and level; exposed for tests.
std::string render(Format format, std::string_view msg, Fields fields);

}  // namespace kvmx::log
