// kvmx-rdma-bench: one-sided 4 KiB page fetch over RDMA READ against a TCP
// request/reply on the same link (docs/design/rdma.md, bench/rdma/).
//
//   kvmx-rdma-bench serve --addr IP [--port P] [--ctl-port C] [--mib N]
//                         [--sessions S] [--file-dir DIR]
//   kvmx-rdma-bench fetch --addr IP [--ctl-port C] [--samples N]
//                         [--depth D] [--json]
//
// serve (the side whose memory is read, as a migration source): exports
// N MiB of anonymous memory (page n filled from n, so any page can be
// checked) for RDMA READ on IP:P, plus the four small regions of the
// staleness probe, and answers on TCP port C the requests of
// bench_proto.h, S sessions one after another (0: until killed). At
// start it prints one line "SERVE-REGISTER {json}": what registering N
// MiB took and allocated for touched and untouched anonymous memory
// (write pin and read-only pin), memfd memory, and a file in DIR mapped
// shared (can it be pinned at all?).
//
// fetch (the reading side, as a destination) measures in one run on the
// same link:
//   - 4 KiB fetch latency, one at a time, RDMA READ and TCP (p50/p99);
//   - bulk pages/s with D in flight, RDMA READ and pipelined TCP;
//   - the server's CPU time per page for both bulk runs, and how many
//     page requests its process answered;
//   - the staleness probe: is a page written by the server after it was
//     registered read as written, or stale?
// and checks the content of every page it fetched.
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

#include "rdma/bench_proto.h"
#include "rdma/rdma.h"

