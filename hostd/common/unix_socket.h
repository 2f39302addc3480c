// Unix stream sockets: non-blocking connect and listen.
#pragma once

#include <string>

#include "fd.h"
#include "result.h"

namespace kvmx {

// Largest path a sockaddr_un holds, without the terminating NUL.
constexpr size_t kMaxUnixPath = 107;

// Connects without blocking.  Unix stream connects complete at once or fail:
// ENOENT (no socket file), ECONNREFUSED (nobody listens), EAGAIN (backlog
// full).  Error.err carries the errno.
Result<UniqueFd> unix_connect(const std::string& path);

// Binds and listens on `path` with permissions `mode`.  A stale socket file
// (nobody answers on it) is replaced; a live one is an error.
Result<UniqueFd> unix_listen(const std::string& path, unsigned mode,
                             int backlog = 64);

}  // namespace kvmx
