// Violation events into records, the bounded store, exact totals with
// suppressed counts, and persistence through journal records.
#include <catch2/catch_test_macros.hpp>

#include "violations/store.h"

using nlohmann::json;
using namespace kvmx::violations;

namespace {

json event_data(uint64_t seq, uint64_t suppressed = 0) {
  return json{{"device", "chan0"}, {"seq", seq},         {"id", 1},
              {"gpa", 65536000},   {"access", "write"},  {"action", "signal"},
              {"size", 4},         {"pid", 123},         {"vaddr", 140737488314372ull},
              {"suppressed", suppressed}};
}

Violation make(Store& s, const std::string& vm, uint64_t dev_seq,
               uint64_t suppressed = 0) {
  auto v = from_event(vm, event_data(dev_seq, suppressed), 1700000000, 42,
                      "2024-01-01T00:00:00.000000Z");
  REQUIRE(v.ok());
  v->seq = s.assign_seq();
  return *v;
}

}  // namespace

TEST_CASE("violations: an event becomes a record with every field") {
  auto v = from_event("vm1", event_data(3, 2), 1700000000, 5, "now");
  REQUIRE(v.ok());
  CHECK(v->vm == "vm1");
  CHECK(v->device == "chan0");
  CHECK(v->device_seq == 3);
  CHECK(v->id == 1);
  CHECK(v->gpa == 65536000);
  CHECK(v->access == "write");
  CHECK(v->action == "signal");
  CHECK(v->size == 4);
  CHECK(v->pid == 123);
  CHECK(v->vaddr == 140737488314372ull);
  CHECK(v->suppressed == 2);
  CHECK(v->count() == 3);
  CHECK(v->host_time == "now");
  CHECK(v->qemu_time == "2023-11-14T22:13:20.000005Z");

  json j = to_json(*v);
  j["seq"] = 9;
  auto back = from_json(j);
  REQUIRE(back.ok());
  CHECK(back->seq == 9);
  CHECK(to_json(*back) == j);
}

TEST_CASE("violations: optional event fields default to 0") {
  json d = {{"device", "c"}, {"seq", 1}, {"gpa", 0}, {"access", "read"},
            {"action", "log"}};
  auto v = from_event("vm", d, 0, 0, "t");
  REQUIRE(v.ok());
  CHECK(v->suppressed == 0);
  CHECK(v->qemu_time.empty());
}

TEST_CASE("violations: malformed events are refused with a reason") {
  auto bad = [](json d) {
    auto v = from_event("vm", d, 0, 0, "t");
    return v.ok() ? std::string("ok") : v.error().message;
  };
  CHECK(bad(json::array()) == "event data is not an object");
  {
    json d = event_data(1);
    d["action"] = "explode";
    CHECK(bad(d) == "unknown action 'explode'");
    d = event_data(1);
    d["access"] = "exec";
    CHECK(bad(d) == "unknown access 'exec'");
  }
  json d = event_data(1);
  d.erase("gpa");
  CHECK(bad(d) == "missing field 'gpa'");
  d = event_data(1);
  d["seq"] = -1;
  CHECK(bad(d) == "'seq' is not an unsigned integer");
  d = event_data(1);
  d["suppressed"] = "many";
  CHECK(bad(d) == "'suppressed' is not an unsigned integer");
  d = event_data(1);
  d["device"] = std::string(200, 'd');
  CHECK(bad(d) == "'device' is longer than 128 bytes");
  d = event_data(1);
  d["pid"] = 1.5;
  CHECK(bad(d) == "'pid' is not an integer");
  d = event_data(1);
  d["access"] = json::object();
  CHECK(bad(d) == "'access' is not a string");
}

TEST_CASE("violations: totals count suppressed violations exactly") {
  Store s(100);
  s.add(make(s, "a", 1, 0));
  s.add(make(s, "a", 5, 3));  // 3 were counted by QEMU but not emitted
  s.add(make(s, "b", 1, 0));
  CHECK(s.totals("a").events == 2);
  CHECK(s.totals("a").suppressed == 3);
  CHECK(s.totals("a").violations() == 5);
  CHECK(s.totals("b").violations() == 1);
  CHECK(s.totals("nobody").violations() == 0);
}

TEST_CASE("violations: the store is a ring of the newest, totals stay exact") {
  Store s(3);
  for (uint64_t i = 1; i <= 10; i++) s.add(make(s, "a", i, 1));
  CHECK(s.size() == 3);
  CHECK(s.evicted() == 7);
  CHECK(s.totals("a").events == 10);
  CHECK(s.totals("a").violations() == 20);
  auto page = s.query({});
  REQUIRE(page.items.size() == 3);
  CHECK(page.items[0]->seq == 8);
  CHECK(page.items[2]->seq == 10);
}

TEST_CASE("violations: queries filter by vm, since_seq and limit") {
  Store s(100);
  for (uint64_t i = 1; i <= 10; i++) s.add(make(s, i % 2 ? "odd" : "even", i));
  Store::Query q;
  q.vm = "odd";
  auto p = s.query(q);
  REQUIRE(p.items.size() == 5);
  CHECK(p.items[0]->seq == 1);
  CHECK(!p.more);

  q.since_seq = 5;
  p = s.query(q);
  REQUIRE(p.items.size() == 2);
  CHECK(p.items[0]->seq == 7);

  q = {};
  q.limit = 4;
  p = s.query(q);
  REQUIRE(p.items.size() == 4);
  CHECK(p.more);
  q.since_seq = p.items.back()->seq;
  p = s.query(q);
  CHECK(p.items.front()->seq == 5);

  q = {};
  q.limit = 1000000;  // capped
  CHECK(s.query(q).items.size() == 10);
  q.since_seq = 10;
  p = s.query(q);
  CHECK(p.items.empty());
  CHECK(!p.more);
}

