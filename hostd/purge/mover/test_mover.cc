// The mover against a real O_DIRECT file under /var/tmp (tmpfs has no
// O_DIRECT), through io_uring and through the pread/pwrite fallback: data
// read back as written, more requests than the queue depth, per-request
// errors, end of file.
#include <catch2/catch_test_macros.hpp>
#include <catch2/generators/catch_generators.hpp>
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "common/fd.h"
#include "purge/mover/mover.h"

using namespace kvmx;
using namespace kvmx::purge;

namespace {

// An unlinked file under /var/tmp opened O_RDWR|O_DIRECT; empty when the
// file system refuses O_DIRECT (EINVAL).
struct DirectFile {
  UniqueFd fd;
  std::string skip_reason;
};

DirectFile open_direct() {
  char path[] = "/var/tmp/kvmx-mover-test-XXXXXX";
  int tmp = mkstemp(path);
  REQUIRE(tmp >= 0);
  UniqueFd keep(tmp);
  DirectFile f;
  int fd = open(path, O_RDWR | O_DIRECT | O_CLOEXEC);
  int err = errno;
  REQUIRE(unlink(path) == 0);
  if (fd < 0) {
    REQUIRE(err == EINVAL);
    f.skip_reason = "O_DIRECT is not supported on /var/tmp";
  }
  f.fd = UniqueFd(fd);
  return f;
}

#define OPEN_DIRECT_OR_SKIP(f)                            \
  DirectFile f = open_direct();                           \
  if (!f.fd) SKIP(f.skip_reason)

void fill(AlignedBuf& b, uint32_t seed) {
  for (size_t i = 0; i < b.size(); i++)
    b.bytes()[i] = static_cast<uint8_t>((i * 131 + seed * 7919 + (i >> 12)) & 0xff);
}

std::unique_ptr<Mover> make(unsigned depth, bool fallback) {
  auto m = Mover::create(depth, fallback);
  REQUIRE(m.ok());
  if (fallback) {
    CHECK_FALSE(m.value()->uses_io_uring());
    CHECK(m.value()->fallback_reason() == "forced");
  }
  return std::move(m).value();
}

}  // namespace

TEST_CASE("mover: queue depth is 1..256") {
  CHECK_FALSE(Mover::create(0).ok());
  CHECK(Mover::create(0).error().code == "bad-queue-depth");
  CHECK_FALSE(Mover::create(257).ok());
  CHECK(Mover::create(1).ok());
  CHECK(Mover::create(256).ok());
  auto m = Mover::create(8);
  REQUIRE(m.ok());
  // On this machine io_uring is enabled; elsewhere the reason is given.
  if (!m.value()->uses_io_uring())
    WARN("io_uring not used: " << m.value()->fallback_reason());
  else
    CHECK(m.value()->fallback_reason().empty());
}

TEST_CASE("mover: AlignedBuf") {
  AlignedBuf a(3 * 4096 + 5);
  REQUIRE(a);
  CHECK(reinterpret_cast<uintptr_t>(a.data()) % 4096 == 0);
  CHECK(a.size() == 3 * 4096 + 5);
  AlignedBuf b(std::move(a));
  CHECK_FALSE(a);
  CHECK(a.size() == 0);
  CHECK(b.size() == 3 * 4096 + 5);
  AlignedBuf none(0);
  CHECK_FALSE(none);
}

