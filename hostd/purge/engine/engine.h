// Virtblock purging of one NVDIMM backend (docs/design/virtblock-purging.md):
// the state machine that moves blocks between the backend and the disk
// file, on top of the table (journal), the mover (io_uring), the policy,
// access tracking and QEMU's purge agent.
//
// Threads: the agent client's reader (faults in), one fault-back worker,
// and one control thread (probe rounds, the policy, purge-now, unpurge).
// None of them ever waits for QEMU's BQL.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/fd.h"
#include "common/result.h"
#include "purge/engine/agent_client.h"
#include "purge/mover/mover.h"
#include "purge/policy/policy.h"
#include "purge/table/table.h"
#include "purge/tracking/tracking.h"

namespace kvmx::purge {

struct EngineConfig {
  std::string name;        // for logs and status ("vm/backend")
  std::string agent_path;  // QEMU's purge-agent socket
  std::string vbt_path;    // the table; created when missing
  std::string vbd_path;    // the disk copies
  uint32_t block_shift = 21;
  uint64_t disk_slots = 0;           // 0: one per block
  uint64_t journal_bytes = 4 << 20;
  uint64_t probe_interval_ms = 1000;
  uint64_t batch_bytes = 16 << 20;   // per purge batch (three in flight)
  // Fault-backs read a block's copy in pieces of this size, in parallel,
  // and stream them into the backend: 4 KiB..block size, a power of two.
  uint64_t read_piece_bytes = 512 << 10;
  PolicyConfig policy;
};

// What purge-now and unpurge did.
struct MoveResult {
  uint64_t blocks = 0;     // moved (purged, or brought back)
  uint64_t zero = 0;       // purged without a disk copy (all zeros)
  uint64_t skipped = 0;    // not eligible (hot, busy, already there)
  uint64_t failed = 0;     // an error stopped them; see status()
  uint64_t bytes = 0;
  double seconds = 0;
  std::string error;       // the first error, when some failed
  std::string error_code;
};

class Engine {
 public:
  // Called once, from an engine thread, when a block cannot be brought
  // back (checksum, I/O error, no space in the backend): the thread that
  // waits for it stays blocked; the caller should stop the VM.
  using FatalFn = std::function<void(const std::string& what)>;

  // Connects to the agent, opens (recovers) or creates the table, puts
  // every purged block behind a placeholder and maps the rest back, then
  // starts the threads.  Blocking: call it off the event loop.
  static Result<std::unique_ptr<Engine>> start(EngineConfig cfg,
                                               FatalFn on_fatal);
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  nlohmann::json status() const;
  Result<void> set_policy(const PolicyConfig& p);
  PolicyConfig policy() const;
  // Purges now: the blocks in [first, first + count) (count 0: every
  // block) that are resident and, unless `ignore_idle`, idle for the
  // policy's min-idle-ms.  Waits until done.
  Result<MoveResult> purge_now(uint64_t first, uint64_t count,
                               bool ignore_idle);
  // Brings back every purged block in [first, first + count).
  Result<MoveResult> unpurge(uint64_t first, uint64_t count);
  bool alive() const;  // the agent connection is up and nothing fatal
  uint64_t block_size() const { return uint64_t{1} << cfg_.block_shift; }
  uint64_t block_count() const { return nblocks_; }

 private:
  enum class St : uint8_t { kResident, kMoving, kSealing, kPurged,
                            kRestoring, kLost };
  explicit Engine(EngineConfig cfg) : cfg_(std::move(cfg)) {}
  Result<void> attach();
  Result<void> recover(const RecoveryReport& rep);
  Result<MoveResult> run_command(bool purge, uint64_t first, uint64_t count,
                                 bool ignore_idle);
  void fault_loop();
  void flush_residents();
  void control_loop();
  // `since_ns`: when QEMU's agent read the fault (CLOCK_MONOTONIC), 0 when
  // it does not say.
  void on_fault(uint64_t offset, uint64_t since_ns);
  // The block is back in QEMU's mapping when it returns true.
  bool restore(uint64_t b, Mover& mover, bool from_fault);
  // A purged block on its way back: claimed (kRestoring), then its disk
  // copy read into `buf`.
  struct Restore {
    uint64_t b = 0;
    Entry e;
    AlignedBuf buf;
    int err = 0;  // the read's errno, 0 when it worked
    uint64_t t0 = 0, t_read = 0;
    uint64_t t_notice = 0;  // QEMU's fault notice, when a fault asked
    uint32_t handoff = 0;   // µs from the agent's read of it to the notice
    // Streaming: the pieces read so far, in order, are checksummed into
    // `crc` and written into the backend while the rest is still read;
    // `done` bytes of them.  The last piece is written only once the whole
    // block's checksum matches, so until then the range has a hole.
    uint32_t crc = 0;
    uint64_t done = 0;
    size_t pieces = 0, next = 0;
    std::vector<uint8_t> arrived;
    std::string write_error;
  };
  enum class Mode { kFault, kUnpurge, kReadahead };
  Restore& claim_locked(std::vector<Restore>& rs, uint64_t b,
                        bool fault_waits);
  void read_copies(std::vector<Restore>& rs, Mover& mover);
  bool finish_restore(Restore& r, Mode mode);
  void give_back(Restore& r, const std::string& why);
  void unwrite(const Restore& r);
  Result<MoveResult> unpurge_blocks(const std::vector<uint64_t>& blocks,
                                    Mover& mover);
  void readahead_after(uint64_t b, Mover& mover);
  Result<MoveResult> purge_blocks(const std::vector<uint64_t>& blocks,
                                  Mover& mover);
  struct Stats;
  struct BatchItem {
    uint64_t b = 0;
    uint64_t slot = kNoSlot;
    Entry old;
    AlignedBuf buf;
    uint32_t crc = 0;
    bool zero = false;
    bool ok = true;
  };
  struct Batch {
    std::vector<BatchItem> items;
    MoveResult res;
    Error first_error{"", "", 0};
  };
  void prepare_batch(const std::vector<uint64_t>& blocks, Batch& batch,
                     Mover& mover);
  void abandon_batch(Batch& batch);
  void write_batch(Batch& batch, Mover& mover);
  void seal_batches(const std::vector<Batch*>& batches);
  void back_to_resident(Batch& batch, size_t i, bool map_back);
  void batch_error(Batch& batch, Error e, uint64_t Stats::*counter);
  void probe_round();
  void fatal(uint64_t b, const std::string& why);
  uint64_t now_ms() const;
  Result<void> agent_runs(AgentClient::Op op,
                          const std::vector<uint64_t>& sorted_blocks);
  uint64_t off(uint64_t b) const { return b << cfg_.block_shift; }
  uint64_t len(uint64_t b) const;
  bool fully_allocated(uint64_t b) const;
  bool has_data(uint64_t b) const;
  std::vector<uint8_t> data_map() const;
  // The last kLatencies samples of a fault-back latency, in µs.
  struct LatencyRing {
    std::vector<uint32_t> v;
    size_t next = 0;
    void add(uint64_t us);
    nlohmann::json summary() const;  // p50, p99, samples
  };

