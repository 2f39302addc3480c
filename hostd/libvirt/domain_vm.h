// A libvirt domain in hostd's VM registry.  libvirt owns QEMU's monitor, so
// hostd reaches it through libvirt (Backend): commands with
// virDomainQemuMonitorCommand, events relayed by the Follower.  The
// Follower drives its state from libvirt's lifecycle events:
//
//   disconnected (from the journal, or libvirt connection lost)
//        │ resync: running and opted in         │ resync: not running
//        ▼                                       ▼
//   connecting ──query-version, query-kvmx-chan──► attached
//        │ ▲                                        │ STOPPED event
//        │ └──────────── STARTED event ◄─ stopped ◄─┘
//        └─ domain not running ────────────► stopped
#pragma once

#include <chrono>
#include <map>
#include <memory>
#include <string>

#include "backend.h"
#include "vm/vm.h"

namespace kvmx::libvirt {

class DomainVm final : public vm::Vm {
 public:
  // `backend` null: hostd runs without --libvirt (a domain from the
  // journal); the VM stays stopped.
  DomainVm(EventLoop& loop, std::string name, std::string uri,
           const vm::Hooks& hooks, Backend* backend,
           std::chrono::milliseconds command_timeout);
  ~DomainVm() override;

  vm::Source source() const override { return vm::Source::kLibvirt; }
  std::string origin() const override;
  void query_protections(
      std::function<void(Result<nlohmann::json>)> fn) override;
  // Through libvirt's monitor (virDomainQemuMonitorCommand), while the
  // domain is attached; vm-not-connected otherwise.
  void monitor_command(const std::string& command,
                       const nlohmann::json& arguments,
                       std::function<void(Result<nlohmann::json>)> fn) override;
  // Adds "qmp": null and "libvirt": {"uri", "uuid"}.
  nlohmann::json info() const override;

  // The domain runs and opts in: connecting, then attached once
  // query-kvmx-chan answered (stopped if the domain turns out not to run).
  // Nothing when it is already connecting or attached.
  void attach(const std::string& uuid);
  // The domain stopped (or runs without opting in): no events expected.
  void stop(const std::string& why);
  // The libvirt connection is down: nothing known until the next resync.
  void lose(const std::string& why);
  // A QEMU event of the domain: handed on while connecting or attached.
  void on_monitor_event(const qmp::Event& ev);

  bool following() const {
    return state_ == vm::State::kConnecting || state_ == vm::State::kAttached;
  }
  const std::string& uri() const { return uri_; }
  const std::string& uuid() const { return uuid_; }
  void set_uuid(const std::string& uuid) { uuid_ = uuid; }

 private:
  struct Pending {
    EventLoop::TimerId timer = 0;
    Backend::ReplyFn fn;
  };
  // A QMP command through the backend, with command_timeout.
  void command(const std::string& cmd, Backend::ReplyFn fn) {
    command(cmd, nlohmann::json::object(), std::move(fn));
  }
  void command(const std::string& cmd, const nlohmann::json& arguments,
               Backend::ReplyFn fn);
  void finish(uint64_t id, Result<nlohmann::json> result);

  std::string uri_;
  std::string uuid_;
  Backend* backend_;
  std::chrono::milliseconds timeout_;
  uint64_t gen_ = 0;  // attach generation; stale replies check it
  uint64_t next_cmd_ = 1;
  std::map<uint64_t, Pending> pending_;
  std::shared_ptr<bool> alive_ = std::make_shared<bool>(true);
};

}  // namespace kvmx::libvirt
