// One recorded KVMX_VIOLATION, as hostd keeps it.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include <kvmx/kvmx-guest.h>

#include <nlohmann/json.hpp>

#include "common/result.h"

namespace kvmx::violations {

constexpr size_t kMaxStringField = 128;

// The names QEMU's KVMX_VIOLATION event uses for the guest ABI's codes
// (include/kvmx/kvmx-guest.h, docs/specs/kvmx-chan.md).
struct Named {
  const char* name;
  uint32_t code;
};
inline constexpr Named kActions[] = {{"deny", KVMX_ACTION_DENY},
                                     {"signal", KVMX_ACTION_SIGNAL},
                                     {"log", KVMX_ACTION_LOG},
                                     {"kill-vm", KVMX_ACTION_KILL_VM}};
inline constexpr Named kAccesses[] = {{"read", KVMX_VIOLATION_READ},
                                      {"write", KVMX_VIOLATION_WRITE}};
std::optional<uint32_t> action_code(std::string_view name);
std::optional<uint32_t> access_code(std::string_view name);

struct Violation {
  uint64_t seq = 0;         // hostd's log sequence: unique, increasing
  std::string vm;
  std::string device;       // kvmx-chan device id
  uint64_t device_seq = 0;  // the event's "seq" (per device, per QEMU run)
  uint64_t id = 0;          // protection id
  uint64_t gpa = 0;
  std::string access;       // "read" or "write" (kAccesses)
  std::string action;       // kActions
  uint64_t size = 0;
  int64_t pid = 0;          // from the guest: informational
  uint64_t vaddr = 0;       // from the guest: informational
  uint64_t suppressed = 0;  // violations QEMU counted but did not emit before
  std::string host_time;    // when hostd received it (RFC 3339 UTC)
  std::string qemu_time;    // the event's timestamp (RFC 3339 UTC)

  // 1 + suppressed: the violations this event stands for.
  uint64_t count() const {
    return suppressed == UINT64_MAX ? suppressed : 1 + suppressed;
  }
};

// The API and journal representation (journal records add "t").
nlohmann::json to_json(const Violation& v);
// From a journal record; checks every field.
Result<Violation> from_json(const nlohmann::json& j);
// From the "data" of a KVMX_VIOLATION event (docs/specs/kvmx-chan.md).
// device, seq, gpa, access and action are required; the rest default to 0.
Result<Violation> from_event(const std::string& vm, const nlohmann::json& data,
                             int64_t qemu_seconds, int64_t qemu_micros,
                             std::string host_time);

}  // namespace kvmx::violations
