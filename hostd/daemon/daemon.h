// kvmx-hostd's core: owns the journal, the violation store, the VM registry
// and the API server, and connects them.  main.cc only parses flags, sets up
// logging and runs the loop.
#pragma once

#include <chrono>
#include <deque>
#include <map>
#include <mutex>
#include <memory>
#include <set>
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
#include "common/log.h"
#include "loop/event_loop.h"
#include "loop/worker.h"
#include "migrate/file_job.h"
#include "migrate/job.h"
#include "purge/engine/engine.h"
#include "violations/store.h"
#include "vm/backoff.h"
#include "vm/manager.h"

namespace kvmx {

struct DaemonStats {
  uint64_t violations = 0;            // recorded since start
  uint64_t violations_lost = 0;       // never journaled (queue full, stop)
  uint64_t violation_events_bad = 0;  // malformed KVMX_VIOLATION events
  uint64_t chan_rejected = 0;         // KVMX_CHAN_REJECTED events
  uint64_t qmp_reconnects = 0;
  uint64_t journal_errors = 0;
  uint64_t compactions = 0;
  uint64_t replay_bad_records = 0;    // checksum fine, content not
  uint64_t replay_vms_skipped = 0;    // attach records over max-vms
  uint64_t compaction_failures = 0;
  uint64_t migrations = 0;            // migrate and migrate-recover jobs
  uint64_t migrations_completed = 0;
  uint64_t migrations_failed = 0;     // failed or cancelled
  uint64_t migrations_paused = 0;     // ended paused (post-copy)
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
  void on_vm_connecting(vm::Vm& vm);

  // daemon.cc: the journal's write path.  A violation is appended from
  // unwritten_ (seq assigned then, from a range reserved in the journal),
  // waits in pending_ for the round's sync, then becomes visible.  When
  // the journal fails (ENOSPC, EIO), hostd keeps what it has in unwritten_
  // (bounded), stops reading the VMs' QMP sockets and retries with backoff.
  void write_unwritten();
  Result<void> sync_journal();
  void journal_failed(const Error& e);
  void journal_recovered();
  void commit_pending();
  void lose_unwritten(const char* why);

  // Compaction: at start-up in place; later on the worker thread, retried
  // with backoff when it fails.
  void maybe_compact();
  void compact(const char* why);
  void start_compaction(const char* why);
  std::vector<nlohmann::json> registration_records() const;
  uint64_t compact_threshold() const;

  // Quarantine: a VM whose QMP input hostd was handling when it died.
  void clear_marker(const std::string& name);
  void quarantine_vm(vm::QmpVm& v, const std::string& why);

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

  // migrations.cc: migrate, migrate-postcopy, migrate-recover,
  // migrate-cancel, migrate-status.  One job per source VM; an ended one
  // stays (migrate-status, migrate-recover of a paused one) until the next
  // migration of that VM or its detach.  Not journaled: after a restart
  // hostd follows none (migrate-recover with dest=, and migrate-postcopy,
  // act on QEMU directly).
  struct Waiter {
    api::ClientId client;
    api::ReplyFn reply;
    bool wait;  // answered at the end (else once the migration began)
  };
  struct Migration {
    std::unique_ptr<migrate::Job> job;
    std::vector<Waiter> waiters;  // also get the job's events
  };
  void op_migrate(api::ClientId client, const api::Migrate& a,
                  api::ReplyFn reply);
  void op_migrate_postcopy(const api::MigratePostcopy& a, api::ReplyFn reply);
  void op_migrate_recover(api::ClientId client, const api::MigrateRecover& a,
                          api::ReplyFn reply);
  void op_migrate_cancel(const api::MigrateCancel& a, api::ReplyFn reply);
  void op_migrate_status(const api::MigrateStatus& a, api::ReplyFn reply);
  Result<void> migration_vm(const std::string& name, const char* role);
  Result<void> check_migration_uri(const std::string& uri) const;
  Result<std::string> migration_uri(const std::string& vm,
                                    const std::string& given) const;
  Result<void> room_for_migration(const std::string& vm);
  Migration& new_migration(const std::string& vm, const std::string& dest,
                           migrate::Settings s);
  void migration_event(const std::string& vm, const nlohmann::json& ev);
  void migration_started(const std::string& vm);
  void migration_ended(const std::string& vm);
  nlohmann::json migration_stats() const;
  // snapshot and restore: a migrate::FileJob per VM, kept like a
  // migration's until the next one of that VM or its detach.
  struct FileRun {
    std::unique_ptr<migrate::FileJob> job;
    std::vector<Waiter> waiters;
  };
  void op_snapshot(api::ClientId client, const api::Snapshot& a,
                   api::ReplyFn reply);
  void op_restore(api::ClientId client, const api::Restore& a,
                  api::ReplyFn reply);
  void start_file_job(api::ClientId client, const std::string& vm,
                      migrate::FileSettings s, bool wait, api::ReplyFn reply);
  void file_job_event(const std::string& vm, const nlohmann::json& ev);
  void file_job_started(const std::string& vm);
  void file_job_ended(const std::string& vm);