namespace {

using Clock = std::chrono::steady_clock;
using namespace kvmx::rdma::bench;

bool write_all(int fd, const void* p, size_t n) {
  auto* c = static_cast<const uint8_t*>(p);
  while (n > 0) {
    ssize_t w = ::write(fd, c, n);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return false;
    c += w;
    n -= static_cast<size_t>(w);
  }
  return true;
}

bool read_all(int fd, void* p, size_t n) {
  auto* c = static_cast<uint8_t*>(p);
  while (n > 0) {
    ssize_t r = ::read(fd, c, n);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return false;
    c += r;
    n -= static_cast<size_t>(r);
  }
  return true;
}

uint64_t cpu_ns() {
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  auto tv = [](const timeval& t) {
    return uint64_t(t.tv_sec) * 1000000000ull + uint64_t(t.tv_usec) * 1000ull;
  };
  return tv(ru.ru_utime) + tv(ru.ru_stime);
}

// Busy CPU time of all CPUs since boot, from /proc/stat's first line
// (user nice system idle iowait irq softirq steal, in clock ticks).
uint64_t machine_busy_ns() {
  FILE* f = std::fopen("/proc/stat", "r");
  if (f == nullptr) return 0;
  unsigned long long v[8] = {};
  int n = std::fscanf(f, "cpu %llu %llu %llu %llu %llu %llu %llu %llu", &v[0],
                      &v[1], &v[2], &v[3], &v[4], &v[5], &v[6], &v[7]);
  std::fclose(f);
  if (n < 7) return 0;
  uint64_t busy = v[0] + v[1] + v[2] + v[5] + v[6];
  return busy * (1000000000ull / static_cast<uint64_t>(sysconf(_SC_CLK_TCK)));
}

sockaddr_storage tcp_addr(const std::string& ip, uint16_t port, socklen_t* len) {
  sockaddr_storage ss{};
  if (ip.find(':') != std::string::npos) {
    auto* s6 = reinterpret_cast<sockaddr_in6*>(&ss);
    s6->sin6_family = AF_INET6;
    s6->sin6_port = htons(port);
    inet_pton(AF_INET6, ip.c_str(), &s6->sin6_addr);
    *len = sizeof(*s6);
  } else {
    auto* s4 = reinterpret_cast<sockaddr_in*>(&ss);
    s4->sin_family = AF_INET;
    s4->sin_port = htons(port);
    inet_pton(AF_INET, ip.c_str(), &s4->sin_addr);
    *len = sizeof(*s4);
  }
  return ss;
}

int die(const std::string& what) {
  std::fprintf(stderr, "kvmx-rdma-bench: error: %s\n", what.c_str());
  return 1;
}

long rss_kib() {
  long pages = 0, res = 0;
  FILE* f = std::fopen("/proc/self/statm", "r");
  if (f == nullptr) return -1;
  if (std::fscanf(f, "%ld %ld", &pages, &res) != 2) res = -1;
  std::fclose(f);
  return res * (sysconf(_SC_PAGESIZE) / 1024);
}

uint8_t* map_anon(size_t len) {
  void* m = mmap(nullptr, len, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  return m == MAP_FAILED ? nullptr : static_cast<uint8_t*>(m);
}

// Registration of `big` bytes of each kind of memory: time, memory it
// allocated, or why it failed. The regions stay registered (and are never
// read): this is about what registering costs.
nlohmann::json registration_costs(kvmx::rdma::Exporter& x, size_t big,
                                  const std::string& file_dir) {
  using Pin = kvmx::rdma::Exporter::Pin;
  nlohmann::json out;
  auto timed = [&](const char* name, uint8_t* p, size_t len, Pin pin) {
    long r0 = rss_kib();
    auto t0 = Clock::now();
    auto reg = x.expose(p, len, pin);
    double ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
    nlohmann::json j = {{"mib", len >> 20}, {"ok", reg.ok()}};
    if (reg) {
      j["ms"] = ms;
      j["ms_per_gib"] = ms * double(1ull << 30) / double(len);
      j["rss_growth_kib"] = rss_kib() - r0;
    } else {
      j["error"] = reg.error().message;
    }
    out[name] = j;
  };
  uint8_t* untouched_w = map_anon(big);
  uint8_t* untouched_r = map_anon(big);
  if (untouched_w != nullptr) {
    timed("anon_untouched_write_pin", untouched_w, big, Pin::kWrite);
  }
  if (untouched_r != nullptr) {
    timed("anon_untouched_readonly_pin", untouched_r, big, Pin::kReadOnly);
  }
  int mfd = memfd_create("kvmx-rdma-bench", MFD_CLOEXEC);
  if (mfd >= 0 && ftruncate(mfd, static_cast<off_t>(big)) == 0) {
    void* m = mmap(nullptr, big, PROT_READ | PROT_WRITE, MAP_SHARED, mfd, 0);
    if (m != MAP_FAILED) {
      std::memset(m, 1, big);
      timed("memfd_touched_write_pin", static_cast<uint8_t*>(m), big, Pin::kWrite);
    }
  }
  if (!file_dir.empty()) {
    const size_t flen = 16 << 20;
    std::string path = file_dir + "/kvmx-rdma-bench.file";
    int fd = open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd >= 0 && ftruncate(fd, flen) == 0) {
      void* m = mmap(nullptr, flen, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
      if (m != MAP_FAILED) {
        auto* fm = static_cast<uint8_t*>(m);
        std::memset(fm, 1, flen);
        timed("file_shared_write_pin", fm, flen / 2, Pin::kWrite);
        timed("file_shared_readonly_pin", fm + flen / 2, flen / 2, Pin::kReadOnly);
      }
      unlink(path.c_str());
    } else {
      out["file_shared_write_pin"] = {{"ok", false}, {"error", "no file in " + file_dir}};
    }
  }
  return out;
}

struct ProbeRegion {
  uint8_t* p = nullptr;
  kvmx::rdma::RemoteRegion r;
};
constexpr size_t kProbeLen = 16 * kPage;

// The four probe regions of one session (bench_proto.h, kProbeNames).
bool make_probes(kvmx::rdma::Exporter& x, ProbeRegion* out) {
  using Pin = kvmx::rdma::Exporter::Pin;
  for (uint32_t k = 0; k < kProbeCases; k++) {
    bool discard = k >= 2;
    Pin pin = (k % 2 == 0) ? Pin::kWrite : Pin::kReadOnly;
    out[k].p = map_anon(kProbeLen);
    if (out[k].p == nullptr) return false;
    if (discard) std::memset(out[k].p, 0x11, kProbeLen);  // resident first
    auto reg = x.expose(out[k].p, kProbeLen, pin);
    if (!reg) return false;
    out[k].r = *reg;
  }
  return true;
}

WireRegion wire(const kvmx::rdma::RemoteRegion& r) {
  return WireRegion{r.addr, r.length, r.rkey, 0};
}

int serve(const std::string& ip, uint16_t port, uint16_t ctl_port, uint64_t mib,
          unsigned sessions, const std::string& file_dir) {
  size_t len = mib << 20;
  uint8_t* base = map_anon(len);
  if (base == nullptr) return die("mmap");
  for (uint64_t pg = 0; pg < len / kPage; pg++) fill(base + pg * kPage, pg);

  auto ex = kvmx::rdma::Exporter::listen(ip, port);
  if (!ex) return die(ex.error().message);
  kvmx::rdma::Exporter& x = **ex;
  auto t0 = Clock::now();
  auto region = x.expose(base, len);
  double reg_ms =
      std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
  if (!region) return die(region.error().message);
  nlohmann::json reg = registration_costs(x, len, file_dir);
  reg["anon_touched_write_pin"] = {
      {"mib", mib}, {"ok", true}, {"ms", reg_ms},
      {"ms_per_gib", reg_ms * double(1ull << 30) / double(len)}};
  reg["device"] = x.device();
  std::printf("SERVE-REGISTER %s\n", reg.dump().c_str());
  std::fflush(stdout);

  socklen_t alen = 0;
  auto sa = tcp_addr(ip, ctl_port, &alen);
  int ls = socket(sa.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
  int one = 1;
  setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  if (bind(ls, reinterpret_cast<sockaddr*>(&sa), alen) != 0 || listen(ls, 4) != 0) {
    return die(std::string("control port: ") + std::strerror(errno));
  }
  std::fprintf(stderr, "serve: %s, rdma port %u, ready\n", x.device().c_str(),
               x.port());
  std::random_device rd;
  uint64_t served = 0;
  for (unsigned s = 0; sessions == 0 || s < sessions; s++) {
    int c = accept4(ls, nullptr, nullptr, SOCK_CLOEXEC);
    if (c < 0) return die("accept");
    setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    ProbeRegion probes[kProbeCases];
    if (!make_probes(x, probes)) return die("probe regions");
    Header h{};
    h.magic = kHdrMagic;
    h.rdma_port = x.port();
    h.probes = kProbeCases;
    h.rejected = x.rejected();
    h.token = (uint64_t(rd()) << 32) | rd();
    h.main = wire(*region);
    for (uint32_t k = 0; k < kProbeCases; k++) h.probe[k] = wire(probes[k].r);
    if (!write_all(c, &h, sizeof(h))) {
      close(c);
      continue;
    }
    // The reader connects over RDMA now; a session whose reader does not
    // (or cannot) goes on over TCP alone.
    if (auto a = x.accept(h.token, 20000); !a) {
      std::fprintf(stderr, "serve: no RDMA reader: %s\n", a.error().message.c_str());
    }
    for (;;) {
      uint8_t req[9];
      if (!read_all(c, req, sizeof(req))) break;
      uint64_t arg;
      std::memcpy(&arg, req + 1, 8);
      if (req[0] == 'P') {
        if (arg >= len / kPage) break;  // a bad request ends the session
        if (!write_all(c, base + arg * kPage, kPage)) break;
        served++;
      } else if (req[0] == 'C') {
        uint64_t r[3] = {cpu_ns(), served, machine_busy_ns()};
        if (!write_all(c, r, sizeof(r))) break;
      } else if (req[0] == 'R') {
        uint64_t r = x.rejected();
        if (!write_all(c, &r, sizeof(r))) break;
      } else if (req[0] == 'M') {
        if (arg >= kProbeCases) break;
        if (arg >= 2) madvise(probes[arg].p, kProbeLen, MADV_DONTNEED);
        std::memset(probes[arg].p, kProbeWritten, kProbeLen);
        uint64_t r = 0;
        if (!write_all(c, &r, sizeof(r))) break;
      } else if (req[0] == 'X') {
        std::fprintf(stderr, "serve: exiting at the reader's request\n");
        _exit(9);
      } else {
        break;
      }
    }
    close(c);
    x.drop_reader();
  }
  close(ls);
  return 0;
}

struct Stats {
  double p50 = 0, p99 = 0;
};

Stats percentiles(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  Stats s;
  if (v.empty()) return s;
  s.p50 = v[v.size() / 2];
  s.p99 = v[std::min(v.size() - 1, (v.size() * 99) / 100)];
  return s;
}

bool ctl(int fd, char op, uint64_t arg) {
  uint8_t req[9];
  req[0] = static_cast<uint8_t>(op);
  std::memcpy(req + 1, &arg, 8);
  return write_all(fd, req, sizeof(req));
}

// One READ into slot 0, waited for.
bool read_one(kvmx::rdma::Reader& r, const kvmx::rdma::RemoteRegion& region,
              uint64_t off) {
  if (auto p = r.post_read(0, region, off, kPage); !p) {
    std::fprintf(stderr, "kvmx-rdma-bench: READ not posted: %s\n",
                 p.error().message.c_str());
    return false;
  }
  std::vector<kvmx::rdma::Completion> comp(1);
  auto n = r.poll(comp, 5000);
  if (!n) {
    std::fprintf(stderr, "kvmx-rdma-bench: %s\n", n.error().message.c_str());
    return false;
  }
  if (*n == 0) {
    std::fprintf(stderr, "kvmx-rdma-bench: no completion in 5 s\n");
    return false;
  }
  if (!comp[0].ok) {
    std::fprintf(stderr, "kvmx-rdma-bench: READ failed: status %d\n", comp[0].status);
    return false;
  }
  return true;
}

int fetch(const std::string& ip, uint16_t ctl_port, unsigned samples,
          unsigned depth, bool json) {
  socklen_t alen = 0;
  auto sa = tcp_addr(ip, ctl_port, &alen);
  int c = socket(sa.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (connect(c, reinterpret_cast<sockaddr*>(&sa), alen) != 0) {
    return die(std::string("control connect: ") + std::strerror(errno));
  }
  int one = 1;
  setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  Header h{};
  if (!read_all(c, &h, sizeof(h)) || h.magic != kHdrMagic) return die("header");
  kvmx::rdma::RemoteRegion region = to_region(h.main);
  kvmx::rdma::Reader::Options o;
  o.slots = depth;
  auto rd = kvmx::rdma::Reader::connect(ip, h.rdma_port, h.token, o);
  if (!rd) return die(rd.error().message);
  kvmx::rdma::Reader& r = **rd;
  const uint64_t pages = h.main.length / kPage;
  std::mt19937_64 rng(42);
  uint64_t bad = 0;
  std::vector<kvmx::rdma::Completion> comp(depth);

  // 1. Latency, one at a time, alternating so both see the same link.
  std::vector<double> lat_rdma, lat_tcp;
  std::vector<uint8_t> page(kPage);
  for (unsigned i = 0; i < samples; i++) {
    uint64_t pg = rng() % pages;
    auto t0 = Clock::now();
    if (!read_one(r, region, pg * kPage)) return die("RDMA READ failed");
    lat_rdma.push_back(
        std::chrono::duration<double, std::micro>(Clock::now() - t0).count());
    bad += !check(r.slot(0), pg);

    pg = rng() % pages;
    t0 = Clock::now();
    if (!ctl(c, 'P', pg) || !read_all(c, page.data(), kPage)) return die("tcp");
    lat_tcp.push_back(
        std::chrono::duration<double, std::micro>(Clock::now() - t0).count());
    bad += !check(page.data(), pg);
  }

  // 2. Bulk: every page once, `depth` in flight.
  uint64_t r0[3];
  if (!ctl(c, 'C', 0) || !read_all(c, r0, sizeof(r0))) return die("tcp");
  auto t0 = Clock::now();
  uint64_t next = 0, done = 0;
  std::vector<uint64_t> slot_page(depth);
  std::vector<uint32_t> free_slots;
  for (uint32_t s = 0; s < depth; s++) free_slots.push_back(s);
  while (done < pages) {
    while (next < pages && !free_slots.empty()) {
      uint32_t s = free_slots.back();
      free_slots.pop_back();
      slot_page[s] = next;
      if (auto p = r.post_read(s, region, next * kPage, kPage); !p) {
        return die(p.error().message);
      }
      next++;
    }
    auto got = r.poll(comp, 5000);
    if (!got) return die(got.error().message);
    if (*got == 0) return die("RDMA READ timed out");
    for (size_t i = 0; i < *got; i++) {
      if (!comp[i].ok) return die("RDMA READ failed");
      bad += !check(r.slot(comp[i].slot), slot_page[comp[i].slot]);
      free_slots.push_back(comp[i].slot);
      done++;
    }
  }
  double rdma_s = std::chrono::duration<double>(Clock::now() - t0).count();
  uint64_t r1[3];
  if (!ctl(c, 'C', 0) || !read_all(c, r1, sizeof(r1))) return die("tcp");

  // Pipelined TCP: `depth` requests ahead of the replies.
  t0 = Clock::now();
  uint64_t sent = 0, got = 0;
  while (got < pages) {
    while (sent < pages && sent - got < depth) {
      if (!ctl(c, 'P', sent)) return die("tcp");
      sent++;
    }
    if (!read_all(c, page.data(), kPage)) return die("tcp");
    bad += !check(page.data(), got);
    got++;
  }
  double tcp_s = std::chrono::duration<double>(Clock::now() - t0).count();
  uint64_t r2[3];
  if (!ctl(c, 'C', 0) || !read_all(c, r2, sizeof(r2))) return die("tcp");

  // 3. Staleness probe: the server writes each probe region after it was
  // registered; READ it and compare.
  nlohmann::json stale;
  for (uint32_t k = 0; k < kProbeCases && k < h.probes; k++) {
    uint64_t ack;
    if (!ctl(c, 'M', k) || !read_all(c, &ack, sizeof(ack))) return die("tcp");
    if (!read_one(r, to_region(h.probe[k]), 0)) return die("probe READ failed");
    uint8_t seen = r.slot(0)[0];
    stale[kProbeNames[k]] = {{"wrote", kProbeWritten}, {"read", seen},
                             {"stale", seen != kProbeWritten}};
  }
  ctl(c, 'Q', 0);
  close(c);

  Stats lr = percentiles(lat_rdma), lt = percentiles(lat_tcp);
  nlohmann::json j = {
      {"device", r.device()},
      {"region_mib", h.main.length >> 20},
      {"samples", samples},
      {"depth", depth},
      {"bad_pages", bad},
      {"rdma_read_us", {{"p50", lr.p50}, {"p99", lr.p99}}},
      {"tcp_us", {{"p50", lt.p50}, {"p99", lt.p99}}},
      {"latency_ratio_p50", lt.p50 > 0 ? lr.p50 / lt.p50 : 0},
      {"latency_ratio_p99", lt.p99 > 0 ? lr.p99 / lt.p99 : 0},
      {"bulk_rdma_pages_per_s", double(pages) / rdma_s},
      {"bulk_tcp_pages_per_s", double(pages) / tcp_s},
      {"server_cpu_ns_per_page_rdma", double(r1[0] - r0[0]) / double(pages)},
      {"server_cpu_ns_per_page_tcp", double(r2[0] - r1[0]) / double(pages)},
      {"server_machine_cpu_ns_per_page_rdma", double(r1[2] - r0[2]) / double(pages)},
      {"server_machine_cpu_ns_per_page_tcp", double(r2[2] - r1[2]) / double(pages)},
      {"server_pages_served_rdma", r1[1] - r0[1]},
      {"server_pages_served_tcp", r2[1] - r1[1]},
      {"stale", stale},
  };
  std::printf("%s\n", json ? j.dump().c_str() : j.dump(2).c_str());
  return bad == 0 ? 0 : 2;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"kvmx-rdma-bench: RDMA READ against TCP for 4 KiB page fetch"};
  app.require_subcommand(1);
  std::string addr, file_dir;
  uint16_t port = 0, ctl_port = 4790;
  uint64_t mib = 64;
  unsigned samples = 2000, depth = 32, sessions = 1;
  bool json = false;
  auto* s = app.add_subcommand("serve", "export memory and answer requests");
  s->add_option("--addr", addr, "IP address of the RDMA interface")->required();
  s->add_option("--port", port, "RDMA (rdma_cm) port; 0: any");
  s->add_option("--ctl-port", ctl_port, "TCP control and page port");
  s->add_option("--mib", mib, "MiB to export")->check(CLI::Range(1, 4096));
  s->add_option("--sessions", sessions, "readers to serve, one after another; 0: no end");
  s->add_option("--file-dir", file_dir, "a directory on a disk file system (pin probe)");
  auto* f = app.add_subcommand("fetch", "measure against a server");
  f->add_option("--addr", addr, "the server's IP address")->required();
  f->add_option("--ctl-port", ctl_port, "TCP control port");
  f->add_option("--samples", samples, "latency samples")->check(CLI::Range(1, 1000000));
  f->add_option("--depth", depth, "READs in flight in bulk")->check(CLI::Range(1, 1024));
  f->add_flag("--json", json, "one line of JSON");
  CLI11_PARSE(app, argc, argv);
  if (s->parsed()) return serve(addr, port, ctl_port, mib, sessions, file_dir);
  return fetch(addr, ctl_port, samples, depth, json);
}
