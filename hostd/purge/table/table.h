// The virtblock table and its journal: docs/specs/virtblock.md.
//
// One Table per purging-enabled NVDIMM backend.  The in-memory vector of
// entries is the committed view; commit() makes transactions durable in
// the journal (group commit: concurrent callers share one write and one
// fdatasync), checkpoint() writes the table in place, open() recovers.
// No exception crosses this interface: errors are Result/Error values.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "common/fd.h"
#include "common/result.h"

namespace kvmx::purge {

enum class BlockState : uint8_t { Resident = 1, Moving = 2, Purged = 3 };
inline constexpr uint64_t kNoSlot = ~uint64_t{0};
inline constexpr uint8_t kFlagZero = 1;  // Entry::flags bit 0

struct Entry {
  BlockState state = BlockState::Resident;
  uint8_t flags = 0;  // bit 0: zero block, no disk copy
  uint32_t data_crc = 0;
  uint64_t generation = 0;
  uint64_t disk_slot = kNoSlot;
  uint64_t commit_id = 0;  // set by commit()
  bool operator==(const Entry&) const = default;
};

enum class TxType : uint16_t {
  PurgeBegin = 1,
  PurgeDone = 2,
  Cancel = 3,
  FaultBackDone = 4,
  Unpurge = 5
};
struct Op {
  uint64_t block;
  Entry entry;
};
struct Tx {
  TxType type;
  std::vector<Op> ops;
};

struct TableParams {
  std::string vbt_path, vbd_path;
  uint32_t block_shift = 21;           // 12..30
  uint64_t backend_size = 0;           // bytes, > 0
  uint64_t disk_slots = 0;             // slots to preallocate in .vbd (>0)
  uint64_t journal_bytes = 4 << 20;    // multiple of 4096, 1 MiB .. 1 GiB
};

struct RecoveryReport {
  uint64_t commits_replayed = 0;  // valid kind-1 commits with id > checkpoint_id
  std::vector<uint64_t> moving_to_resident;  // were `moving`, now resident (slots freed)
  std::vector<uint64_t> purged;  // every block in state `purged` after recovery
  std::vector<uint64_t> bad_entries;  // failed their CRC (or are invalid) with nothing to repair them
  uint64_t torn_pages_repaired = 0;   // table pages restored from a kind-2 record
};

// Layout constants of the spec, for tools and tests.
namespace format {
inline constexpr uint64_t kPage = 4096;
inline constexpr uint64_t kTableOffset = 8192;
inline constexpr uint64_t kEntryBytes = 64;
inline constexpr uint64_t kEntriesPerPage = kPage / kEntryBytes;
inline constexpr uint64_t kRecordHeaderBytes = 64;
inline constexpr uint64_t kTxHeaderBytes = 16;
inline constexpr uint64_t kOpBytes = 72;
inline constexpr uint64_t kPageImageBytes = 8 + kPage;
inline constexpr uint64_t kMaxRecordBytes = 1 << 20;
inline constexpr uint64_t kMaxBlocks = uint64_t{1} << 40;
inline constexpr uint64_t kMaxSlots = uint64_t{1} << 40;
inline constexpr uint64_t kMinJournalBytes = 1 << 20;
inline constexpr uint64_t kMaxJournalBytes = uint64_t{1} << 30;
inline constexpr uint32_t kKindEntries = 1;
inline constexpr uint32_t kKindPages = 2;
inline constexpr const char* kXattrName = "user.kvmx.virtblock";
// The 64-byte on-disk image of `e` for block `block`, crc included.
void encode_entry(const Entry& e, uint64_t block, unsigned char* out);
// Decodes; false when the crc (seeded with `block`) does not match.
bool decode_entry(const unsigned char* in, uint64_t block, Entry* e);
}  // namespace format

class Table {
 public:
  ~Table();
  Table(const Table&) = delete;
  Table& operator=(const Table&) = delete;

  // Creates both files (refuses to overwrite an existing .vbt or .vbd:
  // error code "exists"), preallocates them (fallocate), writes the
  // superblocks and the table, fsyncs files and directories.
  // backend_fd >= 0: sets the xattr user.kvmx.virtblock on it (table uuid +
  // epoch) and fsyncs it.  -1: no xattr (memfd backends).
  static Result<std::unique_ptr<Table>> create(const TableParams& p,
                                               int backend_fd);
  // Opens and recovers (spec "Checkpoint and recovery" steps 1-4, except
  // the punch, which the caller does for report->purged), then bumps the
  // epoch (backend xattr first when backend_fd >= 0, then the superblock)
  // and checkpoints.  Error codes: "bad-magic", "bad-version",
  // "bad-incompat", "bad-superblock", "uuid-mismatch", "size-mismatch",
  // "xattr-mismatch", "bad-journal", "bad-entries", "no-memory", and
  // "vbt-io"/"vbd-io"/"xattr" for failed system calls.  `report` (may be
  // null) is filled as far as recovery got, bad_entries included.
  static Result<std::unique_ptr<Table>> open(const std::string& vbt_path,
                                             const std::string& vbd_path,
                                             int backend_fd,
                                             uint64_t backend_size,
                                             RecoveryReport* report);

