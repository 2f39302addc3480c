// make_virt_backend() when kvmx-hostd is built without libvirt's client
// library (libvirt-dev was missing when meson configured the build).
#include "virt_backend.h"

namespace kvmx::libvirt {

Result<std::unique_ptr<Backend>> make_virt_backend(EventLoop&,
                                                   const std::string&) {
  return make_error("libvirt",
                    "kvmx-hostd was built without libvirt (libvirt-dev was "
                    "missing at configure time): --libvirt is not available");
}

}  // namespace kvmx::libvirt
