// What hostd needs from libvirt, behind an interface so that the lifecycle
// logic (Follower, DomainVm) runs against a fake in unit tests.  The real
// one (virt_backend.h) talks to libvirtd through libvirt's client library
// on a thread of its own.
//
// Everything is asynchronous: results and events are delivered on hostd's
// event loop, never from inside the call that asked for them, and in the
// order libvirt produced them.
#pragma once

#include <functional>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/result.h"
#include "qmp/client.h"

namespace kvmx::libvirt {

// The XML namespace of hostd's domain metadata (docs/libvirt.md):
//   <metadata><kvmx:hostd xmlns:kvmx="urn:kvmx:hostd:1" attach="yes"/>
inline constexpr const char* kMetadataUri = "urn:kvmx:hostd:1";

// One domain as libvirt reported it.
struct Domain {
  std::string name;
  std::string uuid;
  // hostd's metadata element as libvirt returns it
  // (virDomainGetMetadata(VIR_DOMAIN_METADATA_ELEMENT, kMetadataUri)),
  // nullopt when the domain has none.
  std::optional<std::string> metadata;
  // Reading the metadata failed for another reason than "there is none".
  std::string metadata_error;
};

enum class Lifecycle { kStarted, kResumed, kStopped, kOther };

struct LifecycleEvent {
  Domain domain;  // metadata only for kStarted and kResumed
  Lifecycle kind = Lifecycle::kOther;
  std::string what;  // for people: "started (booted)", "stopped (destroyed)"
};

class Backend {
 public:
  struct Callbacks {
    // open() succeeded: lifecycle and QEMU monitor events now arrive.
    std::function<void()> on_open;
    // open() failed, or the open connection closed (libvirtd exited,
    // keepalive timeout).  No events arrive until the next open().
    std::function<void(const std::string& why)> on_close;
    std::function<void(const LifecycleEvent&)> on_lifecycle;
    // KVMX_VIOLATION and KVMX_CHAN_REJECTED of any domain.
    std::function<void(const std::string& domain, const qmp::Event&)>
        on_monitor_event;
  };
  using ListFn = std::function<void(Result<std::vector<Domain>>)>;
  using ReplyFn = std::function<void(Result<nlohmann::json>)>;

  virtual ~Backend() = default;

  virtual void set_callbacks(Callbacks callbacks) = 0;
  // Connects (when not connected); on_open or on_close follows.
  virtual void open() = 0;
  // The running domains, with their metadata.
  virtual void list_running(ListFn fn) = 0;
  // Runs a QMP command on the domain's monitor through libvirt
  // (`arguments`: an object, empty for none): its "return" value, or an
  // error: vm-not-connected (no connection, no such domain, domain not
  // running), qmp-error (QEMU or libvirt refused it), timeout (libvirt
  // gave up waiting for the domain).
  virtual void qmp_command(const std::string& domain,
                           const std::string& command,
                           const nlohmann::json& arguments, ReplyFn fn) = 0;
};

}  // namespace kvmx::libvirt
