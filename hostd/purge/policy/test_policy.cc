// The purge policy against a fake clock: idle age, order, watermarks with
// hysteresis, the token bucket, and the JSON configuration.
#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include "purge/policy/policy.h"

using nlohmann::json;
using namespace kvmx;
using namespace kvmx::purge;
using Catch::Matchers::StartsWith;

namespace {

constexpr uint64_t kBs = 2 << 20;  // 2 MiB blocks

PolicyConfig cfg_on() {
  PolicyConfig c;
  c.enabled = true;
  c.min_idle_ms = 1000;
  c.high_watermark_bytes = 0;
  c.low_watermark_bytes = 0;
  c.rate_bytes_per_s = 1ull << 40;  // not the limit unless a test says so
  c.max_blocks_per_round = 4096;
  return c;
}

std::vector<BlockView> resident(size_t n, uint64_t last_access) {
  return std::vector<BlockView>(n, BlockView{kBlockResident, last_access, false});
}

// Applies a choice the way the engine would once the moves are done.
void mark_purged(std::vector<BlockView>& blocks, const std::vector<uint64_t>& chosen) {
  for (auto b : chosen) {
    REQUIRE(blocks[b].state == kBlockResident);
    blocks[b].state = kBlockPurged;
  }
}

}  // namespace

TEST_CASE("policy: hot, pinned and non-resident blocks are never chosen") {
  Policy p(cfg_on(), kBs);
  uint64_t now = 100000;
  std::vector<BlockView> b = {
      {kBlockResident, now - 999, false},   // hot: 999 ms < 1000
      {kBlockResident, now - 1000, false},  // exactly min idle: cold
      {kBlockResident, now - 50000, true},  // cold but pinned
      {kBlockMoving, 0, false},
      {kBlockPurged, 0, false},
      {kBlockResident, now + 5, false},     // clock skew: not idle
      {kBlockResident, UINT64_MAX, false},  // not tracked yet
  };
  CHECK(p.choose(now, b) == std::vector<uint64_t>{1});
  // However long the run, the hot block stays as long as it is touched.
  for (int round = 0; round < 100; round++) {
    now += 500;
    b[0].last_access_ms = now - 400;
    for (auto c : p.choose(now, b)) CHECK(c != 0);
  }
}

TEST_CASE("policy: min_idle_ms 0 still skips blocks not tracked yet") {
  auto c = cfg_on();
  c.min_idle_ms = 0;
  Policy p(c, kBs);
  std::vector<BlockView> b = {{kBlockResident, 100, false},
                              {kBlockResident, UINT64_MAX, false}};
  CHECK(p.choose(100, b) == std::vector<uint64_t>{0});
}

TEST_CASE("policy: oldest access first, ties by block number") {
  auto c = cfg_on();
  c.max_blocks_per_round = 3;
  Policy p(c, kBs);
  std::vector<BlockView> b = resident(6, 0);
  uint64_t now = 1000000;
  b[0].last_access_ms = 5000;
  b[1].last_access_ms = 1000;
  b[2].last_access_ms = 3000;
  b[3].last_access_ms = 1000;
  b[4].last_access_ms = 900000;
  b[5].last_access_ms = 2000;
  CHECK(p.choose(now, b) == std::vector<uint64_t>{1, 3, 5});
  mark_purged(b, {1, 3, 5});
  CHECK(p.choose(now + 1, b) == std::vector<uint64_t>{2, 0, 4});
}

TEST_CASE("policy: disabled chooses nothing") {
  auto c = cfg_on();
  c.enabled = false;
  Policy p(c, kBs);
  auto b = resident(10, 0);
  CHECK(p.choose(100000, b).empty());
  CHECK_FALSE(p.purging());
  c.enabled = true;
  p.set_config(c);
  CHECK(p.choose(100001, b).size() == 10);
  // Disabling in the middle of a purge ends it.
  c.enabled = false;
  p.set_config(c);
  CHECK_FALSE(p.purging());
  CHECK(p.choose(100002, b).empty());
}

