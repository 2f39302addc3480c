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

using Op = std::variant<Ping, Version, Attach, Detach, ListVms, Protections,
                        Violations, Stats, Subscribe>;

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
