#include "unix_socket.h"

#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstring>

namespace kvmx {
namespace {

Result<sockaddr_un> make_addr(const std::string& path) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.empty() || path.size() > kMaxUnixPath)
    return make_error("bad-path", "socket path '" + path +
                                      "' is empty or longer than 107 bytes");
  if (path.find('\0') != std::string::npos)
    return make_error("bad-path", "socket path contains a NUL byte");
  std::memcpy(addr.sun_path, path.data(), path.size());
  return addr;
}

UniqueFd new_socket() {
  return UniqueFd(
      ::socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
}

}  // namespace

Result<UniqueFd> unix_connect(const std::string& path) {
  auto addr = make_addr(path);
  if (!addr) return addr.error();
  UniqueFd fd = new_socket();
  if (!fd) return sys_error("socket", "Failed to create a Unix socket");
  if (::connect(fd.get(), reinterpret_cast<const sockaddr*>(&*addr),
                sizeof(*addr)) < 0) {
    return sys_error("connect", "Failed to connect to '" + path + "'");
  }
  return fd;
}

Result<UniqueFd> unix_listen(const std::string& path, unsigned mode,
                             int backlog) {
  auto addr = make_addr(path);
  if (!addr) return addr.error();

  struct stat st{};
  if (::lstat(path.c_str(), &st) == 0) {
    if (!S_ISSOCK(st.st_mode))
      return make_error("listen", "'" + path + "' exists and is not a socket");
    auto probe = unix_connect(path);
    if (probe.ok() || probe.error().err == EAGAIN)
      return make_error("listen", "another process is listening on '" +
                                      path + "'");
    if (::unlink(path.c_str()) < 0 && errno != ENOENT)
      return sys_error("listen", "Failed to remove stale socket '" + path + "'");
  }

  UniqueFd fd = new_socket();
  if (!fd) return sys_error("socket", "Failed to create a Unix socket");
  if (::bind(fd.get(), reinterpret_cast<const sockaddr*>(&*addr),
             sizeof(*addr)) < 0)
    return sys_error("listen", "Failed to bind '" + path + "'");
  if (::chmod(path.c_str(), mode) < 0)
    return sys_error("listen", "Failed to set the mode of '" + path + "'");
  if (::listen(fd.get(), backlog) < 0)
    return sys_error("listen", "Failed to listen on '" + path + "'");
  return fd;
}

}  // namespace kvmx
