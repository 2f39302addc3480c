// The Backend that talks to libvirtd through libvirt's client library.
//
// libvirt runs on a thread of its own: it has libvirt's default event loop
// (virEventRegisterDefaultImpl + virEventRunDefaultImpl) and makes every
// libvirt call, so a slow libvirt call (a monitor command waits for the
// domain's job lock, up to libvirt's 30 s) never stalls hostd's loop, where
// violations are journaled.  Requests go to that thread through a queue
// and an eventfd; results and events come back the same way and run on
// hostd's loop, so all of hostd's state stays single-threaded.
#pragma once

#include <memory>
#include <string>

#include "backend.h"
#include "common/result.h"
#include "loop/event_loop.h"

namespace kvmx::libvirt {

// Starts the libvirt thread (one per process); it connects on open().
// Fails when kvmx-hostd was built without libvirt.
Result<std::unique_ptr<Backend>> make_virt_backend(EventLoop& loop,
                                                   const std::string& uri);

}  // namespace kvmx::libvirt
