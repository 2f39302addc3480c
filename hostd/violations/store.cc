#include "store.h"

#include <algorithm>
#include <set>
#include <string_view>

#include "common/json_util.h"

namespace kvmx::violations {

using nlohmann::json;

Store::Store(size_t capacity) : capacity_(capacity ? capacity : 1) {}

void Store::count(const Violation& v) {
  Totals& t = totals_[v.vm];
  if (v.seq <= t.through_seq) return;
  t.events++;
  t.suppressed = t.suppressed + v.suppressed < t.suppressed
                     ? UINT64_MAX
                     : t.suppressed + v.suppressed;
}

void Store::add(Violation v) {
  next_seq_ = std::max(next_seq_, v.seq + 1);
  count(v);
  if (!ring_.empty() && v.seq <= ring_.back().seq) {
    // Out of order (only a damaged journal does this): keep the ring sorted.
    auto pos = std::upper_bound(
        ring_.begin(), ring_.end(), v.seq,
        [](uint64_t s, const Violation& x) { return s < x.seq; });
    ring_.insert(pos, std::move(v));
  } else {
    ring_.push_back(std::move(v));
  }
  while (ring_.size() > capacity_) {
    ring_.pop_front();
    evicted_++;
  }
}

json Store::record(const Violation& v) {
  json j = to_json(v);
  j["t"] = "violation";
  return j;
}

Result<bool> Store::replay(const json& rec) {
  auto type = json_string(rec, "t");
  if (!type) return false;
  if (*type == "violation") {
    auto v = from_json(rec);
    if (!v) return v.error();
    add(std::move(*v));
    return true;
  }
  if (*type == "totals") {
    auto vm = json_string(rec, "vm");
    auto events = json_u64(rec, "events");
    auto suppressed = json_u64(rec, "suppressed");
    auto through = json_u64(rec, "through_seq");
    if (!vm || !events || !suppressed || !through)
      return make_error("bad-record", "malformed totals record");
    totals_[*vm] = Totals{*events, *suppressed, *through};
    next_seq_ = std::max(next_seq_, *through + 1);
    return true;
  }
  if (*type == "next-seq") {
    auto seq = json_u64(rec, "seq");
    if (!seq) return make_error("bad-record", "malformed next-seq record");
    next_seq_ = std::max(next_seq_, *seq);
    return true;
  }
  return false;
}

std::vector<json> Store::snapshot() const {
  std::vector<json> out;
  out.reserve(ring_.size() + totals_.size() + 1);
  out.push_back(json{{"t", "next-seq"}, {"seq", next_seq_}});
  uint64_t through = next_seq_ - 1;
  std::set<std::string_view> in_ring;
  for (const auto& v : ring_) in_ring.insert(v.vm);
  for (const auto& [vm, t] : totals_) {
    // A zeroed entry matters only while it hides older events in the ring.
    if (t.violations() == 0 && !in_ring.count(vm)) continue;
    out.push_back(json{{"t", "totals"},
                       {"vm", vm},
                       {"events", t.events},
                       {"suppressed", t.suppressed},
                       {"through_seq", through}});
  }
  for (const auto& v : ring_) out.push_back(record(v));
  return out;
}

Store::Page Store::query(const Query& q) const {
  Page page;
  size_t limit = std::clamp<size_t>(q.limit, 1, kMaxQueryLimit);
  auto it = std::upper_bound(
      ring_.begin(), ring_.end(), q.since_seq,
      [](uint64_t s, const Violation& v) { return s < v.seq; });
  for (; it != ring_.end(); ++it) {
    if (q.vm && it->vm != *q.vm) continue;
    if (page.items.size() == limit) {
      page.more = true;
      break;
    }
    page.items.push_back(&*it);
  }
  return page;
}

Totals Store::totals(const std::string& vm) const {
  auto it = totals_.find(vm);
  return it == totals_.end() ? Totals{} : it->second;
}

void Store::reset_totals(const std::string& vm) {
  totals_[vm] = Totals{0, 0, next_seq_ - 1};
}

}  // namespace kvmx::violations