  uint32_t block_shift() const { return block_shift_; }
  uint64_t block_size() const { return uint64_t{1} << block_shift_; }
  uint64_t block_count() const { return block_count_; }
  uint64_t disk_slots() const { return disk_slots_; }
  uint64_t journal_bytes() const { return journal_bytes_; }
  uint64_t epoch() const { return epoch_; }
  const unsigned char* uuid() const { return uuid_; }
  // Byte offset of a slot in the .vbd, block-size aligned.
  uint64_t slot_offset(uint64_t slot) const {
    return (slot + 1) << block_shift_;
  }
  const std::string& vbd_path() const { return vbd_path_; }
  const std::string& vbt_path() const { return vbt_path_; }

  // The committed state (thread-safe).  A block out of range gives Entry{}.
  Entry entry(uint64_t block) const;
  // Seeded data checksum: CRC32C over table_uuid, le64 block index, le64
  // generation, then the data.
  uint32_t data_crc(uint64_t block, uint64_t generation, const void* data,
                    size_t len) const;
  // The CRC32C of the seed alone: data_crc(b, g, d, n) is
  // crc32c(d, n, data_crc_seed(b, g)), so a block can be checked in pieces.
  uint32_t data_crc_seed(uint64_t block, uint64_t generation) const;

  // A slot that no committed or in-flight entry uses; "disk-full" when none.
  Result<uint64_t> alloc_slot();
  // The caller releases only after the commit that stops naming it is
  // durable.  Out-of-range slots are ignored.
  void release_slot(uint64_t slot);
  uint64_t free_slots() const;

  // Group commit; thread-safe.  Blocks until tx is durable (written +
  // fdatasync) and returns its commit id (shared by the transactions of one
  // commit).  Sets every op's entry.commit_id.  Rejected before any I/O:
  // "bad-tx" (empty, block out of range, invalid state/flags/slot, a block
  // twice), "tx-too-large" (more than a record, or more table pages than
  // the journal can checkpoint).  "table-broken" after a failed write or
  // sync; "journal-write"/"journal-sync" to every caller of the failed
  // commit.
  Result<uint64_t> commit(Tx tx);
  // Applies committed records to the table region and advances
  // checkpoint_id.  commit() calls it when the next commit and the cost of
  // checkpointing would no longer fit in half the journal.
  Result<void> checkpoint();

  struct Stats {
    uint64_t commits, txs, syncs, checkpoints;
    uint64_t journal_bytes_written;  // kind-1 and kind-2 records and wrap padding
  };
  Stats stats() const;

  // Test hook: called instead of fdatasync(2) on the .vbt; returns 0 or an
  // errno value.  Not thread-safe to change while commits run.
  void set_sync_hook_for_test(std::function<int()> hook) {
    sync_hook_ = std::move(hook);
  }

 private:
  struct Pending;
  struct Super;
  Table();

  Result<void> sync_vbt();
  Result<void> pwrite_vbt(const void* buf, size_t len, uint64_t off,
                          const char* code);
  // Needs the leader role (lead_ held); drops `lk` around the I/O.
  Result<void> checkpoint_as_leader(std::unique_lock<std::mutex>& lk);
  void lead_one(std::unique_lock<std::mutex>& lk);
  Result<void> write_superblock();
  void encode_page(uint64_t page, unsigned char* out) const;
  uint64_t checkpoint_cost(uint64_t pages) const;
  bool fits(uint64_t rec_bytes, uint64_t dirty_pages) const;
  Result<void> recover(const Super& sb, RecoveryReport* rep);

  std::string vbt_path_, vbd_path_;
  UniqueFd vbt_, vbd_;
  uint32_t block_shift_ = 0;
  uint64_t block_count_ = 0, disk_slots_ = 0, journal_bytes_ = 0;
  uint64_t journal_offset_ = 0, backend_size_ = 0;
  unsigned char uuid_[16] = {};
  uint64_t epoch_ = 0, sequence_ = 0, checkpoint_id_ = 0, repair_min_id_ = 0;
  uint32_t compat_ = 0;
  uint16_t version_minor_ = 0;

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Pending*> queue_;
  bool lead_ = false;     // a thread holds the leader role (commit or checkpoint I/O)
  bool broken_ = false;
  std::vector<Entry> entries_;
  std::vector<uint8_t> dirty_;  // per table page
  uint64_t dirty_count_ = 0;
  std::vector<uint64_t> slot_bits_;
  uint64_t slots_used_ = 0, slot_hint_ = 0;
  uint64_t next_id_ = 1, next_tx_id_ = 1;
  uint64_t head_ = 0;  // next write position in the journal region
  uint64_t used_ = 0;  // journal bytes written since the last checkpoint
  std::atomic<uint64_t> n_commits_{0}, n_txs_{0}, n_syncs_{0},
      n_checkpoints_{0}, n_journal_bytes_{0};
  std::function<int()> sync_hook_;
};

}  // namespace kvmx::purge
