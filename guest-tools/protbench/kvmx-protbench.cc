// kvmx-protbench: what guest-requested protection costs, measured inside
// the guest next to the guest's own mprotect() of the same memory, in one
// run.  One JSON object per line on stdout:
//
//   {"what": "protect+unprotect", "mech": "kvmx"|"mprotect", "bytes": N, "us": median}
//   {"what": "violation-delivery", "mech": "kvmx"|"mprotect", "us": median}
//   {"what": "write-loop", "mech": "none"|"kvmx-track"|"mprotect-track",
//    "bytes": N, "us_per_pass": median}
//
// "mprotect-track" is the classic user-space way to learn which pages a
// loop wrote: write-protect everything, take a SIGSEGV per first write to
// a page, unprotect that page.  kvmx-track reads the hypervisor's dirty log
// instead.
//
//   kvmx-protbench [--sizes 4K,2M,1G] [--reps N] [--loop-bytes 64M] [--passes N]
#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include <fcntl.h>
#include <sched.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <kvmx/kvmx-guest.h>

namespace {

using Clock = std::chrono::steady_clock;
constexpr uint64_t kPage = 4096;

double us_since(Clock::time_point t0)
{
    return std::chrono::duration<double, std::micro>(Clock::now() - t0).count();
}

double median(std::vector<double> v)
{
    std::sort(v.begin(), v.end());
    return v.empty() ? 0 : v[v.size() / 2];
}

[[noreturn]] void die(const char *what)
{
    std::fprintf(stderr, "kvmx-protbench: %s: %s\n", what, std::strerror(errno));
    std::exit(1);
}

uint64_t parse_size(const std::string &s)
{
    char *end = nullptr;
    uint64_t v = std::strtoull(s.c_str(), &end, 0);
    switch (end && *end ? *end : 0) {
    case 'K': case 'k': return v << 10;
    case 'M': case 'm': return v << 20;
    case 'G': case 'g': return v << 30;
    case 0: return v;
    default:
        std::fprintf(stderr, "kvmx-protbench: bad size '%s'\n", s.c_str());
        std::exit(2);
    }
}

uint8_t *map(uint64_t bytes)
{
    void *p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
        die("mmap");
    }
    // Guest-physically contiguous 2 MiB runs keep the extent count low.
    madvise(p, bytes, MADV_HUGEPAGE);
    std::memset(p, 0x5a, bytes);
    return static_cast<uint8_t *>(p);
}

int g_kvmx = -1;

uint64_t do_protect(void *addr, uint64_t len, uint32_t access, uint32_t action)
{
    struct kvmx_protect p = {};
    p.size = sizeof(p);
    p.mem_fd = -1;
    p.access = access;
    p.action = action;
    p.addr = reinterpret_cast<uint64_t>(addr);
    p.len = len;
    if (ioctl(g_kvmx, KVMX_G_PROTECT, &p) < 0) {
        die("KVMX_G_PROTECT");
    }
    return p.id;
}

kvmx_range range(void *addr, uint64_t len)
{
    kvmx_range r = {};
    r.size = sizeof(r);
    r.mem_fd = -1;
    r.addr = reinterpret_cast<uint64_t>(addr);
    r.len = len;
    return r;
}

void do_unprotect(void *addr, uint64_t len)
{
    kvmx_range r = range(addr, len);
    if (ioctl(g_kvmx, KVMX_G_UNPROTECT, &r) < 0) {
        die("KVMX_G_UNPROTECT");
    }
}

void emit(const char *what, const char *mech, uint64_t bytes, const char *key,
          double v)
{
    std::printf("{\"what\": \"%s\", \"mech\": \"%s\", \"bytes\": %llu, "
                "\"%s\": %.2f}\n", what, mech, (unsigned long long)bytes, key, v);
    std::fflush(stdout);
}

// ---- violation delivery ---------------------------------------------------

std::atomic<bool> g_got;
Clock::time_point g_t0;
double g_lat;
uint8_t *g_mprot_page;

void on_segv(int, siginfo_t *si, void *)
{
    g_lat = us_since(g_t0);
    g_got = true;
    if (g_mprot_page && si->si_addr >= g_mprot_page &&
        si->si_addr < g_mprot_page + kPage) {
        mprotect(g_mprot_page, kPage, PROT_READ | PROT_WRITE);
    }
}

void bench_violation(int reps)
{
    struct sigaction sa = {};
    sa.sa_sigaction = on_segv;
    sa.sa_flags = SA_SIGINFO;
    sigaction(SIGSEGV, &sa, nullptr);
    uint8_t *page = map(kPage);
    std::vector<double> kv, mp;

    for (int i = 0; i < reps; i++) {
        do_protect(page, kPage, KVMX_ACCESS_RO, KVMX_ACTION_SIGNAL);
        g_got = false;
        g_t0 = Clock::now();
        *(volatile uint8_t *)(page + 8) = (uint8_t)i;
        // The signal comes after the device's interrupt: wait for it.
        while (!g_got && us_since(g_t0) < 5e6) {
            sched_yield();
        }
        if (!g_got) {
            std::fprintf(stderr, "kvmx-protbench: no signal within 5 s\n");
            std::exit(1);
        }
        kv.push_back(g_lat);
        do_unprotect(page, kPage);
    }
    g_mprot_page = page;
    for (int i = 0; i < reps; i++) {
        mprotect(page, kPage, PROT_READ);
        g_got = false;
        g_t0 = Clock::now();
        *(volatile uint8_t *)(page + 8) = (uint8_t)i;
        mp.push_back(g_lat);
    }
    g_mprot_page = nullptr;
    emit("violation-delivery", "kvmx", kPage, "us", median(kv));
    emit("violation-delivery", "mprotect", kPage, "us", median(mp));
    munmap(page, kPage);
}

