// An attached VM.  `Vm` is what the registry, the API and the journal see
// of any VM; `QmpVm` is one hostd reaches over a QMP socket of its own (the
// attach op); libvirt domains are libvirt::DomainVm (hostd/libvirt).
//
// QmpVm:
//   connecting ──handshake+query-kvmx-chan──► attached
//       │  ▲                                     │ EOF / error / timeout
//       ▼  └──── retry (backoff) ◄── disconnected ◄┘
//                                      │ socket file gone
//                                      ▼
//                                     gone (no more retries)
//
//   quarantined: registered from the journal but not connected, because
//   hostd died while it handled this VM's QMP input (its peer may be what
//   crashed it); only an explicit attach (reconnect_now) leaves it.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "backoff.h"
#include "common/fd.h"
#include "common/result.h"
#include "loop/event_loop.h"
#include "qmp/client.h"
#include "qmp/unix_transport.h"

namespace kvmx::vm {

// kStopped is for libvirt domains only: the domain does not run (or runs
// without opting in), hostd expects no events from it until it starts.
enum class State {
  kConnecting, kAttached, kDisconnected, kGone, kStopped, kQuarantined
};
const char* to_string(State s);

// How hostd reaches the VM: its own QMP socket, or libvirt.
enum class Source { kQmp, kLibvirt };
const char* to_string(Source s);

struct Options {
  std::chrono::milliseconds handshake_timeout{10000};
  std::chrono::milliseconds command_timeout{10000};
  std::chrono::milliseconds backoff_min{100};
  std::chrono::milliseconds backoff_max{5000};
  // What one VM's peer can make hostd hold: a QMP message (the line being
  // read, and the document parsed from it), and the query-kvmx-chan answer
  // kept as `devices` (its JSON text size).
  size_t max_qmp_message = qmp::Client::kDefaultMaxLine;
  size_t max_devices_bytes = 1 << 20;
};

class Vm;

struct Hooks {
  // Every QMP event of the VM.
  std::function<void(Vm&, const qmp::Event&)> on_event;
  // After every state change.
  std::function<void(Vm&, State old_state)> on_state;
  // A connection to the VM's QMP socket is open and nothing has been read
  // from it yet (QmpVm only).
  std::function<void(Vm&)> on_connecting;
};

// How an attach wait ended.
struct Settled {
  enum Kind { kAttached, kFailed, kTimeout, kRemoved } kind;
  std::string error;
};

class Vm {
 public:
  virtual ~Vm() = default;
  Vm(const Vm&) = delete;
  Vm& operator=(const Vm&) = delete;

  virtual Source source() const = 0;
  // Where hostd reaches it, for logs: the QMP socket path, or the libvirt
  // URI and domain.
  virtual std::string origin() const = 0;

  // Runs query-kvmx-chan; `fn` gets the device list, or an error:
  // vm-not-connected, qmp-error, timeout.  `fn` may run inside this call.
  virtual void query_protections(
      std::function<void(Result<nlohmann::json>)> fn) = 0;

  virtual uint64_t protocol_errors() const { return 0; }

  // Runs a QMP command on the VM's monitor, whichever way hostd reaches
  // it (its own QMP socket, or libvirt's monitor): `fn` gets the return
  // value, or an error: vm-not-connected, qmp-error, timeout.  `fn` may
  // run inside this call.
  virtual void monitor_command(const std::string& command,
                               const nlohmann::json& arguments,
                               std::function<void(Result<nlohmann::json>)> fn) = 0;

  // list-vms fields: vm, source, state, since, qemu, devices, reconnects,
  // rejected, last_error (and what the kind of VM adds).
  virtual nlohmann::json info() const;

  const std::string& name() const { return name_; }
  State state() const { return state_; }
  const nlohmann::json& devices() const { return devices_; }
  // Why `devices` is null although QEMU answered ("" otherwise).
  const std::string& devices_error() const { return devices_error_; }
  uint64_t connects() const { return connects_; }
  uint64_t reconnects() const { return connects_ > 1 ? connects_ - 1 : 0; }
  uint64_t rejected() const { return rejected_; }
  const std::string& last_error() const { return last_error_; }

  // Whether the VM is in the journal (false while a fresh attach is still
  // being tried).
  bool persisted = false;
  // Bound on the query-kvmx-chan answer kept and relayed (Options).
  size_t max_devices_bytes = Options{}.max_devices_bytes;