TEST_CASE("policy: watermarks with hysteresis") {
  auto c = cfg_on();
  c.high_watermark_bytes = 8 * kBs;
  c.low_watermark_bytes = 5 * kBs;
  c.max_blocks_per_round = 1;  // one block per round, to watch the rounds
  Policy p(c, kBs);
  auto b = resident(8, 0);
  uint64_t now = 100000;

  // 8 blocks resident = high: not above it, nothing starts.
  CHECK(p.choose(now, b).empty());
  CHECK_FALSE(p.purging());

  // A ninth block: above high, the purge starts...
  b.push_back({kBlockResident, 0, false});
  auto r = p.choose(++now, b);
  REQUIRE(r.size() == 1);
  CHECK(p.purging());
  mark_purged(b, r);
  // ... and goes on below high, round after round, down to low.
  int rounds = 1;
  while (true) {
    r = p.choose(++now, b);
    if (r.empty()) break;
    mark_purged(b, r);
    rounds++;
    REQUIRE(rounds < 20);
  }
  CHECK(rounds == 4);  // 9 -> 5 blocks
  CHECK_FALSE(p.purging());
  // Blocks faulted back: resident grows to 8 (== high): still nothing.
  for (int i = 0; i < 3; i++) {
    for (auto& v : b) {
      if (v.state == kBlockPurged) {
        v = {kBlockResident, now, false};
        break;
      }
    }
  }
  CHECK(p.choose(now + 100000, b).empty());
  CHECK_FALSE(p.purging());
}

TEST_CASE("policy: moving blocks count as resident but are not chosen twice") {
  auto c = cfg_on();
  c.high_watermark_bytes = 4 * kBs;
  c.low_watermark_bytes = 2 * kBs;
  Policy p(c, kBs);
  auto b = resident(6, 0);
  auto r = p.choose(100000, b);
  CHECK(r == std::vector<uint64_t>{0, 1, 2, 3});  // 6 -> 2
  for (auto i : r) b[i].state = kBlockMoving;
  // Still 6 "resident" bytes-wise, the purge goes on, but the moving ones
  // already bring the resident state to low: nothing more.
  CHECK(p.choose(100001, b).empty());
  CHECK(p.purging());
  // One move is cancelled (back to resident, it was touched: not idle): one
  // more block is needed, another one.
  b[0].state = kBlockResident;
  b[0].last_access_ms = 100001;
  CHECK(p.choose(100002, b) == std::vector<uint64_t>{4});
  b[4].state = kBlockMoving;
  // The moves complete: resident <= low, the purge ends.
  for (auto i : {1, 2, 3, 4}) b[i].state = kBlockPurged;
  CHECK(p.choose(101003, b).empty());
  CHECK_FALSE(p.purging());
}

TEST_CASE("policy: rate limit over simulated time") {
  auto c = cfg_on();
  c.rate_bytes_per_s = 10 * kBs;  // 20 MiB/s, burst 20 MiB
  Policy p(c, kBs);
  auto b = resident(10000, 0);
  uint64_t t0 = 1000000, chosen_bytes = 0;
  // Rounds every 7 ms for 10 simulated seconds.
  for (uint64_t now = t0; now <= t0 + 10000; now += 7) {
    auto r = p.choose(now, b);
    mark_purged(b, r);
    chosen_bytes += r.size() * kBs;
  }
  uint64_t burst = c.rate_bytes_per_s;
  CHECK(chosen_bytes <= c.rate_bytes_per_s * 10 + burst);
  // And the bucket is not stingy: close to the full rate was used.
  CHECK(chosen_bytes >= c.rate_bytes_per_s * 10 + burst - 2 * kBs);
}

TEST_CASE("policy: a rate below one block per second still makes progress") {
  auto c = cfg_on();
  c.rate_bytes_per_s = kBs / 4;  // burst is one block
  Policy p(c, kBs);
  auto b = resident(100, 0);
  uint64_t now = 1000000, n = 0;
  for (int i = 0; i < 40 * 1000; i++, now += 1) {  // 40 s in 1 ms steps
    auto r = p.choose(now, b);
    mark_purged(b, r);
    n += r.size();
  }
  CHECK(n >= 10);  // 1 (burst) + 40 s x 1/4 block/s - rounding
  CHECK(n <= 11);
}

TEST_CASE("policy: max_blocks_per_round") {
  auto c = cfg_on();
  c.max_blocks_per_round = 7;
  Policy p(c, kBs);
  auto b = resident(100, 0);
  CHECK(p.choose(100000, b).size() == 7);
}

