#include "fd.h"

#include <unistd.h>

namespace kvmx {

void UniqueFd::reset(int fd) {
  if (fd_ >= 0) ::close(fd_);  // close(2) errors are not actionable here
  fd_ = fd;
}

}  // namespace kvmx