// ---- write loop with and without dirty tracking ----------------------------

uint8_t *g_track_base;
uint64_t g_track_len;
std::vector<uint8_t> *g_track_dirty;

void on_segv_track(int, siginfo_t *si, void *)
{
    auto *a = static_cast<uint8_t *>(si->si_addr);
    if (a < g_track_base || a >= g_track_base + g_track_len) {
        std::signal(SIGSEGV, SIG_DFL);
        return;
    }
    uint64_t pg = (a - g_track_base) / kPage;
    (*g_track_dirty)[pg] = 1;
    mprotect(g_track_base + pg * kPage, kPage, PROT_READ | PROT_WRITE);
}

void bench_write_loop(uint64_t bytes, int passes)
{
    uint8_t *buf = map(bytes);
    uint64_t pages = bytes / kPage;
    std::vector<double> none, kt, mt;
    auto pass = [&](int n) {
        for (uint64_t off = 0; off < bytes; off += 64) {
            buf[off] = (uint8_t)(off + n);
        }
    };

    for (int i = 0; i < passes; i++) {
        auto t0 = Clock::now();
        pass(i);
        none.push_back(us_since(t0));
    }

    kvmx_range r = range(buf, bytes);
    if (ioctl(g_kvmx, KVMX_G_TRACK_START, &r) < 0) {
        die("KVMX_G_TRACK_START");
    }
    std::vector<uint8_t> bitmap((pages + 7) / 8);
    for (int i = 0; i < passes; i++) {
        auto t0 = Clock::now();
        pass(i);
        kvmx_range d = range(buf, bytes);
        d.bitmap = reinterpret_cast<uint64_t>(bitmap.data());
        d.bitmap_len = bitmap.size();
        if (ioctl(g_kvmx, KVMX_G_TRACK_DIRTY, &d) < 0) {
            die("KVMX_G_TRACK_DIRTY");
        }
        kt.push_back(us_since(t0));
        if (d.dirty != pages) {
            std::fprintf(stderr, "kvmx-protbench: tracking saw %llu of %llu "
                         "written pages\n", (unsigned long long)d.dirty,
                         (unsigned long long)pages);
            std::exit(1);
        }
    }
    if (ioctl(g_kvmx, KVMX_G_TRACK_STOP, &r) < 0) {
        die("KVMX_G_TRACK_STOP");
    }

    std::vector<uint8_t> dirty(pages);
    g_track_base = buf;
    g_track_len = bytes;
    g_track_dirty = &dirty;
    struct sigaction sa = {};
    sa.sa_sigaction = on_segv_track;
    sa.sa_flags = SA_SIGINFO;
    sigaction(SIGSEGV, &sa, nullptr);
    for (int i = 0; i < passes; i++) {
        auto t0 = Clock::now();
        std::fill(dirty.begin(), dirty.end(), 0);
        mprotect(buf, bytes, PROT_READ);
        pass(i);
        mt.push_back(us_since(t0));
    }
    emit("write-loop", "none", bytes, "us_per_pass", median(none));
    emit("write-loop", "kvmx-track", bytes, "us_per_pass", median(kt));
    emit("write-loop", "mprotect-track", bytes, "us_per_pass", median(mt));
    munmap(buf, bytes);
}

} // namespace

int main(int argc, char **argv)
{
    std::vector<uint64_t> sizes = {kPage, 2ull << 20, 1ull << 30};
    int reps = 11, passes = 5;
    uint64_t loop_bytes = 64ull << 20;

    for (int i = 1; i < argc; i++) {
        std::string a = argv[i];
        auto next = [&]() -> std::string {
            if (i + 1 >= argc) {
                std::fprintf(stderr, "kvmx-protbench: %s needs a value\n", a.c_str());
                std::exit(2);
            }
            return argv[++i];
        };
        if (a == "--sizes") {
            sizes.clear();
            std::string v = next();
            size_t p = 0;
            while (p <= v.size()) {
                size_t q = v.find(',', p);
                sizes.push_back(parse_size(v.substr(p, q - p)));
                if (q == std::string::npos) {
                    break;
                }
                p = q + 1;
            }
        } else if (a == "--reps") {
            reps = std::atoi(next().c_str());
        } else if (a == "--passes") {
            passes = std::atoi(next().c_str());
        } else if (a == "--loop-bytes") {
            loop_bytes = parse_size(next());
        } else {
            std::fprintf(stderr, "usage: kvmx-protbench [--sizes 4K,2M,1G] "
                         "[--reps N] [--loop-bytes 64M] [--passes N]\n");
            return 2;
        }
    }
    g_kvmx = open("/dev/kvmx", O_RDWR | O_CLOEXEC);
    if (g_kvmx < 0) {
        die("/dev/kvmx");
    }
    for (uint64_t sz : sizes) {
        uint8_t *buf = map(sz);
        std::vector<double> kv, mp;
        for (int i = 0; i < reps; i++) {
            auto t0 = Clock::now();
            do_protect(buf, sz, KVMX_ACCESS_RO, KVMX_ACTION_DENY);
            do_unprotect(buf, sz);
            kv.push_back(us_since(t0));
            t0 = Clock::now();
            if (mprotect(buf, sz, PROT_READ) || mprotect(buf, sz, PROT_READ | PROT_WRITE)) {
                die("mprotect");
            }
            mp.push_back(us_since(t0));
        }
        emit("protect+unprotect", "kvmx", sz, "us", median(kv));
        emit("protect+unprotect", "mprotect", sz, "us", median(mp));
        munmap(buf, sz);
    }
    bench_violation(reps);
    bench_write_loop(loop_bytes, passes);
    return 0;
}