TEST_CASE("violations: records replay into the same store") {
  Store s(100);
  std::vector<json> journal;
  for (uint64_t i = 1; i <= 5; i++) {
    auto v = make(s, "a", i, i == 3 ? 7 : 0);
    journal.push_back(Store::record(v));
    s.add(v);
  }
  Store r(100);
  for (auto& rec : journal) REQUIRE(*r.replay(rec));
  CHECK(r.size() == 5);
  CHECK(r.totals("a").violations() == 12);
  CHECK(r.next_seq() == s.next_seq());
  CHECK(!*r.replay(json{{"t", "attach"}}));  // not ours
  CHECK(!r.replay(json{{"t", "violation"}, {"seq", "x"}}).ok());
  CHECK(!r.replay(json{{"t", "totals"}, {"vm", "a"}}).ok());
}

TEST_CASE("violations: a snapshot (compaction) keeps totals and seq exact") {
  Store s(4);
  for (uint64_t i = 1; i <= 10; i++) s.add(make(s, "a", i, 2));
  s.add(make(s, "b", 1, 0));
  auto snap = s.snapshot();

  Store r(4);
  for (auto& rec : snap) REQUIRE(*r.replay(rec));
  CHECK(r.size() == 4);
  CHECK(r.totals("a").violations() == 30);
  CHECK(r.totals("a").events == 10);
  CHECK(r.totals("b").violations() == 1);
  CHECK(r.next_seq() == s.next_seq());
  // Violations appended after the snapshot count on top.
  auto v = make(r, "a", 11, 1);
  CHECK(v.seq == 12);
  r.add(v);
  CHECK(r.totals("a").violations() == 32);
}

TEST_CASE("violations: reset_totals (detach) survives snapshot and replay") {
  Store s(100);
  for (uint64_t i = 1; i <= 3; i++) s.add(make(s, "a", i));
  s.reset_totals("a");
  CHECK(s.totals("a").violations() == 0);
  Store r(100);
  for (auto& rec : s.snapshot()) REQUIRE(*r.replay(rec));
  CHECK(r.totals("a").violations() == 0);
  CHECK(r.size() == 3);  // the history stays queryable
  r.add(make(r, "a", 1));
  CHECK(r.totals("a").violations() == 1);
}

TEST_CASE("violations: absurd suppressed counts saturate, never wrap") {
  Store s(10);
  s.add(make(s, "a", 1, UINT64_MAX));
  s.add(make(s, "a", 2, 5));
  CHECK(s.totals("a").violations() == UINT64_MAX);
  CHECK(s.totals("a").suppressed == UINT64_MAX);
  CHECK(s.totals("a").events == 2);
}

TEST_CASE("violations: a duplicated journal is not served or counted twice") {
  Store s(100);
  std::vector<json> journal;
  for (uint64_t i = 1; i <= 5; i++) {
    auto v = make(s, "a", i, 1);
    journal.push_back(Store::record(v));
    s.add(v);
  }
  Store r(100);
  for (int copy = 0; copy < 2; copy++)
    for (auto& rec : journal) REQUIRE(*r.replay(rec));
  CHECK(r.size() == 5);
  CHECK(r.duplicates() == 5);
  CHECK(r.totals("a").violations() == 10);
  Store::Query q;
  CHECK(r.query(q).items.size() == 5);
}

TEST_CASE("violations: seqs come from ranges reserved ahead") {
  Store s(10);
  CHECK(s.needs_reservation());
  json res = s.reservation(100);
  CHECK(res == json{{"t", "next-seq"}, {"seq", 101}});
  s.reserved(res);
  CHECK(!s.needs_reservation());
  for (int i = 0; i < 3; i++) s.add(make(s, "a", 1));
  // After a restart the unused rest of the range is skipped, never reused.
  Store r(10);
  for (auto& rec : s.snapshot()) REQUIRE(*r.replay(rec));
  CHECK(r.next_seq() == 101);
  CHECK(r.needs_reservation());
  // A reservation survives compaction even with the range unused.
  Store c(10);
  for (auto& rec : Store::snapshot(s.copy())) REQUIRE(*c.replay(rec));
  CHECK(c.next_seq() == 101);
}

TEST_CASE("violations: seqs near the top of uint64 are bad records, not wraps") {
  // Found by fuzz-hostd-journal: seq + 1 wrapped to 0 and a compaction
  // round trip counted a violation twice.
  Store s(10);
  auto v = make(s, "a", 1);
  json rec = Store::record(v);
  rec["seq"] = UINT64_MAX;
  CHECK(!s.replay(rec).ok());
  CHECK(!s.replay(json{{"t", "totals"}, {"vm", "x"}, {"events", 1},
                       {"suppressed", 0}, {"through_seq", UINT64_MAX}})
             .ok());
  CHECK(!s.replay(json{{"t", "next-seq"}, {"seq", UINT64_MAX}}).ok());
  CHECK(s.size() == 0);
  CHECK(s.next_seq() == 2);  // make() took seq 1
}
