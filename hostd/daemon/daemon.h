// kvmx-hostd's core: owns the journal, the violation store, the VM registry
// and the API server, and connects them.  main.cc only parses flags, sets up
// logging and runs the loop.
#pragma once

#include <chrono>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "api/server.h"
#include "common/fd.h"
#include "common/result.h"
#include "config/config.h"
#include "journal/journal.h"
#include "libvirt/backend.h"
#include "libvirt/follower.h"
#include "loop/event_loop.h"
#include "violations/store.h"
#include "vm/manager.h"

namespace kvmx {

struct DaemonStats {
  uint64_t violations = 0;            // recorded since start
  uint64_t violation_events_bad = 0;  // malformed KVMX_VIOLATION events
  uint64_t chan_rejected = 0;         // KVMX_CHAN_REJECTED events
  uint64_t qmp_reconnects = 0;
  uint64_t journal_errors = 0;
  uint64_t compactions = 0;
  uint64_t replay_bad_records = 0;    // checksum fine, content not
  journal::ReplayStats replay;
};

class Daemon {
 public:
  Daemon(EventLoop& loop, config::Config cfg);
  ~Daemon();
  Daemon(const Daemon&) = delete;
  Daemon& operator=(const Daemon&) = delete;

  // Locks the state directory, replays the journal, listens on the API
  // socket, re-attaches the journal's VMs, handles SIGTERM/SIGINT and, with
  // a libvirt URI, starts following libvirt's domains.
  Result<void> start();
  // Clean shutdown: stops serving, syncs the journal, stops the loop.
  void stop(int code = 0);

 private:
  // daemon.cc: state and QMP side.
  Result<void> lock_state_dir();
  Result<void> open_journal();
  Result<void> watch_signals();
  Result<void> start_libvirt();
  void register_journal_vms();
  void replay(const nlohmann::json& rec);
  Result<void> journal_now(const nlohmann::json& rec);
  void on_vm_event(vm::Vm& vm, const qmp::Event& ev);
  void on_vm_state(vm::Vm& vm, vm::State old_state);
  void commit_pending();
  void maybe_compact();
  void compact(const char* why);
  uint64_t compact_threshold() const;

  // ops.cc: the API.
  void handle(api::ClientId client, const api::Request& req,
              api::ReplyFn reply);
  void op_attach(const api::Attach& a, api::ReplyFn reply);
  void finish_attach(const std::string& name, const vm::Settled& s,
                     api::ReplyFn reply);
  void op_detach(const api::Detach& d, api::ReplyFn reply);
  nlohmann::json list_vms() const;
  nlohmann::json vm_info(const vm::Vm& v) const;
  nlohmann::json violations(const api::Violations& q) const;
  nlohmann::json stats() const;

  EventLoop& loop_;
  config::Config cfg_;
  std::chrono::steady_clock::time_point started_;
  UniqueFd lock_fd_;
  UniqueFd signal_fd_;
  std::unique_ptr<journal::Journal> journal_;
  violations::Store store_;
  std::map<std::string, std::string> journal_vms_;  // replayed: name -> qmp
  struct JournalDomain {
    std::string uri;
    std::string uuid;
  };
  std::map<std::string, JournalDomain> journal_domains_;  // replayed libvirt
  std::unique_ptr<vm::Manager> vms_;
  // With libvirt-uri: libvirt's client (its own thread) and the lifecycle
  // logic on top of it.
  std::unique_ptr<libvirt::Backend> libvirt_;
  std::unique_ptr<libvirt::Follower> follower_;
  std::unique_ptr<api::Server> server_;
  std::vector<violations::Violation> pending_;  // written, not yet synced
  DaemonStats stats_;
  bool stopping_ = false;
};

}  // namespace kvmx
