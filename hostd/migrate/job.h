// One migration between two QEMUs that hostd reaches over QMP: the source
// and the destination (started with -incoming defer).  The job checks both,
// sets the capabilities and parameters on both, makes the destination
// listen, starts the migration, samples it (query-migrate on both) every
// `interval`, switches to post-copy by its SwitchPolicy or on request,
// recovers a paused post-copy, and ends in one of completed, failed,
// cancelled or paused.
//
//   preparing ─► precopy ─► switching ─► postcopy ─────────────► completed
//       │           │                     │  ▲                     
//       │           │                     ▼  │ migrate-recover +   
//       │           │                   paused ─► recovering       
//       ▼           ▼                     │ (no attempts left)     
//     failed   failed/cancelled/completed ▼                        
//                                       paused (ended; migrate-recover
//                                       starts it again)
//
// It knows nothing of the registry or the API: QEMUs are Endpoints.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/result.h"
#include "loop/event_loop.h"
#include "dedup.h"
#include "policy.h"

namespace kvmx::migrate {

using ReplyFn = std::function<void(Result<nlohmann::json>)>;

// A QEMU the job talks to.
class Endpoint {
 public:
  virtual ~Endpoint() = default;
  virtual const std::string& name() const = 0;
  // Runs a QMP command; `fn` gets the return value or an error (codes
  // vm-not-found, vm-not-connected, qmp-error, timeout).  Never calls `fn`
  // inside this call.  `oob`: out of band where QEMU allows it (a paused
  // post-copy destination may not run anything else).
  virtual void command(const std::string& cmd, const nlohmann::json& args,
                       ReplyFn fn, bool oob = false) = 0;
  // Why this QEMU cannot be reached any more, for good (its VM was
  // detached, its QMP socket is gone because QEMU exited), or "".
  virtual std::string lost() const = 0;
};

enum class State {
  kPreparing, kPrecopy, kSwitching, kPostcopy, kPaused, kRecovering,
  kCompleted, kFailed, kCancelled
};
const char* to_string(State s);

struct Settings {
  std::string uri;          // of the migration stream
  std::string recover_uri;  // where the destination listens to recover
  bool postcopy = false;
  std::string prefetch = "off";  // off, pattern, page-table, both
  // "rdma": QEMU's postcopy-rdma on both (post-copy faults served by RDMA
  // READ); QEMU falls back to the stream by itself and says why.
  std::string transport = "tcp";
  bool shared_storage = false;
  DedupMode disk_dedup = DedupMode::kAuto;  // dedup.h
  // 0: multifd off (set off on both: a QEMU that was the destination of a
  // multifd migration keeps it on); else its channels, on both.
  uint32_t multifd_channels = 0;
  PolicyConfig policy;
  std::optional<uint64_t> max_bandwidth;
  std::optional<uint64_t> max_postcopy_bandwidth;
  std::optional<uint64_t> downtime_limit_ms;
  uint32_t recover_attempts = 3;
  std::chrono::milliseconds interval{1000};
  // Without an answer from the source for this long the job gives up
  // (QEMU's migration goes on; the job cannot follow it).
  std::chrono::milliseconds lost_contact{60000};
  // How long the destination may take to notice a broken post-copy
  // stream before a recovery attempt counts as failed.
  std::chrono::milliseconds dest_pause_wait{30000};
  std::chrono::milliseconds recover_backoff_min{1000};
  std::chrono::milliseconds recover_backoff_max{30000};
  // Checks a URI before a QEMU listens on it ("" or why not); none: all.
  std::function<std::string(const std::string& uri)> check_uri;
};

// The file-backed memory backends a QEMU has (qom-list /objects).
struct Backend {
  std::string id;
  std::string path;
  bool share = false;
};
// Whether two backend paths are the same file on this host: kSame or
// kDifferent by device and inode; kUnknown when either cannot be looked at
// (a QEMU on another host, whose QMP socket reaches this one).
enum class Identity { kSame, kDifferent, kUnknown };
Identity same_file(const std::string& a, const std::string& b);
// The check of --shared-storage against what both QEMUs map: "" when
// consistent, else why not.  `shared_disks`: disk-dedup is on, so the
// shared storage is (also) that of the disks, and no shared memory backend
// is needed.
std::string check_storage(const std::vector<Backend>& src,
                          const std::vector<Backend>& dst, bool shared_storage,
                          const std::string& src_name,
                          const std::string& dst_name,
                          bool shared_disks = false);

class Job {
 public:
  struct Callbacks {
    // Progress (every interval) and transitions: the snapshot and a
    // "message" ("" for a plain sample).
    std::function<void(const nlohmann::json& event)> on_event;
    // The source accepted `migrate` (or, recovering, `migrate resume`).
    std::function<void()> on_started;
    // The job ended: outcome() says how.
    std::function<void()> on_end;
  };

  Job(EventLoop& loop, Settings settings, std::unique_ptr<Endpoint> src,
      std::unique_ptr<Endpoint> dst, Callbacks cb);
  ~Job();
  Job(const Job&) = delete;
  Job& operator=(const Job&) = delete;

  // Starts a new migration.
  void start();
  // Recovers a paused post-copy: this job's (ended paused, or waiting for
  // its next automatic attempt), or, on a job made for it and not started,
  // one QEMU has paused (hostd did not start it, or was restarted since).
  // `uri` "": the settings' recover_uri.  One attempt (then the automatic
  // ones left); fails back to paused.  Refused (migration-refused) in
  // any other state.
  Result<void> recover(const std::string& uri);
  // migrate-start-postcopy now.  `fn` gets {"switching": true} or an error.
  void switch_now(const std::string& why, ReplyFn fn);
  // migrate_cancel while precopy runs.
  void cancel(ReplyFn fn);

