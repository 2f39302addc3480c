// Access tracking: the Tracker's logic against a scripted present-bit
// source, and PagemapSource against this process's own mapping of a file
// under /var/tmp (PAGEMAP_SCAN and the pread fallback must agree).
#include <catch2/catch_test_macros.hpp>
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <set>
#include <string>
#include <vector>

#include "common/fd.h"
#include "purge/tracking/tracking.h"

using namespace kvmx;
using namespace kvmx::purge;

namespace {

constexpr uint64_t kPage = 4096;

// Present pages by address; records every scan.
class FakeSource : public PresentSource {
 public:
  std::set<uint64_t> pages;
  std::vector<std::pair<uint64_t, uint64_t>> calls;  // addr, len
  bool fail = false;

  Result<void> scan(uint64_t addr, uint64_t len,
                    std::vector<uint8_t>& present) override {
    calls.emplace_back(addr, len);
    if (fail) return make_error("fake", "scripted failure");
    present.assign(len / kPage, 0);
    for (auto p = pages.lower_bound(addr); p != pages.end() && *p < addr + len; ++p)
      present[(*p - addr) / kPage] = 1;
    return ok_result();
  }
};

using Blocks = std::vector<uint64_t>;

}  // namespace

// -- Tracker ------------------------------------------------------------------

TEST_CASE("tracker: first probe zaps everything, then only accessed blocks") {
  const uint64_t base = 0x7f0000000000, bs = 64 * 1024;
  Tracker t(base, 16, bs);
  FakeSource src;
  for (uint64_t b = 0; b < 16; b++) CHECK(t.last_access_ms(b) == Tracker::kNeverSeen);

  // Never zapped: accessed "now", zapped, and nothing to scan.
  auto r = t.probe(1000, src, {3, 1, 2, 2, 7});
  REQUIRE(r.ok());
  CHECK(*r == Blocks{1, 2, 3, 7});
  CHECK(src.calls.empty());
  CHECK(t.last_access_ms(1) == 1000);
  CHECK(t.last_access_ms(7) == 1000);
  CHECK(t.last_access_ms(0) == Tracker::kNeverSeen);  // not tracked
  CHECK(t.zapped(2));

  // Block 2 read (one page in its middle), block 7 written (its last page).
  src.pages = {base + 2 * bs + 5 * kPage, base + 8 * bs - kPage};
  r = t.probe(2000, src, {1, 2, 3, 7});
  REQUIRE(r.ok());
  CHECK(*r == Blocks{2, 7});
  CHECK(t.last_access_ms(1) == 1000);
  CHECK(t.last_access_ms(2) == 2000);
  CHECK(t.last_access_ms(3) == 1000);
  CHECK(t.last_access_ms(7) == 2000);

  // Nothing touched since: nothing to zap, times unchanged.
  src.pages.clear();
  r = t.probe(3000, src, {1, 2, 3, 7});
  REQUIRE(r.ok());
  CHECK(r->empty());
  CHECK(t.last_access_ms(2) == 2000);
}

TEST_CASE("tracker: contiguous runs are scanned in one call") {
  const uint64_t base = 1 << 30, bs = 64 * 1024;
  Tracker t(base, 16, bs);
  FakeSource src;
  Blocks tracked = {9, 0, 1, 2, 5, 6};
  REQUIRE(t.probe(1, src, tracked).ok());
  src.calls.clear();
  REQUIRE(t.probe(2, src, tracked).ok());
  using Call = std::pair<uint64_t, uint64_t>;
  CHECK(src.calls == std::vector<Call>{{base, 3 * bs},
                                       {base + 5 * bs, 2 * bs},
                                       {base + 9 * bs, bs}});
}

TEST_CASE("tracker: long runs are split at kMaxScanPages") {
  const uint64_t bs = 2 << 20;  // 512 pages: 128 blocks per scan
  Tracker t(0, 300, bs);
  FakeSource src;
  Blocks all;
  for (uint64_t b = 0; b < 300; b++) all.push_back(b);
  REQUIRE(t.probe(1, src, all).ok());
  src.pages = {299 * bs, 128 * bs};
  auto r = t.probe(2, src, all);
  REQUIRE(r.ok());
  CHECK(*r == Blocks{128, 299});
  REQUIRE(src.calls.size() == 3);
  CHECK(src.calls[0].second == 128 * bs);
  CHECK(src.calls[1].second == 128 * bs);
  CHECK(src.calls[2].second == 44 * bs);
}

