#include "virt_backend.h"

#include <libvirt/libvirt-qemu.h>
#include <libvirt/libvirt.h>
#include <libvirt/virterror.h>
#include <pthread.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <cstdlib>
#include <deque>
#include <functional>
#include <mutex>
#include <system_error>
#include <thread>
#include <vector>

#include "common/fd.h"
#include "common/json_util.h"
#include "common/log.h"

namespace kvmx::libvirt {
namespace {

using nlohmann::json;

std::string error_message(const char* fallback) {
  virErrorPtr e = virGetLastError();
  return e && e->message ? std::string(e->message) : std::string(fallback);
}

int error_code() {
  virErrorPtr e = virGetLastError();
  return e ? e->code : VIR_ERR_OK;
}

// libvirt's default error handler prints every error to stderr; hostd
// reports the ones that matter itself.
void quiet_errors(void*, virErrorPtr) {}

// libvirt's callback types differ from the generic one it takes: cast
// through void (*)(), which -Wcast-function-type accepts.
template <typename To, typename From>
To callback_cast(From fn) {
  return reinterpret_cast<To>(reinterpret_cast<void (*)()>(fn));
}

std::string detail_name(const char* const* names, size_t count, int detail) {
  if (detail >= 0 && static_cast<size_t>(detail) < count)
    return names[detail];
  return "detail " + std::to_string(detail);
}

Lifecycle describe(int event, int detail, std::string* what) {
  static const char* const kStarted[] = {"booted", "migrated", "restored",
                                         "from snapshot", "wakeup"};
  static const char* const kStopped[] = {"shut down", "destroyed", "crashed",
                                         "migrated away", "saved", "failed",
                                         "from snapshot"};
  static const char* const kResumed[] = {"unpaused", "migrated",
                                         "from snapshot", "post-copy",
                                         "post-copy failed"};
  switch (event) {
    case VIR_DOMAIN_EVENT_STARTED:
      *what = "started (" + detail_name(kStarted, std::size(kStarted), detail) + ")";
      return Lifecycle::kStarted;
    case VIR_DOMAIN_EVENT_STOPPED:
      *what = "stopped (" + detail_name(kStopped, std::size(kStopped), detail) + ")";
      return Lifecycle::kStopped;
    case VIR_DOMAIN_EVENT_RESUMED:
      *what = "resumed (" + detail_name(kResumed, std::size(kResumed), detail) + ")";
      return Lifecycle::kResumed;
    default:
      *what = "event " + std::to_string(event) + " detail " +
              std::to_string(detail);
      return Lifecycle::kOther;
  }
}

const char* close_reason(int reason) {
  switch (reason) {
    case VIR_CONNECT_CLOSE_REASON_ERROR: return "I/O error on the connection";
    case VIR_CONNECT_CLOSE_REASON_EOF: return "libvirtd closed the connection";
    case VIR_CONNECT_CLOSE_REASON_KEEPALIVE:
      return "libvirtd stopped answering keepalives";
    case VIR_CONNECT_CLOSE_REASON_CLIENT: return "closed by hostd";
    default: return "connection closed";
  }
}

// Blocks every signal in the calling thread while alive: the libvirt thread
// inherits that mask, so hostd's signals (signalfd) stay on the main thread.
class BlockSignals {
 public:
  BlockSignals() {
    sigset_t all;
    sigfillset(&all);
    ::pthread_sigmask(SIG_SETMASK, &all, &old_);
  }
  ~BlockSignals() { ::pthread_sigmask(SIG_SETMASK, &old_, nullptr); }

 private:
  sigset_t old_;
};

void drain_eventfd(int fd) {
  uint64_t n;
  while (::read(fd, &n, sizeof(n)) == sizeof(n)) {
  }
}

void kick(int fd) {
  uint64_t one = 1;
  (void)!::write(fd, &one, sizeof(one));
}

class VirtBackend final : public Backend {
 public:
  VirtBackend(EventLoop& loop, std::string uri)
      : loop_(loop), uri_(std::move(uri)) {}
  ~VirtBackend() override;

