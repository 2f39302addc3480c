// kvmx-memwalk: the guest side of the post-copy workloads (issue 12, W1-W4).
//
// It fills a buffer with a pattern that each page's index and a seed
// determine, in an order that decides where its pages land in
// guest-physical memory, waits for a line on stdin (the host switches the
// migration to post-copy meanwhile), then reads every page once in the
// workload's order and checks it.
//
//   kvmx-memwalk --mib N --layout seq|scatter --walk seq|stride:K|random
//                [--seed S]
//
//   --layout seq      pages are first touched in ascending virtual order:
//                     the kernel hands out physical pages in order as well
//   --layout scatter  pages are first touched in a random order: virtual
//                     neighbours sit far apart in physical memory
//   --walk seq        ascending virtual order (W1, and W2 with scatter)
//   --walk stride:K   pages 0, K, 2K, ..., then 1, K+1, ... (W3)
//   --walk random     a random permutation of all pages (W4)
//
// Output lines (for the host to parse):
//   FILLED <pages>
//   WALK-DONE <pages> <bad pages> <milliseconds>
// Exit status 0 only if every page read back as written.
#include <sys/mman.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {

constexpr size_t kPage = 4096;

uint64_t mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

struct Rng {
  uint64_t s;
  uint64_t next() { return s = mix(s); }
};

std::vector<size_t> permutation(size_t n, uint64_t seed) {
  std::vector<size_t> p(n);
  for (size_t i = 0; i < n; i++) p[i] = i;
  Rng r{seed};
  for (size_t i = n; i > 1; i--) std::swap(p[i - 1], p[r.next() % i]);
  return p;
}

void fill(uint64_t *w, size_t page, uint64_t seed) {
  uint64_t h = mix(page ^ (seed << 32));
  for (size_t i = 0; i < kPage / 8; i++) w[i] = h + i;
}

bool check(const uint64_t *w, size_t page, uint64_t seed) {
  uint64_t h = mix(page ^ (seed << 32));
  for (size_t i = 0; i < kPage / 8; i++)
    if (w[i] != h + i) return false;
  return true;
}

[[noreturn]] void usage(const char *why) {
  std::fprintf(stderr,
               "kvmx-memwalk: %s\nusage: kvmx-memwalk --mib N --layout "
               "seq|scatter --walk seq|stride:K|random [--seed S]\n",
               why);
  std::exit(2);
}

}  // namespace

int main(int argc, char **argv) {
  size_t mib = 0, stride = 0;
  std::string layout, walk;
  uint64_t seed = 1;
  for (int i = 1; i < argc; i++) {
    std::string a = argv[i];
    if (i + 1 >= argc) usage(("missing value for " + a).c_str());
    std::string v = argv[++i];
    if (a == "--mib") mib = std::strtoul(v.c_str(), nullptr, 10);
    else if (a == "--layout") layout = v;
    else if (a == "--walk") walk = v;
    else if (a == "--seed") seed = std::strtoull(v.c_str(), nullptr, 10);
    else usage(("unknown option " + a).c_str());
  }
  if (mib == 0 || mib > (1u << 20)) usage("--mib must be 1..1048576");
  if (layout != "seq" && layout != "scatter") usage("bad --layout");
  if (walk.rfind("stride:", 0) == 0) {
    stride = std::strtoul(walk.c_str() + 7, nullptr, 10);
    if (stride == 0) usage("bad stride");
  } else if (walk != "seq" && walk != "random") {
    usage("bad --walk");
  }
  size_t pages = mib * (1 << 20) / kPage;
  auto *buf = static_cast<uint8_t *>(mmap(nullptr, pages * kPage,
                                          PROT_READ | PROT_WRITE,
                                          MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  if (buf == MAP_FAILED) {
    std::perror("mmap");
    return 1;
  }
  // 4 KiB pages: a huge page would be contiguous whatever the layout, and
  // mapped by no last-level page table.
  madvise(buf, pages * kPage, MADV_NOHUGEPAGE);
  std::vector<size_t> order;
  if (layout == "scatter") order = permutation(pages, seed * 7 + 1);
  for (size_t i = 0; i < pages; i++) {
    size_t p = order.empty() ? i : order[i];
    fill(reinterpret_cast<uint64_t *>(buf + p * kPage), p, seed);
  }
  std::vector<size_t>().swap(order);
  std::vector<size_t> visit;
  if (walk == "random") {
    visit = permutation(pages, seed * 13 + 5);
  } else {
    visit.reserve(pages);
    size_t k = stride ? stride : 1;
    for (size_t start = 0; start < k; start++)
      for (size_t p = start; p < pages; p += k) visit.push_back(p);
  }
  // The visit order is built before the host's go, so that walking is
  // all that happens during post-copy.
  std::printf("FILLED %zu\n", pages);
  std::fflush(stdout);
  char line[64];
  if (!std::fgets(line, sizeof line, stdin)) return 1;
  auto t0 = std::chrono::steady_clock::now();
  size_t bad = 0;
  for (size_t p : visit)
    if (!check(reinterpret_cast<const uint64_t *>(buf + p * kPage), p, seed))
      bad++;
  auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(
                std::chrono::steady_clock::now() - t0)
                .count();
  std::printf("WALK-DONE %zu %zu %lld\n", visit.size(), bad,
              static_cast<long long>(ms));
  std::fflush(stdout);
  return bad ? 1 : 0;
}