TEST_CASE("tracker: only unzapped runs skip the scan; a mixed run is scanned") {
  Tracker t(0, 8, kPage * 4);
  FakeSource src;
  REQUIRE(t.probe(1, src, {0, 1}).ok());  // 0 and 1 zapped
  src.calls.clear();
  // 2 is new (never zapped): returned whatever the scan says.
  auto r = t.probe(2, src, {0, 1, 2});
  REQUIRE(r.ok());
  CHECK(*r == Blocks{2});
  CHECK(src.calls.size() == 1);
  CHECK(t.last_access_ms(0) == 1);
  CHECK(t.last_access_ms(2) == 2);
}

TEST_CASE("tracker: touch, reset, errors") {
  const uint64_t bs = 16 * kPage;
  Tracker t(0, 4, bs);
  FakeSource src;
  REQUIRE(t.probe(100, src, {0, 1, 2, 3}).ok());

  t.touch(1, 500);
  CHECK(t.last_access_ms(1) == 500);
  t.touch(1, 400);  // never backwards
  CHECK(t.last_access_ms(1) == 500);
  t.touch(9, 400);  // out of range: ignored
  CHECK(t.last_access_ms(9) == Tracker::kNeverSeen);

  // A block newly resident: accessed now, zapped at the next probe even
  // though no page of it shows.
  t.reset(2, 600);
  CHECK(t.last_access_ms(2) == 600);
  CHECK_FALSE(t.zapped(2));
  auto r = t.probe(700, src, {0, 1, 2, 3});
  REQUIRE(r.ok());
  CHECK(*r == Blocks{2});
  CHECK(t.last_access_ms(2) == 700);

  // A block out of range.
  r = t.probe(800, src, {1, 4});
  REQUIRE_FALSE(r.ok());
  CHECK(r.error().code == "tracking-block");

  // A failing source changes nothing, even for runs scanned before it.
  src.pages = {0};  // block 0 accessed
  src.fail = true;
  t.reset(3, 750);
  r = t.probe(900, src, {0, 1, 3});
  REQUIRE_FALSE(r.ok());
  CHECK(r.error().code == "fake");
  CHECK(t.last_access_ms(0) == 100);
  CHECK(t.last_access_ms(3) == 750);
  CHECK_FALSE(t.zapped(3));
  src.fail = false;
  r = t.probe(1000, src, {0, 1, 3});
  REQUIRE(r.ok());
  CHECK(*r == Blocks{0, 3});
}

// -- PagemapSource against this process --------------------------------------

namespace {

constexpr uint64_t kMiB = 1 << 20;

// A 16 MiB file under /var/tmp mapped MAP_SHARED, followed by 2 MiB of
// PROT_NONE address space with no pages.
struct Mapping {
  UniqueFd fd;
  uint8_t* p = nullptr;
  uint64_t len = 16 * kMiB;
  uint64_t pages() const { return len / kPage; }