  Result<void> start();

  void set_callbacks(Callbacks callbacks) override {
    cb_ = std::move(callbacks);
  }
  void open() override {
    post([this] { w_open(); });
  }
  void list_running(ListFn fn) override {
    post([this, fn = std::move(fn)]() mutable {
      auto r = w_list();
      deliver([fn = std::move(fn), r = std::move(r)]() mutable {
        fn(std::move(r));
      });
    });
  }
  void qmp_command(const std::string& domain, const std::string& command,
                   const json& arguments, ReplyFn fn) override {
    post([this, domain, command, arguments, fn = std::move(fn)]() mutable {
      auto r = w_command(domain, command, arguments);
      deliver([fn = std::move(fn), r = std::move(r)]() mutable {
        fn(std::move(r));
      });
    });
  }

 private:
  using Job = std::function<void()>;

  // Main thread → libvirt thread.
  void post(Job job) {
    {
      std::lock_guard lock(mu_);
      jobs_.push_back(std::move(job));
    }
    kick(to_worker_.get());
  }
  // libvirt thread → main thread.
  void deliver(Job job) {
    {
      std::lock_guard lock(mu_);
      results_.push_back(std::move(job));
    }
    kick(to_main_.get());
  }
  void run_results();

  // The libvirt thread.
  void run();
  void run_jobs();
  void w_open();
  void w_close();
  void w_lost(uint64_t serial, const std::string& why);
  Result<std::vector<Domain>> w_list();
  Domain w_domain(virDomainPtr dom, bool with_metadata);
  Result<json> w_command(const std::string& domain, const std::string& command,
                         const json& arguments);

  static void on_wake(int watch, int fd, int events, void* opaque);
  static void on_conn_close(virConnectPtr conn, int reason, void* opaque);
  static int on_lifecycle(virConnectPtr conn, virDomainPtr dom, int event,
                          int detail, void* opaque);
  static void on_monitor(virConnectPtr conn, virDomainPtr dom,
                         const char* event, long long seconds,
                         unsigned int micros, const char* details,
                         void* opaque);

  // Main thread only.
  EventLoop& loop_;
  const std::string uri_;
  Callbacks cb_;
  UniqueFd to_main_;
  std::thread thread_;

  // Shared: the queues under mu_; to_worker_ is set before the thread
  // starts and not changed while it runs.
  std::mutex mu_;
  std::deque<Job> jobs_;
  std::deque<Job> results_;
  UniqueFd to_worker_;

