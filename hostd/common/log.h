// Structured logging on top of spdlog.  Every line has a message and
// key/value fields.  Text format: "<ts> <level> <msg> key=value ...";
// JSON format: one object per line {"ts", "level", "msg", fields...}.
#pragma once

#include <chrono>
#include <cstdint>
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

// Lets one line through per `interval` and counts those it held back, for
// errors that repeat as fast as their cause (a full disk, a hostile peer).
class RateLimit {
 public:
  using Clock = std::chrono::steady_clock;
  explicit RateLimit(std::chrono::milliseconds interval) : interval_(interval) {}
  // True when a line may be logged now; then *held_back gets the number of
  // lines held back since the last one that was let through.
  bool allow(uint64_t* held_back, Clock::time_point now = Clock::now()) {
    if (started_ && now - last_ < interval_) {
      held_++;
      return false;
    }
    started_ = true;
    last_ = now;
    if (held_back) *held_back = held_;
    held_ = 0;
    return true;
  }

 private:
  std::chrono::milliseconds interval_;
  Clock::time_point last_{};
  bool started_ = false;
  uint64_t held_ = 0;
};

// The payload that follows the timestamp and level; exposed for tests.
std::string render(Format format, std::string_view msg, Fields fields);

}  // namespace kvmx::log
