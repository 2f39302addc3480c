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

  explicit Store(size_t capacity);

  // The seq for the next violation; call once per violation.
  uint64_t assign_seq() { return next_seq_++; }
  uint64_t next_seq() const { return next_seq_; }

  // Adds a violation whose seq came from assign_seq() (or a replayed
  // record); evicts the oldest beyond capacity.
  void add(Violation v);

  // Journal records.  record() is what add() persists; replay() takes back
  // "violation", "totals" and "next-seq" records (false for other types,
  // an error for a malformed record of these types).
  static nlohmann::json record(const Violation& v);
  Result<bool> replay(const nlohmann::json& rec);
  // Records that rebuild this store: next-seq, totals, then violations.
  std::vector<nlohmann::json> snapshot() const;

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

 private:
  void count(const Violation& v);

  size_t capacity_;
  std::deque<Violation> ring_;  // ascending seq
  std::map<std::string, Totals> totals_;
  uint64_t next_seq_ = 1;
  uint64_t evicted_ = 0;
};

}  // namespace kvmx::violations
