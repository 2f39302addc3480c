#pragma once

#include <cstdint>
#include <string>

namespace kvmx {

// RFC 3339 UTC with microseconds: "2025-01-31T12:00:00.000123Z".
std::string format_utc(int64_t seconds, int64_t micros);
// The current wall-clock time in that format.
std::string now_utc();

}  // namespace kvmx