  // purge.cc: virtblock purging, one engine per NVDIMM backend.
  struct PurgeSlot {
    std::unique_ptr<purge::Engine> engine;
    std::unique_ptr<Worker> worker;  // destroyed first: its job uses engine
  };
  Result<void> watch_purge_faults();
  void op_purge_policy(const api::PurgePolicy& a, api::ReplyFn reply);
  void start_purge_engine(const std::string& key, const std::string& vm,
                          purge::EngineConfig c, api::ReplyFn reply);
  void op_purge_status(const api::PurgeStatus& a, api::ReplyFn reply);
  void op_purge_move(bool purge, const std::string& vm,
                     const std::string& nvdimm, uint64_t first,
                     uint64_t count, bool ignore_idle, api::ReplyFn reply);
  void drop_purges(const std::string& vm);
  // Journaled purge configurations ({"t":"purge"} records): an engine
  // starts again from them without QMP, which a QEMU whose main thread
  // waits on a purged block cannot answer.
  bool replay_purge(const nlohmann::json& rec);
  void forget_purge_configs(const std::string& vm);
  void start_journal_purges();
  void journal_purge_config(const std::string& key,
                            const purge::EngineConfig& c,
                            const purge::PolicyConfig& p);
  std::map<std::string, nlohmann::json> purge_configs_;  // "vm/nvdimm"
  nlohmann::json purge_stats() const;

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
  // Replayed: VMs quarantined (name -> why), and VMs whose "attaching"
  // marker was not cleared (hostd died while connecting to them).
  std::map<std::string, std::string> quarantined_;
  std::set<std::string> attaching_;
  // attach records over max-vms: not registered, kept in the journal.
  std::map<std::string, std::string> skipped_vms_;
  // Live "attaching" markers: VM -> connection number.
  std::map<std::string, uint64_t> markers_;
  uint64_t marker_gen_ = 0;
  std::unique_ptr<vm::Manager> vms_;
  std::map<std::string, Migration> migrations_;  // by source VM
  std::map<std::string, FileRun> file_jobs_;     // by VM
  // With libvirt-uri: libvirt's client (its own thread) and the lifecycle
  // logic on top of it.
  std::unique_ptr<libvirt::Backend> libvirt_;
  std::unique_ptr<libvirt::Follower> follower_;
  std::unique_ptr<api::Server> server_;
  std::deque<violations::Violation> unwritten_;  // not in the journal yet
  std::vector<violations::Violation> pending_;  // written, not yet synced
  std::map<std::string, uint64_t> lost_;        // per VM, since start
  bool degraded_ = false;                       // the journal fails
  std::string journal_error_;
  vm::Backoff journal_backoff_;
  EventLoop::TimerId journal_timer_ = 0;
  log::RateLimit journal_log_{std::chrono::seconds(10)};
  std::unique_ptr<Worker> compactor_;
  vm::Backoff compact_backoff_;
  std::chrono::steady_clock::time_point compact_not_before_{};
  DaemonStats stats_;
  bool stopping_ = false;
  // Engines' unrecoverable errors, handed to the loop through purge_event_.
  UniqueFd purge_event_;
  std::mutex purge_fatal_mu_;
  std::vector<std::pair<std::string, std::string>> purge_fatal_;
  std::map<std::string, PurgeSlot> purges_;  // "vm/nvdimm"; last: first gone
};

}  // namespace kvmx
