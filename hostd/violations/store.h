// Bounded in-memory index of recorded violations (the newest `capacity`),
// per-VM totals that stay exact when old entries are evicted or compacted
// away, and the journal records that persist both.
#pragma once

#include <cstdint>
#include <deque>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "violation.h"

namespace kvmx::violations {

struct Totals {
  uint64_t events = 0;      // KVMX_VIOLATION events recorded
  uint64_t suppressed = 0;  // sum of their "suppressed"
  // Events with seq <= through_seq are already counted (compaction).
  uint64_t through_seq = 0;
  // Saturates: a hostile "suppressed" must not wrap the total around.
  uint64_t violations() const {
    return events + suppressed < events ? UINT64_MAX : events + suppressed;
  }
};

class Store {
 public:
  static constexpr size_t kMaxQueryLimit = 1000;
  // Seqs (and through_seq, next-seq) in journal records must stay below
  // this: seq + 1 and next_seq - 1 must never wrap.  hostd would need
  // centuries to get there.
  static constexpr uint64_t kMaxSeq = uint64_t{1} << 62;

  explicit Store(size_t capacity);

  // The seq for the next violation; call once per violation, and only
  // while !needs_reservation().
  uint64_t assign_seq() { return next_seq_++; }
  uint64_t next_seq() const { return next_seq_; }

  // Sequence numbers are handed out from ranges reserved in the journal
  // (a "next-seq" record, made durable before any seq of its range is
  // used), so that a seq is never used twice, even for violations that
  // never reached the journal.
  bool needs_reservation() const { return next_seq_ >= reserved_; }
  // The record that reserves the next `block` seqs; reserved once the
  // caller has it durable and calls reserved().
  nlohmann::json reservation(uint64_t block) const;
  void reserved(const nlohmann::json& reservation_record);

  // Adds a violation whose seq came from assign_seq() (or a replayed
  // record); evicts the oldest beyond capacity.  A seq not above every
  // seq added before (a duplicated or reordered journal) is refused:
  // false, counted in duplicates().
  bool add(Violation v);

  // Journal records.  record() is what add() persists; replay() takes back
  // "violation", "totals" and "next-seq" records (false for other types,
  // an error for a malformed record of these types).
  static nlohmann::json record(const Violation& v);
  Result<bool> replay(const nlohmann::json& rec);
  // Records that rebuild this store: next-seq, totals, then violations.
  std::vector<nlohmann::json> snapshot() const;
  // The same in two steps: a copy of what they are made of (on the owner's
  // thread), then the records (on any thread).
  struct Copy {
    uint64_t next_seq = 1;
    uint64_t reserved = 1;
    std::map<std::string, Totals> totals;
    std::vector<Violation> ring;
  };
  Copy copy() const;
  static std::vector<nlohmann::json> snapshot(const Copy& c);

  struct Query {
    std::optional<std::string> vm;
    uint64_t since_seq = 0;  // only seq > since_seq
    size_t limit = 100;      // capped at kMaxQueryLimit
  };
  struct Page {
    std::vector<const Violation*> items;
    bool more = false;  // further matches exist after the last item
  };
  Page query(const Query& q) const;

  Totals totals(const std::string& vm) const;
  // Restarts the VM's totals at zero (detach).
  void reset_totals(const std::string& vm);

  size_t size() const { return ring_.size(); }
  size_t capacity() const { return capacity_; }
  uint64_t evicted() const { return evicted_; }
  uint64_t duplicates() const { return duplicates_; }

 private:
  void count(const Violation& v);

  size_t capacity_;
  std::deque<Violation> ring_;  // ascending seq
  std::map<std::string, Totals> totals_;
  uint64_t next_seq_ = 1;
  uint64_t reserved_ = 1;  // seqs below it are reserved in the journal
  uint64_t last_seq_ = 0;  // the highest seq added
  uint64_t evicted_ = 0;
  uint64_t duplicates_ = 0;
};

}  // namespace kvmx::violations