  EngineConfig cfg_;
  uint64_t nblocks_ = 0;
  AgentHello hello_;
  std::unique_ptr<AgentClient> agent_;
  std::unique_ptr<Table> table_;
  UniqueFd vbd_fd_;  // O_DIRECT
  std::unique_ptr<PagemapSource> pagemap_;
  std::unique_ptr<Tracker> tracker_;  // control thread (and restore: touch)
  std::unique_ptr<Policy> policy_;    // under mu_
  FatalFn on_fatal_;

  mutable std::mutex mu_;
  std::condition_variable cv_;        // block state changes, queue items
  std::vector<St> st_;                // under mu_
  std::vector<uint8_t> cancelled_;    // under mu_: faulted while moving
  std::deque<uint64_t> faults_;       // blocks to bring back, deduplicated
  struct PendingResident {
    uint64_t block, generation, slot;
  };
  std::vector<PendingResident> pending_residents_;  // under mu_
  std::vector<uint8_t> pending_;      // under mu_: in pending_residents_
  std::vector<uint8_t> queued_;       // under mu_: block is in faults_
  std::vector<uint8_t> ra_faulted_;   // under mu_: faulted while read ahead
  std::vector<uint64_t> noticed_us_;  // under mu_: first fault notice, 0: none
  // under mu_, with noticed_us_: µs from the agent's read of that fault to
  // its notice here, 0 when the agent does not say (or says nonsense)
  std::vector<uint32_t> handoff_us_;
  // Sequential-fault detection, fault thread only.
  uint64_t ra_last_ = UINT64_MAX;     // the block the last fault asked for
  uint64_t ra_next_ = UINT64_MAX;     // the first block after the window
  uint64_t ra_window_ = 0;            // blocks, doubling per sequential fault
  struct Command {
    bool purge;
    uint64_t first, count;
    bool ignore_idle;
    Result<MoveResult>* result;
    bool done = false;
  };
  std::deque<Command*> commands_;     // under mu_
  bool stop_ = false;
  bool fatal_seen_ = false;
  std::string fatal_what_;
  bool agent_lost_ = false;
  std::string agent_lost_why_;

  // Statistics, under mu_.
  struct Stats {
    uint64_t faults = 0, fault_backs = 0, cancels = 0, purged_blocks = 0,
             zero_blocks = 0, purged_bytes = 0, restored_bytes = 0,
             disk_full = 0, io_errors = 0, checksum_errors = 0,
             commit_errors = 0, agent_errors = 0, probe_rounds = 0,
             probe_errors = 0, zapped_blocks = 0, policy_purges = 0,
             readahead_windows = 0, readahead_blocks = 0,
             readahead_dropped = 0, readahead_waits = 0;
    double purge_seconds = 0;
    uint64_t phase_us[5] = {};  // fault-back: read, check, write, map, queue
    // ... and, when the agent says when it read a fault and when it woke
    // the thread: its hand-off to hostd, the map-back up to the wake
    uint64_t handoff_us = 0, wake_us = 0, timed_faults = 0;
    // swap, read, write, commit, punch, sync, handover (prepare waiting
    // for a writer to take its batch)
    uint64_t purge_phase_us[7] = {};
  } stats_;
  static constexpr size_t kLatencies = 4096;
  LatencyRing latency_;  // from the notice to MAP_BACK's reply
  LatencyRing wait_;     // from the agent's read of a fault to its wake

  std::unique_ptr<Mover> seal_mover_;  // purge batches' writes
  std::unique_ptr<Mover> seal_mover2_;  // ... of the second writer
  // Block buffers of purge batches and fault-backs, kept for reuse up to
  // three batches and 16 MiB more, freed after 30 s without use.
  std::unique_ptr<BufPool> pool_;
  std::atomic<uint64_t> last_busy_ms_{0};
  std::thread fault_thread_;
  std::thread control_thread_;
};

}  // namespace kvmx::purge
