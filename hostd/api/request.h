// Requests of the hostd socket API (docs/specs/hostd-api.md): parsing and
// validation of one line into a typed request, and the response envelope.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <variant>

#include <nlohmann/json.hpp>

#include "common/result.h"

namespace kvmx::api {

constexpr int kApiVersion = 1;
constexpr size_t kMaxVmName = 64;
constexpr size_t kMaxIdBytes = 128;
constexpr size_t kMaxRequestDepth = 16;  // JSON nesting of a request line
constexpr size_t kDefaultViolationLimit = 100;
constexpr size_t kMaxViolationLimit = 1000;

// Error codes on the wire.
namespace code {
inline constexpr const char* kParse = "parse-error";
inline constexpr const char* kInvalid = "invalid-request";
inline constexpr const char* kUnknownOp = "unknown-op";
inline constexpr const char* kLineTooLong = "line-too-long";
inline constexpr const char* kTooManyClients = "too-many-clients";
inline constexpr const char* kVmNotFound = "vm-not-found";
inline constexpr const char* kVmExists = "vm-exists";
inline constexpr const char* kQmpInUse = "qmp-in-use";
inline constexpr const char* kTooManyVms = "too-many-vms";
inline constexpr const char* kQmpConnect = "qmp-connect-failed";
inline constexpr const char* kQmpHandshake = "qmp-handshake-failed";
inline constexpr const char* kNotConnected = "vm-not-connected";
inline constexpr const char* kQmpError = "qmp-error";
inline constexpr const char* kTimeout = "timeout";
inline constexpr const char* kJournal = "journal-error";
inline constexpr const char* kShuttingDown = "shutting-down";
inline constexpr const char* kIdleTimeout = "idle-timeout";
inline constexpr const char* kResponseTooLarge = "response-too-large";
inline constexpr const char* kInternal = "internal-error";
// Migration (migrate, migrate-postcopy, migrate-recover, migrate-cancel,
// migrate-status).
inline constexpr const char* kMigrationBusy = "migration-busy";
inline constexpr const char* kMigrationUnsupported = "migration-unsupported";
inline constexpr const char* kMigrationRefused = "migration-refused";
inline constexpr const char* kMigrationFailed = "migration-failed";
inline constexpr const char* kMigrationPaused = "migration-paused";
inline constexpr const char* kMigrationCancelled = "migration-cancelled";
inline constexpr const char* kNoMigration = "no-migration";
}  // namespace code

struct Ping {};
struct Version {};
struct Attach {
  std::string vm;
  std::string qmp;
};
struct Detach {
  std::string vm;
};
struct ListVms {};
struct Protections {
  std::string vm;
};
struct Violations {
  std::string vm;  // empty: every VM
  uint64_t since_seq = 0;
  size_t limit = kDefaultViolationLimit;  // 1..kMaxViolationLimit
};
struct Stats {};
struct Subscribe {};

// Bounds of the migration fields (docs/specs/hostd-api.md, "migrate").
constexpr uint32_t kMaxSwitchAfterPasses = 1000;
constexpr uint32_t kMaxSwitchStallSamples = 3600;
constexpr uint32_t kMaxSwitchAfterS = 86400;
constexpr uint32_t kMaxRecoverAttempts = 100;
constexpr uint32_t kMaxMultifdChannels = 255;  // QEMU's multifd-channels
constexpr uint32_t kMinIntervalMs = 100;
constexpr uint32_t kMaxIntervalMs = 60000;
constexpr uint64_t kMaxBandwidth = 1ull << 40;        // bytes/s
constexpr uint64_t kMaxDowntimeLimitMs = 2000000;     // QEMU's own bound
constexpr size_t kMaxTcpHost = 253;

// Where the migration stream goes: "unix:/abs/path" or "tcp:HOST:PORT".
// Nothing else: QEMU's "exec:" would run a shell command, "fd:" and "file:"
// touch hostd's or QEMU's own files.
bool valid_migration_uri(std::string_view uri);

struct Migrate {
  std::string vm;    // the source
  std::string dest;  // a VM registered in hostd, started with -incoming defer
  std::string uri;          // "": hostd picks unix:<socket dir>/migrate-<vm>.sock
  std::string recover_uri;  // "": the same as uri
  bool postcopy = false;
  std::string prefetch = "off";  // off, pattern, page-table, both
  // tcp, or rdma: post-copy faults served by RDMA READ (QEMU's
  // postcopy-rdma; needs postcopy and a tcp: uri)
  std::string transport = "tcp";
  bool shared_storage = false;
  std::string disk_dedup = "auto";  // auto, on, off (migrate/dedup.h)
  // 0: one channel; 1..255: QEMU's multifd with that many channels, on
  // both sides (not with postcopy: QEMU 10.0 refuses multifd with it).
  uint32_t multifd_channels = 0;
  // The switch to post-copy (with postcopy only).  manual: only on
  // migrate-postcopy.  auto: also when one of the rules below holds (0
  // turns a rule off).
  bool switch_manual = false;
  uint32_t switch_after_passes = 1;   // precopy passes complete
  uint32_t switch_stall_samples = 5;  // samples without a new low of remaining
  uint32_t switch_after_s = 0;        // seconds since the migration began
  std::optional<uint64_t> max_bandwidth;           // bytes/s, precopy
  std::optional<uint64_t> max_postcopy_bandwidth;  // bytes/s
  std::optional<uint64_t> downtime_limit_ms;
  uint32_t recover_attempts = 3;  // automatic migrate-recover when paused
  uint32_t interval_ms = 1000;    // progress and policy sampling
  bool wait = true;  // answer at the end (progress events meanwhile)
};
// A VM's memory to a file and back (QEMU's migrate file:PATH).
constexpr size_t kMaxFilePath = 4095;
// An absolute path without control characters, commas (QEMU reads options
// after one), "." or ".." components, or a trailing slash.
bool valid_file_path(std::string_view path);
struct Snapshot {
  std::string vm;
  std::string file;
  std::string disk_dedup = "auto";
  bool force = false;   // overwrite an earlier snapshot file
  bool resume = false;  // run the guest again afterwards
  std::optional<uint64_t> max_bandwidth;
  uint32_t interval_ms = 1000;
  bool wait = true;
};
struct Restore {
  std::string vm;  // a QEMU started with -incoming defer
  std::string file;
  std::string disk_dedup = "auto";
  bool paused = false;  // leave the guest paused once loaded
  uint32_t interval_ms = 1000;
  bool wait = true;
};
struct MigratePostcopy {
  std::string vm;
};
struct MigrateRecover {
  std::string vm;
  std::string dest;  // required unless hostd still has the migration
  std::string uri;   // "": the migration's recover_uri, else its uri
  uint32_t interval_ms = 0;  // 0: the migration's, else 1000
  bool wait = true;
};
struct MigrateCancel {
  std::string vm;
};
struct MigrateStatus {
  std::string vm;
};

// Virtblock purging of one NVDIMM backend (docs/design/virtblock-purging.md).
// `nvdimm` is the id of the memory backend with purge-agent set.
constexpr size_t kMaxBackendId = 64;
constexpr uint64_t kMaxBlocks = 1ull << 40;
struct PurgeStatus {
  std::string vm;      // "": every VM
  std::string nvdimm;  // "": every NVDIMM of the VM
};
struct PurgePolicy {
  std::string vm;
  std::string nvdimm;
  nlohmann::json policy = nlohmann::json::object();  // purge/policy/policy.h
  uint32_t block_shift = 21;          // block_size: 64 KiB .. 1 GiB
  uint32_t probe_interval_ms = 1000;  // access tracking round
  std::string table_dir;              // "": beside the backend file
  uint64_t disk_bytes = 0;            // size of the disk copies' file; 0: the backend's
};
struct PurgeNow {
  std::string vm;
  std::string nvdimm;
  uint64_t first = 0;
  uint64_t count = 0;  // 0: every block from `first` on
  bool ignore_idle = false;
};
struct Unpurge {
  std::string vm;
  std::string nvdimm;
  uint64_t first = 0;
  uint64_t count = 0;
};
namespace code {
inline constexpr const char* kPurgeNotEnabled = "purge-not-enabled";
inline constexpr const char* kPurgeBusy = "purge-busy";
inline constexpr const char* kPurgeFailed = "purge-failed";
}  // namespace code

using Op = std::variant<Ping, Version, Attach, Detach, ListVms, Protections,
                        Violations, Stats, Subscribe, Migrate, MigratePostcopy,
                        MigrateRecover, MigrateCancel, MigrateStatus, Snapshot,
                        Restore, PurgeStatus, PurgePolicy, PurgeNow, Unpurge>;

struct Request {
  nlohmann::json id;  // null when the request carried none
  std::string op;     // its name, for logs
  Op args;
};

// Parses one request line.  On failure the error's code is parse-error,
// invalid-request or unknown-op, and *id gets the request's "id" when it
// could be read (so the error response can echo it).
Result<Request> parse_request(std::string_view line, nlohmann::json* id);

bool valid_vm_name(std::string_view name);
// An absolute path of at most 107 bytes (a Unix socket's), without NUL.
bool valid_qmp_path(std::string_view path);

// Response envelopes: {"id": ..., "result": ...} and
// {"id": ..., "error": {"code": ..., "message": ...}}; no "id" when null.
nlohmann::json ok_response(const nlohmann::json& id, nlohmann::json result);
nlohmann::json error_response(const nlohmann::json& id, const Error& error);

}  // namespace kvmx::api
