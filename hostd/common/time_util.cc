#include "time_util.h"

#include <chrono>
#include <cstdio>
#include <ctime>

namespace kvmx {

std::string format_utc(int64_t seconds, int64_t micros) {
  std::time_t t = static_cast<std::time_t>(seconds);
  std::tm tm{};
  if (!::gmtime_r(&t, &tm)) return "";
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%04d-%02d-%02dT%02d:%02d:%02d.%06lldZ",
                tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour,
                tm.tm_min, tm.tm_sec, static_cast<long long>(micros % 1000000));
  return buf;
}

std::string now_utc() {
  auto us = std::chrono::duration_cast<std::chrono::microseconds>(
                std::chrono::system_clock::now().time_since_epoch())
                .count();
  return format_utc(us / 1000000, us % 1000000);
}

}  // namespace kvmx