  // libvirt thread only.
  bool quit_ = false;
  virConnectPtr conn_ = nullptr;
  uint64_t serial_ = 0;  // of conn_; a close callback names the one it saw
  int lifecycle_id_ = -1;
  std::vector<int> monitor_ids_;
};

Result<void> VirtBackend::start() {
  static std::once_flag once;
  static int registered = -1;
  static std::string why;
  std::call_once(once, [] {
    virSetErrorFunc(nullptr, quiet_errors);
    registered = virEventRegisterDefaultImpl();
    if (registered < 0) why = error_message("unknown error");
  });
  if (registered < 0)
    return make_error("libvirt", "Failed to set up libvirt's event loop: " + why);

  to_worker_ = UniqueFd(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  to_main_ = UniqueFd(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!to_worker_ || !to_main_)
    return sys_error("libvirt", "Failed to create an eventfd");
  if (auto r = loop_.add(to_main_.get(), EPOLLIN,
                         [this](uint32_t) { run_results(); });
      !r)
    return r;
  try {
    BlockSignals blocked;
    thread_ = std::thread([this] { run(); });
  } catch (const std::system_error& e) {
    loop_.remove(to_main_.get());
    return make_error("libvirt", std::string("Failed to start the libvirt "
                                             "thread: ") + e.what());
  }
  return {};
}

VirtBackend::~VirtBackend() {
  if (thread_.joinable()) {
    post([this] { quit_ = true; });
    thread_.join();
  }
  if (to_main_) loop_.remove(to_main_.get());
  // Whatever was not delivered is dropped here, on the main thread.
}

void VirtBackend::run_results() {
  drain_eventfd(to_main_.get());
  std::deque<Job> batch;
  {
    std::lock_guard lock(mu_);
    batch.swap(results_);
  }
  for (auto& job : batch) {
    try {
      job();
    } catch (const std::exception& e) {
      log::error("Unhandled exception in a libvirt callback, ignored",
                 {{"what", e.what()}});
    }
  }
}

void VirtBackend::run() {
  int watch = virEventAddHandle(to_worker_.get(), VIR_EVENT_HANDLE_READABLE,
                                on_wake, this, nullptr);
  if (watch < 0) {
    std::string why = "Failed to watch the libvirt thread's eventfd: " +
                      error_message("unknown error");
    deliver([this, why] {
      log::error("libvirt thread stopped", {{"error", why}});
      if (cb_.on_close) cb_.on_close(why);
    });
    return;
  }
  while (!quit_) {
    if (virEventRunDefaultImpl() < 0) {
      std::string why = "libvirt's event loop failed: " +
                        error_message("unknown error");
      deliver([this, why] {
        log::error("libvirt thread stopped", {{"error", why}});
        if (cb_.on_close) cb_.on_close(why);
      });
      break;
    }
  }
  w_close();
  virEventRemoveHandle(watch);
}

void VirtBackend::on_wake(int, int, int, void* opaque) {
  auto* self = static_cast<VirtBackend*>(opaque);
  drain_eventfd(self->to_worker_.get());
  self->run_jobs();
}

void VirtBackend::run_jobs() {
  for (;;) {
    std::deque<Job> batch;
    {
      std::lock_guard lock(mu_);
      batch.swap(jobs_);
    }
    if (batch.empty()) return;
    for (auto& job : batch) {
      try {
        job();
      } catch (const std::exception& e) {
        log::error("Unhandled exception on the libvirt thread, ignored",
                   {{"what", e.what()}});
      }
      if (quit_) return;
    }
  }
}

void VirtBackend::w_open() {
  w_close();  // a connection whose close we have not seen yet
  virResetLastError();
  virConnectPtr conn = virConnectOpen(uri_.c_str());
  if (!conn) {
    std::string why = error_message("virConnectOpen failed");
    deliver([this, why] {
      if (cb_.on_close) cb_.on_close(why);
    });
    return;
  }
  conn_ = conn;
  serial_++;
  std::string why;
  if (virConnectRegisterCloseCallback(conn_, on_conn_close, this, nullptr) < 0)
    why = "virConnectRegisterCloseCallback: " + error_message("failed");
  // A libvirtd that hangs is noticed within 5 s * (3 + 1).
  if (why.empty() && virConnectSetKeepAlive(conn_, 5, 3) < 0)
    why = "virConnectSetKeepAlive: " + error_message("failed");
  if (why.empty()) {
    lifecycle_id_ = virConnectDomainEventRegisterAny(
        conn_, nullptr, VIR_DOMAIN_EVENT_ID_LIFECYCLE,
        callback_cast<virConnectDomainEventGenericCallback>(on_lifecycle),
        this, nullptr);
    if (lifecycle_id_ < 0)
      why = "lifecycle events: " + error_message("failed");
  }
  for (const char* name : {"KVMX_VIOLATION", "KVMX_CHAN_REJECTED"}) {
    if (!why.empty()) break;
    int id = virConnectDomainQemuMonitorEventRegister(conn_, nullptr, name,
                                                      on_monitor, this,
                                                      nullptr, 0);
    if (id < 0)
      why = std::string("QEMU monitor event ") + name + ": " +
            error_message("failed");
    else
      monitor_ids_.push_back(id);
  }
  if (!why.empty()) {
    w_close();
    deliver([this, why] {
      if (cb_.on_close) cb_.on_close(why);
    });
    return;
  }
  deliver([this] {
    if (cb_.on_open) cb_.on_open();
  });
}

void VirtBackend::w_close() {
  if (!conn_) return;
  for (int id : monitor_ids_)
    virConnectDomainQemuMonitorEventDeregister(conn_, id);
  monitor_ids_.clear();
  if (lifecycle_id_ >= 0)
    virConnectDomainEventDeregisterAny(conn_, lifecycle_id_);
  lifecycle_id_ = -1;
  virConnectUnregisterCloseCallback(conn_, on_conn_close);
  virConnectClose(conn_);
  conn_ = nullptr;
}

void VirtBackend::on_conn_close(virConnectPtr conn, int reason, void* opaque) {
  auto* self = static_cast<VirtBackend*>(opaque);
  if (conn != self->conn_) return;
  // Not from inside libvirt's callback: the connection is closed (and its
  // callbacks deregistered) by a job of our own, right after it.
  std::string why = close_reason(reason);
  uint64_t serial = self->serial_;
  self->post([self, serial, why] { self->w_lost(serial, why); });
}

void VirtBackend::w_lost(uint64_t serial, const std::string& why) {
  if (!conn_ || serial != serial_) return;  // already closed or reopened
  w_close();
  deliver([this, why] {
    if (cb_.on_close) cb_.on_close(why);
  });
}

Domain VirtBackend::w_domain(virDomainPtr dom, bool with_metadata) {
  Domain d;
  if (const char* name = virDomainGetName(dom)) d.name = name;
  char uuid[VIR_UUID_STRING_BUFLEN];
  if (virDomainGetUUIDString(dom, uuid) == 0) d.uuid = uuid;
  if (!with_metadata) return d;
  virResetLastError();
  char* xml = virDomainGetMetadata(dom, VIR_DOMAIN_METADATA_ELEMENT,
                                   kMetadataUri, VIR_DOMAIN_AFFECT_CURRENT);
  if (xml) {
    d.metadata = xml;
    std::free(xml);
  } else if (error_code() != VIR_ERR_NO_DOMAIN_METADATA) {
    d.metadata_error = error_message("virDomainGetMetadata failed");
  }
  return d;
}

Result<std::vector<Domain>> VirtBackend::w_list() {
  if (!conn_) return make_error("libvirt", "not connected to libvirt");
  virDomainPtr* doms = nullptr;
  int n = virConnectListAllDomains(conn_, &doms,
                                   VIR_CONNECT_LIST_DOMAINS_ACTIVE);
  if (n < 0)
    return make_error("libvirt", "virConnectListAllDomains: " +
                                     error_message("failed"));
  std::vector<Domain> out;
  for (int i = 0; i < n; i++) {
    out.push_back(w_domain(doms[i], true));
    virDomainFree(doms[i]);
  }
  std::free(doms);
  return out;
}

Result<json> VirtBackend::w_command(const std::string& domain,
                                    const std::string& command,
                                    const json& arguments) {
  if (!conn_) return make_error("vm-not-connected", "not connected to libvirt");
  virResetLastError();
  virDomainPtr dom = virDomainLookupByName(conn_, domain.c_str());
  if (!dom)
    return make_error("vm-not-connected",
                      "libvirt: " + error_message("no such domain"));
  json req{{"execute", command}};
  if (arguments.is_object() && !arguments.empty()) req["arguments"] = arguments;
  std::string cmd = req.dump();
  char* out = nullptr;
  int rc = virDomainQemuMonitorCommand(dom, cmd.c_str(), &out, 0);
  int code = rc < 0 ? error_code() : VIR_ERR_OK;
  std::string why = rc < 0 ? error_message("monitor command failed") : "";
  virDomainFree(dom);
  if (rc < 0) {
    switch (code) {
      case VIR_ERR_OPERATION_TIMEOUT:
        return make_error("timeout", "libvirt: " + why);
      case VIR_ERR_OPERATION_INVALID:  // domain is not running
      case VIR_ERR_NO_DOMAIN:
      case VIR_ERR_NO_CONNECT:
      case VIR_ERR_RPC:
      case VIR_ERR_SYSTEM_ERROR:
        return make_error("vm-not-connected", "libvirt: " + why);
      default:
        return make_error("qmp-error", "libvirt: " + why);
    }
  }
  std::string text = out ? out : "";
  std::free(out);
  // Bounded like hostd's own QMP client: depth costs stack, values memory.
  auto parsed = parse_json(text, JsonLimits{qmp::Client::kMaxDepth,
                                            qmp::Client::kMaxValues});
  if (!parsed)
    return make_error("qmp-error", "libvirt relayed a reply to " + command +
                                       " that hostd refuses: " +
                                       parsed.error().message);
  json reply = std::move(*parsed);
  if (!reply.is_object())
    return make_error("qmp-error", "libvirt relayed a reply to " + command +
                                       " that is not a JSON object");
  if (auto it = reply.find("return"); it != reply.end())
    return Result<json>(std::move(*it));
  const json err = reply.value("error", json::object());
  std::string cls = err.is_object() && err.contains("class") &&
                            err["class"].is_string()
                        ? err["class"].get<std::string>()
                        : "GenericError";
  std::string desc = err.is_object() && err.contains("desc") &&
                             err["desc"].is_string()
                         ? err["desc"].get<std::string>()
                         : "no return value";
  return make_error("qmp-error", cls + ": " + desc);
}

int VirtBackend::on_lifecycle(virConnectPtr, virDomainPtr dom, int event,
                              int detail, void* opaque) {
  auto* self = static_cast<VirtBackend*>(opaque);
  LifecycleEvent ev;
  ev.kind = describe(event, detail, &ev.what);
  if (ev.kind == Lifecycle::kOther) return 0;
  // The opt-in is read now, while the domain runs (an RPC from inside an
  // event callback is fine with libvirt's client library).
  ev.domain = self->w_domain(dom, ev.kind != Lifecycle::kStopped);
  self->deliver([self, ev = std::move(ev)] {
    if (self->cb_.on_lifecycle) self->cb_.on_lifecycle(ev);
  });
  return 0;
}

void VirtBackend::on_monitor(virConnectPtr, virDomainPtr dom,
                             const char* event, long long seconds,
                             unsigned int micros, const char* details,
                             void* opaque) {
  auto* self = static_cast<VirtBackend*>(opaque);
  qmp::Event ev;
  ev.name = event ? event : "";
  ev.seconds = seconds;
  ev.micros = micros;
  // `details` is the event's "data" as JSON text (NULL without data).
  if (details) {
    auto parsed = parse_json(details, JsonLimits{qmp::Client::kMaxDepth,
                                                 qmp::Client::kMaxValues});
    if (parsed) ev.data = std::move(*parsed);
  }
  if (!ev.data.is_object()) ev.data = json::object();
  const char* name = virDomainGetName(dom);
  std::string domain = name ? name : "";
  self->deliver([self, domain, ev = std::move(ev)] {
    if (self->cb_.on_monitor_event) self->cb_.on_monitor_event(domain, ev);
  });
}

}  // namespace

Result<std::unique_ptr<Backend>> make_virt_backend(EventLoop& loop,
                                                   const std::string& uri) {
  auto b = std::make_unique<VirtBackend>(loop, uri);
  if (auto r = b->start(); !r) return r.error();
  return std::unique_ptr<Backend>(std::move(b));
}

}  // namespace kvmx::libvirt