TEST_CASE("mover: write then read back, more requests than the queue depth") {
  bool fallback = GENERATE(false, true);
  unsigned depth = GENERATE(1u, 3u, 16u);
  INFO("fallback " << fallback << " depth " << depth);
  OPEN_DIRECT_OR_SKIP(f);
  auto m = make(depth, fallback);

  // 40 blocks of 64 KiB and 4 of 2 MiB, laid out back to back.
  std::vector<uint32_t> sizes(40, 64u << 10);
  sizes.insert(sizes.end(), 4, 2u << 20);
  std::vector<AlignedBuf> out, in;
  std::vector<IoReq> w, r;
  uint64_t off = 0;
  for (size_t i = 0; i < sizes.size(); i++) {
    out.emplace_back(sizes[i]);
    in.emplace_back(sizes[i]);
    REQUIRE((out.back() && in.back()));
    fill(out.back(), static_cast<uint32_t>(i));
    memset(in.back().data(), 0xee, sizes[i]);
    w.push_back({f.fd.get(), off, out.back().data(), sizes[i], true});
    r.push_back({f.fd.get(), off, in.back().data(), sizes[i], false});
    off += sizes[i];
  }
  REQUIRE(m->run(w).ok());
  for (auto& q : w) CHECK(q.result == q.len);
  // Read back in reverse order, a different pattern from the writes.
  std::vector<IoReq> rr(r.rbegin(), r.rend());
  REQUIRE(m->run(rr).ok());
  for (auto& q : rr) CHECK(q.result == q.len);
  for (size_t i = 0; i < sizes.size(); i++)
    CHECK(memcmp(out[i].data(), in[i].data(), sizes[i]) == 0);

  auto s = m->stats();
  CHECK(s.completed == 2 * sizes.size());
  CHECK(s.errors == 0);
  CHECK(s.bytes == 2 * off);
  CHECK(s.submitted >= 2 * sizes.size());
}

TEST_CASE("mover: per-request errors, end of file, zero length") {
  bool fallback = GENERATE(false, true);
  INFO("fallback " << fallback);
  OPEN_DIRECT_OR_SKIP(f);
  auto m = make(4, fallback);

  // A file of 64 KiB.
  AlignedBuf data(64 << 10), buf(128 << 10), other(64 << 10), odd(4096);
  REQUIRE((data && buf && other && odd));
  fill(data, 1);
  IoReq init{f.fd.get(), 0, data.data(), 64u << 10, true};
  REQUIRE(m->run({&init, 1}).ok());
  REQUIRE(init.result == 64 << 10);

  // A descriptor number that is surely closed.
  int closed = dup(f.fd.get());
  REQUIRE(closed >= 0);
  REQUIRE(close(closed) == 0);

  std::vector<IoReq> reqs = {
      {closed, 0, other.data(), 64u << 10, false},         // -EBADF
      {f.fd.get(), 0, buf.data(), 128u << 10, false},      // EOF at 64 KiB
      {f.fd.get(), 0, odd.data(), 1000, false},            // unaligned: -EINVAL
      {f.fd.get(), 4096, odd.data(), 1000, true},          // unaligned: -EINVAL
      {f.fd.get(), 0, other.data(), 0, false},             // nothing to do
      {-1, 0, other.data(), 4096, true},                   // -EBADF
      {f.fd.get(), 1ull << 20, other.data(), 4096, false}, // past EOF: 0
      {f.fd.get(), 0, other.data(), 64u << 10, false},     // fine
  };
  reqs[4].result = 77;  // run() resets every result
  REQUIRE(m->run(reqs).ok());
  CHECK(reqs[0].result == -EBADF);
  CHECK(reqs[1].result == 64 << 10);
  CHECK(memcmp(buf.data(), data.data(), 64 << 10) == 0);
  CHECK(reqs[2].result == -EINVAL);
  CHECK(reqs[3].result == -EINVAL);
  CHECK(reqs[4].result == 0);
  CHECK(reqs[5].result == -EBADF);
  CHECK(reqs[6].result == 0);
  CHECK(reqs[7].result == 64 << 10);
  CHECK(memcmp(other.data(), data.data(), 64 << 10) == 0);
  CHECK(m->stats().errors == 4);
}