  Mapping() {
    char path[] = "/var/tmp/kvmx-tracking-test-XXXXXX";
    int f = mkstemp(path);
    REQUIRE(f >= 0);
    fd = UniqueFd(f);
    REQUIRE(unlink(path) == 0);
    REQUIRE(ftruncate(f, static_cast<off_t>(len)) == 0);
    // Reserve, 2 MiB aligned so that no folio or fault-around window spans
    // two of the regions the tests look at.
    size_t span = len + 4 * kMiB;
    void* r = mmap(nullptr, span, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    REQUIRE(r != MAP_FAILED);
    auto a = (reinterpret_cast<uintptr_t>(r) + 2 * kMiB - 1) & ~(2 * kMiB - 1);
    void* m = mmap(reinterpret_cast<void*>(a), len, PROT_READ | PROT_WRITE,
                   MAP_SHARED | MAP_FIXED, f, 0);
    REQUIRE(m != MAP_FAILED);
    p = static_cast<uint8_t*>(m);
    reserved = r;
    reserved_len = span;
  }
  ~Mapping() { munmap(reserved, reserved_len); }
  uint64_t addr(uint64_t page = 0) const {
    return reinterpret_cast<uintptr_t>(p) + page * kPage;
  }
  void zap(uint64_t page, uint64_t n) {
    REQUIRE(madvise(p + page * kPage, n * kPage, MADV_DONTNEED) == 0);
  }

  void* reserved = nullptr;
  size_t reserved_len = 0;
};

// Scans with PAGEMAP_SCAN (when the kernel has it) and with pread; both
// must agree.  Returns the answer.
std::vector<uint8_t> scan_both(uint64_t addr, uint64_t len) {
  auto a = PagemapSource::open(getpid());
  auto b = PagemapSource::open(getpid());
  REQUIRE(a.ok());
  REQUIRE(b.ok());
  b.value()->force_pread_fallback();
  CHECK_FALSE(b.value()->uses_pagemap_scan());
  std::vector<uint8_t> pa, pb;
  REQUIRE(a.value()->scan(addr, len, pa).ok());
  REQUIRE(b.value()->scan(addr, len, pb).ok());
  CHECK(pa == pb);
  return pa;
}

size_t count(const std::vector<uint8_t>& v, size_t from, size_t to) {
  size_t n = 0;
  for (size_t i = from; i < to; i++) n += v[i];
  return n;
}

}  // namespace

TEST_CASE("pagemap: PAGEMAP_SCAN is used on this kernel") {
  auto s = PagemapSource::open(getpid());
  REQUIRE(s.ok());
  if (!s.value()->uses_pagemap_scan())
    WARN("PAGEMAP_SCAN not available: " << s.value()->fallback_reason()
                                        << "; only pread is tested");
  CHECK(s.value()->page_size() == kPage);
  CHECK_FALSE(PagemapSource::open(-5).ok());
  std::vector<uint8_t> v;
  auto r = s.value()->scan(4096 + 1, 4096, v);
  REQUIRE_FALSE(r.ok());
  CHECK(r.error().code == "bad-range");
  CHECK(s.value()->scan(0, 4095, v).error().code == "bad-range");
  REQUIRE(s.value()->scan(4096, 0, v).ok());
  CHECK(v.empty());
}

TEST_CASE("pagemap: written pages present, zapped ones not, reads and writes count") {
  Mapping m;
  const uint64_t n = m.pages();
  // Before any access: nothing present, nor in the PROT_NONE tail.
  auto v = scan_both(m.addr(), m.len + 2 * kMiB);
  CHECK(count(v, 0, v.size()) == 0);

  // Every page written: all present.
  memset(m.p, 0x5a, m.len);
  v = scan_both(m.addr(), m.len + 2 * kMiB);
  CHECK(count(v, 0, n) == n);
  CHECK(count(v, n, v.size()) == 0);

  // Every other page zapped: an exact alternating pattern, which also makes
  // PAGEMAP_SCAN return more regions than fit in one call.
  for (uint64_t i = 1; i < n; i += 2) m.zap(i, 1);
  v = scan_both(m.addr(), m.len);
  bool alternating = true;
  for (uint64_t i = 0; i < n; i++) alternating &= v[i] == (i % 2 == 0);
  CHECK(alternating);
  // A sub-range not starting at the mapping.
  v = scan_both(m.addr(3), 5 * kPage);
  CHECK(v == std::vector<uint8_t>{0, 1, 0, 1, 0});

  // All zapped; then one read in [0, 2 MiB) and one write in [8, 10 MiB).
  m.zap(0, n);
  v = scan_both(m.addr(), m.len);
  CHECK(count(v, 0, n) == 0);
  volatile uint8_t* vp = m.p;
  const uint64_t rd = (1 * kMiB) / kPage + 3, wr = (9 * kMiB) / kPage + 7;
  uint8_t x = vp[rd * kPage + 100];
  CHECK(x == 0x5a);  // the data stayed (MADV_DONTNEED on a shared file)
  vp[wr * kPage + 5] = 1;
  v = scan_both(m.addr(), m.len);
  CHECK(v[rd] == 1);
  CHECK(v[wr] == 1);
  // A read fault may map its folio or fault-around window, never beyond
  // the 2 MiB region it is in.
  const uint64_t r2 = 2 * kMiB / kPage;
  CHECK(count(v, r2, 4 * r2) == 0);
  CHECK(count(v, 5 * r2, n) == 0);
}

TEST_CASE("pagemap: the Tracker over a real mapping with 2 MiB blocks") {
  Mapping m;
  const uint64_t bs = 2 * kMiB, blocks = m.len / bs, ppb = bs / kPage;
  memset(m.p, 1, m.len);
  auto src = PagemapSource::open(getpid());
  REQUIRE(src.ok());
  for (bool fallback : {false, true}) {
    INFO("pread fallback " << fallback);
    if (fallback) src.value()->force_pread_fallback();
    Tracker t(m.addr(), blocks, bs);
    Blocks all;
    for (uint64_t b = 0; b < blocks; b++) all.push_back(b);
    auto zap = [&](const Blocks& bl) {
      for (auto b : bl) m.zap(b * ppb, ppb);
    };
    auto r = t.probe(10, *src.value(), all);
    REQUIRE(r.ok());
    CHECK(*r == all);
    zap(*r);
    volatile uint8_t* vp = m.p;
    uint8_t x = vp[3 * bs + 12345];  // a read in block 3
    (void)x;
    vp[6 * bs + bs - 1] = 2;  // a write at the end of block 6
    r = t.probe(20, *src.value(), all);
    REQUIRE(r.ok());
    CHECK(*r == Blocks{3, 6});
    zap(*r);
    CHECK(t.last_access_ms(3) == 20);
    CHECK(t.last_access_ms(0) == 10);
    r = t.probe(30, *src.value(), all);
    REQUIRE(r.ok());
    CHECK(r->empty());
  }
}
