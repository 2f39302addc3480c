// kvmx-hostctl's command line turned into one request, and the lines it
// prints for a migration's progress.  A library of its own so that the
// unit tests reach it.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/result.h"

namespace kvmx::ctl {

// Flags that stand for request fields (migrate, migrate-recover).
struct Flags {
  bool postcopy = false;              // --postcopy
  std::optional<std::string> prefetch;  // --prefetch=off|pattern|page-table|both
  std::optional<std::string> transport;  // --transport=tcp|rdma
  bool shared_storage = false;        // --shared-storage
  std::optional<std::string> switch_mode;  // --switch=auto|manual
  bool no_wait = false;               // --no-wait
  std::optional<std::string> disk_dedup;  // --disk-dedup[=auto|on|off]: migrate, snapshot, restore
  bool force = false;                 // --force: snapshot
  bool resume = false;                // --resume: snapshot
  bool paused = false;                // --paused: restore
};

// {"op": op, KEY: VALUE..., and the flags' fields}.  VALUE is taken as
// JSON when it parses (numbers, true) except for the fields that are
// always strings (vm, dest, qmp, uri, ...), so that a VM named 123 stays a
// name.  Errors (code "usage"): a KEY=VALUE without '=', a bad or repeated
// KEY, a flag given for an op it does not belong to, or together with the
// same field as KEY=VALUE, a --prefetch or --switch value that is not one
// of theirs.
Result<nlohmann::json> build_request(const std::string& op,
                                     const std::vector<std::string>& args,
                                     const Flags& flags);

// Ops whose answer comes at the end of a migration (or a snapshot or
// restore), with progress events before it (unless --no-wait).
bool follows_migration(const std::string& op);

// "812.0 MiB"
std::string format_bytes(uint64_t bytes);
// One line for a "migration" event: its message, or the sample.
std::string format_event(const nlohmann::json& ev);
// The last line for a migration's answer: how it ended.
std::string format_outcome(const nlohmann::json& response);

}  // namespace kvmx::ctl