TEST_CASE("mover: io_uring and the fallback give the same results") {
  OPEN_DIRECT_OR_SKIP(f);
  auto ring = make(8, false);
  auto sync = make(8, true);
  constexpr uint32_t kBlock = 64 << 10;
  AlignedBuf src(16 * kBlock);
  REQUIRE(src);
  fill(src, 9);
  auto requests = [&](void* base, bool write) {
    std::vector<IoReq> v;
    for (uint32_t i = 0; i < 16; i++)
      v.push_back({f.fd.get(), uint64_t{i} * kBlock,
                   static_cast<uint8_t*>(base) + i * kBlock, kBlock, write});
    v.push_back({-1, 0, base, kBlock, false});
    v.push_back({f.fd.get(), 0, base, 100, false});
    v.push_back({f.fd.get(), 32 * kBlock, base, kBlock, false});
    return v;
  };
  auto w = requests(src.data(), true);
  w.resize(16);
  REQUIRE(ring->run(w).ok());
  AlignedBuf a(16 * kBlock), b(16 * kBlock);
  REQUIRE((a && b));
  auto ra = requests(a.data(), false);
  auto rb = requests(b.data(), false);
  REQUIRE(ring->run(ra).ok());
  REQUIRE(sync->run(rb).ok());
  for (size_t i = 0; i < ra.size(); i++) {
    INFO("request " << i);
    CHECK(ra[i].result == rb[i].result);
  }
  CHECK(memcmp(a.data(), src.data(), 16 * kBlock) == 0);
  CHECK(memcmp(b.data(), src.data(), 16 * kBlock) == 0);
}

TEST_CASE("mover: BufPool reuses buffers up to its bound") {
  BufPool pool(64 << 10, 3 * (64 << 10));
  std::vector<AlignedBuf> bufs;
  std::vector<void*> addrs;
  for (int i = 0; i < 5; i++) {
    bufs.push_back(pool.get());
    REQUIRE(bufs.back());
    CHECK(bufs.back().size() == (64u << 10));
    CHECK(reinterpret_cast<uintptr_t>(bufs.back().data()) % 4096 == 0);
    addrs.push_back(bufs.back().data());
  }
  CHECK(pool.kept_bytes() == 0);
  for (auto& b : bufs) pool.put(std::move(b));
  CHECK(pool.kept_bytes() == 3 * (64u << 10));  // two were freed
  // Kept ones come back (the same memory), then new ones.
  AlignedBuf a = pool.get(), b = pool.get(), c = pool.get(), d = pool.get();
  CHECK(std::find(addrs.begin(), addrs.end(), a.data()) != addrs.end());
  CHECK(std::find(addrs.begin(), addrs.end(), c.data()) != addrs.end());
  CHECK(pool.kept_bytes() == 0);
  CHECK(d);
  // A buffer of another size is not kept.
  pool.put(AlignedBuf(4096));
  CHECK(pool.kept_bytes() == 0);
  pool.put(std::move(a));
  CHECK(pool.kept_bytes() == (64u << 10));
  pool.trim();
  CHECK(pool.kept_bytes() == 0);
}

TEST_CASE("mover: on_done sees each request once, finished, while others run") {
  bool fallback = GENERATE(false, true);
  INFO("fallback " << fallback);
  OPEN_DIRECT_OR_SKIP(f);
  auto m = make(4, fallback);
  std::vector<AlignedBuf> bufs;
  std::vector<IoReq> w;
  for (uint32_t i = 0; i < 12; i++) {
    bufs.emplace_back(64u << 10);
    fill(bufs.back(), i);
    w.push_back({f.fd.get(), uint64_t{i} << 16, bufs.back().data(), 64u << 10,
                 true});
  }
  w.push_back({f.fd.get(), 0, bufs[0].data(), 0, true});  // settled at once
  std::vector<int> seen(w.size(), 0);
  REQUIRE(m->run(w, [&](size_t i) {
               REQUIRE(i < w.size());
               seen[i]++;
               CHECK(w[i].result == w[i].len);  // set before the call
             }).ok());
  for (size_t i = 0; i < w.size(); i++) CHECK(seen[i] == 1);
  // Reads past the end: finished with 0 bytes, still reported.
  AlignedBuf in(64u << 10);
  std::vector<IoReq> r = {{f.fd.get(), 64u << 20, in.data(), 64u << 10, false}};
  int calls = 0;
  REQUIRE(m->run(r, [&](size_t) { calls++; }).ok());
  CHECK(calls == 1);
  CHECK(r[0].result == 0);
}