  State state() const { return state_; }
  bool ended() const { return ended_; }
  // Ended: the final snapshot (completed) or the error (failed, cancelled,
  // paused: codes migration-failed, -cancelled, -paused, or what a check
  // refused with).
  Result<nlohmann::json> outcome() const;
  nlohmann::json snapshot() const;
  const Settings& settings() const { return s_; }
  const std::string& source() const { return src_->name(); }
  const std::string& dest() const { return dst_->name(); }

 private:
  using Cmd = std::pair<std::string, nlohmann::json>;
  using SeqFn = std::function<void(Result<std::vector<nlohmann::json>>)>;

  // Runs `cmds` in order; `fn` gets every answer or the first error (its
  // message prefixed with the VM and the command).
  void seq(Endpoint& ep, std::vector<Cmd> cmds, SeqFn fn);
  void both(std::vector<Cmd> src_cmds, std::vector<Cmd> dst_cmds,
            std::function<void(Result<std::vector<nlohmann::json>>,
                               Result<std::vector<nlohmann::json>>)> fn);
  // A callback that runs only while this job lives and its generation is
  // the same (end() and recover() start a new one).
  template <typename Fn>
  auto guard(Fn fn);

  void probe();
  void check(const std::vector<nlohmann::json>& src,
             const std::vector<nlohmann::json>& dst);
  void probe_dedup();
  void probe_backends();
  void backends_of(Endpoint& ep,
                   std::function<void(Result<std::vector<Backend>>)> fn);
  void configure();
  void begin();

  void arm_poll();
  void poll();
  void sample(Result<nlohmann::json> src);
  void absorb(const nlohmann::json& info);
  void with_dest_stats(std::function<void()> then);
  std::string dedup_summary() const;
  void absorb_rdma(const nlohmann::json& info, bool dest);
  std::string rdma_summary() const;
  void on_paused(const std::string& why);
  void try_recover(std::chrono::steady_clock::time_point dest_deadline);
  void listen_and_resume(std::chrono::steady_clock::time_point dest_deadline);
  void resume(const std::string& uri,
              std::function<void(const std::string& error)> failed);
  void recover_failed(const std::string& why);
  void end(State s, std::optional<Error> error, const std::string& message);
  void emit(const std::string& message);
  void fail_prepare(const Error& e);

  EventLoop& loop_;
  Settings s_;
  std::unique_ptr<Endpoint> src_, dst_;
  Callbacks cb_;
  SwitchPolicy policy_;
  std::shared_ptr<bool> alive_ = std::make_shared<bool>(true);
  uint64_t gen_ = 0;

  State state_ = State::kPreparing;
  bool ended_ = false;
  bool begun_ = false;  // start() or recover() ran
  bool cancel_requested_ = false;
  bool switched_ = false;
  std::string switch_reason_;
  std::optional<Error> error_;
  std::chrono::steady_clock::time_point started_;
  std::chrono::steady_clock::time_point last_contact_;
  EventLoop::TimerId poll_timer_ = 0;
  EventLoop::TimerId recover_timer_ = 0;
  bool polling_ = false;       // a query-migrate to the source is out
  bool polling_dest_ = false;  // one to the destination (it may hang)
  std::chrono::steady_clock::time_point dest_asked_{};
  bool recovering_now_ = false;
  std::string listen_uri_;  // where the destination last listened to recover
  // URIs this destination was told to listen on: QEMU keeps its listener
  // after it accepted, so the path is "in use", by that QEMU itself.
  std::set<std::string> dest_uris_;
  bool resume_sent_ = false;  // the source accepted migrate resume=true
  // What the probe found.
  bool src_prefetch_ = false, dst_prefetch_ = false;
  bool src_dedup_cap_ = false, dst_dedup_cap_ = false;
  bool src_multifd_cap_ = false, dst_multifd_cap_ = false;
  bool src_rdma_cap_ = false, dst_rdma_cap_ = false;
  // postcopy-rdma as the QEMUs report it (query-migrate "postcopy-rdma").
  std::string rdma_status_, rdma_reason_, rdma_dest_status_;
  uint64_t rdma_pages_read_ = 0, rdma_registered_ = 0;
  nlohmann::json src_caps_, dst_caps_;  // query-migrate-capabilities
  bool dedup_ = false;      // disk-dedup is set on both
  std::string dedup_why_;   // why (not)
  DedupStats dedup_src_, dedup_dst_;
  uint32_t attempts_left_ = 0;
  uint32_t attempt_ = 0;
  std::chrono::milliseconds next_backoff_{0};
  uint32_t recoveries_ = 0;
  std::string paused_reason_;

  // The last sample.
  std::string status_, dest_status_;
  uint64_t pass_ = 0, remaining_ = 0, transferred_ = 0, total_ = 0;
  uint64_t bytes_per_s_ = 0, postcopy_requests_ = 0;
  std::optional<uint64_t> downtime_ms_, total_time_ms_;
  std::chrono::steady_clock::time_point last_sample_at_{};
  bool have_sample_ = false;
  bool finishing_ = false;  // completed or failed: a last look at the destination
};

}  // namespace kvmx::migrate