TEST_CASE("policy: JSON round trip and partial updates") {
  PolicyConfig base;
  auto r = parse_policy(json::object(), base);
  REQUIRE(r.ok());
  CHECK(to_json(*r) == to_json(base));

  json full = {{"enabled", true},         {"min-idle-ms", 5000},
               {"high-watermark", 1000},  {"low-watermark", 500},
               {"rate", 4096},            {"max-blocks-per-round", 4096},
               {"readahead", 1 << 20}};
  r = parse_policy(full, base);
  REQUIRE(r.ok());
  CHECK(r->enabled);
  CHECK(r->min_idle_ms == 5000);
  CHECK(r->high_watermark_bytes == 1000);
  CHECK(r->low_watermark_bytes == 500);
  CHECK(r->rate_bytes_per_s == 4096);
  CHECK(r->max_blocks_per_round == 4096);
  CHECK(r->readahead_bytes == (1u << 20));
  CHECK(to_json(*r) == full);

  auto part = parse_policy(json{{"rate", 1}}, *r);
  REQUIRE(part.ok());
  CHECK(part->rate_bytes_per_s == 1);
  CHECK(part->min_idle_ms == 5000);
  CHECK(part->high_watermark_bytes == 1000);
}

TEST_CASE("policy: every bad field is named") {
  PolicyConfig base;
  base.high_watermark_bytes = 1000;
  base.low_watermark_bytes = 500;
  struct Case {
    json j;
    const char* field;
  };
  std::vector<Case> cases = {
      {json::array(), "policy"},
      {json(3), "policy"},
      {{{"colour", 1}}, "colour"},
      {{{"enabled", 1}}, "enabled"},
      {{{"enabled", "yes"}}, "enabled"},
      {{{"min-idle-ms", -1}}, "min-idle-ms"},
      {{{"min-idle-ms", 1.5}}, "min-idle-ms"},
      {{{"min-idle-ms", "10"}}, "min-idle-ms"},
      {{{"high-watermark", -5}}, "high-watermark"},
      {{{"high-watermark", nullptr}}, "high-watermark"},
      {{{"high-watermark", 400}}, "low-watermark"},  // now below low (500)
      {{{"low-watermark", 1001}}, "low-watermark"},
      {{{"low-watermark", true}}, "low-watermark"},
      {{{"high-watermark", 10}, {"low-watermark", 11}}, "low-watermark"},
      {{{"rate", 0}}, "rate"},
      {{{"rate", -1}}, "rate"},
      {{{"rate", json::object()}}, "rate"},
      {{{"max-blocks-per-round", 0}}, "max-blocks-per-round"},
      {{{"max-blocks-per-round", 4097}}, "max-blocks-per-round"},
      {{{"max-blocks-per-round", -3}}, "max-blocks-per-round"},
      {{{"max-blocks-per-round", 1ull << 40}}, "max-blocks-per-round"},
      {{{"readahead", (64ull << 20) + 1}}, "readahead"},
      {{{"readahead", -1}}, "readahead"},
      {{{"readahead", "16M"}}, "readahead"},
  };
  for (const auto& c : cases) {
    INFO(c.j.dump());
    auto r = parse_policy(c.j, base);
    REQUIRE_FALSE(r.ok());
    CHECK(r.error().code == "bad-policy");
    CHECK_THAT(r.error().message, StartsWith(std::string(c.field) + ": "));
  }
  // The same from text (parsed numbers are unsigned when not negative).
  auto t = parse_policy(json::parse(R"({"rate": 18446744073709551615})"), base);
  REQUIRE(t.ok());
  CHECK(t->rate_bytes_per_s == UINT64_MAX);
  t = parse_policy(json::parse(R"({"min-idle-ms": -1})"), base);
  REQUIRE_FALSE(t.ok());
  CHECK(t.error().message == "min-idle-ms: must not be negative");
  t = parse_policy(json::parse(R"({"rate": 1e3})"), base);
  REQUIRE_FALSE(t.ok());
  CHECK_THAT(t.error().message, StartsWith("rate: "));
  // Valid edges.
  CHECK(parse_policy(json{{"low-watermark", 1000}}, base).ok());  // low == high
  CHECK(parse_policy(json{{"max-blocks-per-round", 1}}, base).ok());
  CHECK(parse_policy(json{{"min-idle-ms", 0}}, base).ok());
  CHECK(parse_policy(json{{"readahead", 0}}, base).ok());  // off
  CHECK(parse_policy(json{{"readahead", 64ull << 20}}, base).ok());
}