 protected:
  Vm(EventLoop& loop, std::string name, const Hooks& hooks, State initial);

  void set_state(State s, std::string error = "");
  // Hands a QMP event to the hooks (and counts KVMX_CHAN_REJECTED).
  void deliver(const qmp::Event& ev);
  // Keeps a query-kvmx-chan answer as `devices`, or null with
  // devices_error_ when it is over max_devices_bytes.
  void keep_devices(nlohmann::json&& answer);
  // A query-kvmx-chan answer for `protections`: over max_devices_bytes it
  // is the error response-too-large.
  Result<nlohmann::json> bound_answer(Result<nlohmann::json>&& r) const;

  EventLoop& loop_;
  std::string name_;
  const Hooks& hooks_;
  State state_;
  std::string since_;
  std::string last_error_;
  std::string qemu_version_;
  nlohmann::json devices_;
  std::string devices_error_;
  uint64_t connects_ = 0;
  uint64_t rejected_ = 0;
};

// A VM reached over its own QMP socket.
class QmpVm final : public Vm {
 public:
  QmpVm(EventLoop& loop, std::string name, std::string qmp_path,
        const Options& options, const Hooks& hooks);
  ~QmpVm() override;

  Source source() const override { return Source::kQmp; }
  std::string origin() const override { return path_; }
  void query_protections(
      std::function<void(Result<nlohmann::json>)> fn) override;
  uint64_t protocol_errors() const override;
  void monitor_command(const std::string& command,
                       const nlohmann::json& arguments,
                       std::function<void(Result<nlohmann::json>)> fn) override {
    execute(command, arguments, std::move(fn));
  }
  // Adds qmp (the socket path).
  nlohmann::json info() const override;

  // Runs a QMP command (the migration's); `fn` gets its return value or an
  // error: vm-not-connected (not attached, or the connection dropped
  // during the command), qmp-error, timeout (command_timeout).  `fn` may
  // run inside this call.
  // `oob`: out of band when QEMU allows it (qmp::Client::execute).
  void execute(const std::string& command, const nlohmann::json& arguments,
               std::function<void(Result<nlohmann::json>)> fn,
               bool oob = false);

  // Starts on an already connected socket, or connects when `fd` is empty.
  void start(UniqueFd fd);
  // Registered but not connected: hostd died while handling this VM's
  // input.  `why` becomes last_error.
  void quarantine(const std::string& why);
  // Connects now unless connected or connecting (resets the backoff);
  // also leaves quarantine.
  void reconnect_now();
  // Back-pressure: stop (true) or resume reading the QMP socket.
  void set_input_paused(bool paused);

  // Calls `fn` (from the event loop, never from inside this call) when the
  // VM next becomes attached or fails to, or after `timeout`.
  void when_settled(std::chrono::milliseconds timeout,
                    std::function<void(const Settled&)> fn);

  const std::string& qmp_path() const { return path_; }
  // The errno of the last failed connect since the last connection (0:
  // none).  ECONNREFUSED: nothing listens on the socket, QEMU is gone even
  // if its socket file is not.
  int connect_errno() const { return connect_errno_; }

 private:
  struct Conn {
    std::unique_ptr<qmp::UnixTransport> transport;
    std::unique_ptr<qmp::Client> client;
  };
  struct Waiter {
    uint64_t id;
    EventLoop::TimerId timer;
    std::function<void(const Settled&)> fn;
  };

  void connect_now();
  void open(UniqueFd fd);
  void on_ready(uint64_t gen);
  void on_closed(uint64_t gen, const std::string& reason);
  void retire_conn();
  void schedule_retry();
  void settle(const Settled& result);
  bool ready() const;

  std::string path_;
  Options options_;
  Backoff backoff_;
  std::unique_ptr<Conn> conn_;
  uint64_t gen_ = 0;  // connection generation; stale callbacks check it
  EventLoop::TimerId handshake_timer_ = 0;
  EventLoop::TimerId retry_timer_ = 0;
  std::vector<Waiter> waiters_;
  uint64_t next_waiter_ = 1;
  uint64_t old_protocol_errors_ = 0;
  bool destroying_ = false;
  bool input_paused_ = false;
  int connect_errno_ = 0;
};

}  // namespace kvmx::vm
