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

json Store::reservation(uint64_t block) const {
  return json{{"t", "next-seq"}, {"seq", next_seq_ + block}};
}

void Store::reserved(const json& rec) {
  if (auto seq = json_u64(rec, "seq")) reserved_ = std::max(reserved_, *seq);
}

bool Store::add(Violation v) {
  // hostd writes violations in seq order, and compaction keeps that order:
  // a seq not above the last one is a copy (a journal appended to itself)
  // and must not be served or counted twice.
  if (v.seq == 0 || v.seq <= last_seq_) {
    duplicates_++;
    return false;
  }
  last_seq_ = v.seq;
  next_seq_ = std::max(next_seq_, v.seq + 1);
  count(v);
  ring_.push_back(std::move(v));
  while (ring_.size() > capacity_) {
    ring_.pop_front();
    evicted_++;
  }
  return true;
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
    if (v->seq == 0 || v->seq >= kMaxSeq)
      return make_error("bad-record", "violation record with seq out of range");
    add(std::move(*v));  // a duplicate is counted, not an error
    return true;
  }
  if (*type == "totals") {
    auto vm = json_string(rec, "vm");
    auto events = json_u64(rec, "events");
    auto suppressed = json_u64(rec, "suppressed");
    auto through = json_u64(rec, "through_seq");
    if (!vm || !events || !suppressed || !through || *through >= kMaxSeq)
      return make_error("bad-record", "malformed totals record");
    totals_[*vm] = Totals{*events, *suppressed, *through};
    next_seq_ = std::max(next_seq_, *through + 1);
    return true;
  }
  if (*type == "next-seq") {
    auto seq = json_u64(rec, "seq");
    if (!seq || *seq > kMaxSeq)
      return make_error("bad-record", "malformed next-seq record");
    next_seq_ = std::max(next_seq_, *seq);
    reserved_ = std::max(reserved_, *seq);
    return true;
  }
  return false;
}

Store::Copy Store::copy() const {
  Copy c;
  c.next_seq = next_seq_;
  c.reserved = reserved_;
  c.totals = totals_;
  c.ring.assign(ring_.begin(), ring_.end());
  return c;
}

std::vector<json> Store::snapshot() const { return snapshot(copy()); }

std::vector<json> Store::snapshot(const Copy& c) {
  std::vector<json> out;
  out.reserve(c.ring.size() + c.totals.size() + 1);
  // A reserved range stays reserved across compaction.
  out.push_back(json{{"t", "next-seq"}, {"seq", std::max(c.next_seq, c.reserved)}});
  // Totals cover the seqs handed out so far: a violation written after
  // this snapshot (while compaction runs) has a higher seq and counts.
  uint64_t through = c.next_seq - 1;
  std::set<std::string_view> in_ring;
  for (const auto& v : c.ring) in_ring.insert(v.vm);
  for (const auto& [vm, t] : c.totals) {
    // A zeroed entry matters only while it hides older events in the ring.
    if (t.violations() == 0 && !in_ring.count(vm)) continue;
    out.push_back(json{{"t", "totals"},
                       {"vm", vm},
                       {"events", t.events},
                       {"suppressed", t.suppressed},
                       {"through_seq", through}});
  }
  for (const auto& v : c.ring) out.push_back(record(v));
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
