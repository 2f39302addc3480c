// SPDX-License-Identifier: GPL-2.0-or-later
// kvmx-prottest: exercise /dev/kvmx (include/kvmx/kvmx-guest.h) from the
// protected process itself, inside the test guest (kvmx_guest.ko loaded,
// a kvmx-chan device present).
//
//   kvmx-prottest signal|deny|log|none|track|exit|bad|user|all
//   kvmx-prottest hold PAGES
//   kvmx-prottest --as-user UID -- COMMAND [ARG...]
//
// One line per check on stdout: "PASS <name>" or "FAIL <name> <detail>"
// ("SKIP <name> <why>" where a check cannot know what to expect);
// then "SUMMARY <passed> passed <failed> failed".  Exit status 0 when every
// check passed, 1 otherwise (2: usage).
//
//  signal  ro+signal on an own page: a write is dropped and SIGSEGV arrives
//          (asynchronously, after the device's interrupt) with
//          si_code SEGV_ACCERR and si_addr = the written address; after
//          unprotect a write sticks.
//  deny    ro+deny: the write is dropped, an event arrives, no signal.
//  log     ro+log: the write happens, an event arrives, no signal.
//  none    none+deny: reads see zeros, a write is dropped, the page is
//          intact after unprotect.
//  track   dirty tracking of 64 pages: exactly the written pages, each call.
//  exit    protections end with their process (own protection, protection
//          made through /proc/PID/mem and a SIGKILL), not with the fd.
//  bad     every bad argument gets its errno and nothing is left behind;
//          the ENOSPC and E2BIG limits; the kernel is not tainted by a
//          warning.
//  shared  a protection acts on guest frames, so only private anonymous
//          memory may be protected or tracked: MAP_SHARED anonymous
//          memory, a memfd (shared and private), SysV shm and hugetlb
//          pages (when the guest has any) get EOPNOTSUPP from PROTECT and
//          TRACK_START, while a second process maps the same memory and
//          can still write it; private anonymous memory still works.
//  rate    60 PROTECT/UNPROTECT pairs of one page as fast as possible:
//          every one succeeds (the driver waits out the device's rate
//          limit of 20 a second, burst 20), so they take at least 1.5 s.
//  user    (run last by all) root protects a page of its own (log), then a
//          child drops to uid/gid 65534 and checks: (a) it opens /dev/kvmx
//          and protects its own page ro+signal (SIGSEGV, page unchanged,
//          its own event readable), unprotects it; kill-vm is EPERM;
//          (b) /proc/<root>/mem gives EACCES and without a mem_fd PROTECT,
//          UNPROTECT and TRACK_STOP on root's process give EPERM; (c) LIST
//          does not show root's entry, and after root's logged violation
//          its O_NONBLOCK read gives EAGAIN and poll nothing (root's own
//          reader gets the event); (d) 64 one-page protections, the 65th
//          (and a tracking) ENOSPC, root can still make one; (e) with
//          RLIMIT_MEMLOCK 1 MiB: 1 MiB + 4 KiB is ENOMEM, 1 MiB works and
//          shows in VmLck, one page more is ENOMEM, unprotect returns the
//          charge.  Root is charged as well but not limited.
//
// hold is a helper for scripts that drive kvmxctl: it maps PAGES pages
// (filled with 0xa5), prints "HOLD <pid> <addr> <len>" (hex addr and len)
// and waits; each SIGUSR1 makes it write one byte to its first and its last
// page; SIGTERM ends it (exit 0).  --as-user runs COMMAND with uid and gid
// UID and no supplementary groups (busybox has no su without a passwd
// entry), for checks that an unprivileged user is refused.
#include <fcntl.h>
#include <grp.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/shm.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cerrno>
#include <cinttypes>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <initializer_list>
#include <set>
#include <string>
#include <vector>

#include <kvmx/kvmx-guest.h>

namespace {

constexpr size_t kPage = 4096;
constexpr const char* kDevice = "/dev/" KVMX_GUEST_DEVICE_NAME;
constexpr uint8_t kPattern = 0xa5;
constexpr int kEventWaitMs = 10000;     // TCG is slow; the event is async

int g_passed, g_failed;

void pass(const std::string& name)
{
    g_passed++;
    std::printf("PASS %s\n", name.c_str());
    std::fflush(stdout);
}

__attribute__((format(printf, 2, 3)))
void failf(const std::string& name, const char* fmt, ...)
{
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    std::vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    g_failed++;
    std::printf("FAIL %s %s\n", name.c_str(), buf);
    std::fflush(stdout);
}

__attribute__((format(printf, 3, 4)))
bool check(bool ok, const std::string& name, const char* fmt, ...)
{
    if (ok) {
        pass(name);
        return true;
    }
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    std::vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    failf(name, "%s", buf);
    return false;
}

std::string errname(int e)
{
    if (e == 0)
        return "success";
    const char* n = strerrorname_np(e);
    return n ? n : std::to_string(e);
}

// errno of the last call, or 0 when rc >= 0.
int err_of(long rc) { return rc < 0 ? errno : 0; }

uint64_t now_ms()
{
    timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return uint64_t(ts.tv_sec) * 1000 + uint64_t(ts.tv_nsec) / 1000000;
}

int open_dev()
{
    int fd = open(kDevice, O_RDWR | O_CLOEXEC);
    if (fd < 0)
        failf("open", "%s: %s", kDevice, std::strerror(errno));
    return fd;
}

uint8_t* map_pages(size_t n)
{
    void* p = mmap(nullptr, n * kPage, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
        std::perror("kvmx-prottest: mmap");
        std::exit(1);
    }
    std::memset(p, kPattern, n * kPage);
    return static_cast<uint8_t*>(p);
}

uint64_t addr_of(const void* p) { return uint64_t(uintptr_t(p)); }

// ---- ioctl wrappers: 0 or the errno -----------------------------------------

int protect(int fd, void* addr, uint64_t len, uint32_t access, uint32_t action,
            uint64_t* id = nullptr, int pid = 0, int mem_fd = -1)
{
    kvmx_protect p{};
    p.size = sizeof(p);
    p.pid = pid;
    p.mem_fd = mem_fd;
    p.access = access;
    p.action = action;
    p.addr = addr_of(addr);
    p.len = len;
    int e = err_of(ioctl(fd, KVMX_G_PROTECT, &p));
    if (id)
        *id = e ? 0 : p.id;
    return e;
}

int range_op(int fd, unsigned long req, uint64_t addr, uint64_t len,
             int pid = 0, int mem_fd = -1)
{
    kvmx_range r{};
    r.size = sizeof(r);
    r.pid = pid;
    r.mem_fd = mem_fd;
    r.addr = addr;
    r.len = len;
    return err_of(ioctl(fd, req, &r));
}

int unprotect(int fd, void* addr, uint64_t len, int pid = 0, int mem_fd = -1)
{
    return range_op(fd, KVMX_G_UNPROTECT, addr_of(addr), len, pid, mem_fd);
}

// Pages (indices) reported dirty, or the errno in *err.
std::set<unsigned> track_dirty(int fd, void* addr, unsigned pages, int* err,
                               uint64_t* dirty_out = nullptr)
{
    std::vector<uint8_t> bm((pages + 7) / 8, 0);
    kvmx_range r{};
    r.size = sizeof(r);
    r.mem_fd = -1;
    r.addr = addr_of(addr);
    r.len = uint64_t(pages) * kPage;
    r.bitmap = addr_of(bm.data());
    r.bitmap_len = bm.size();
    r.dirty = ~0ull;
    std::set<unsigned> s;
    *err = err_of(ioctl(fd, KVMX_G_TRACK_DIRTY, &r));
    if (*err)
        return s;
    for (unsigned i = 0; i < pages; i++)
        if (bm[i / 8] & (1u << (i % 8)))
            s.insert(i);
    if (dirty_out)
        *dirty_out = r.dirty;
    return s;
}

std::vector<kvmx_prot_info> list(int fd, int pid, int* err = nullptr)
{
    std::vector<kvmx_prot_info> v(KVMX_MAX_PROTECTIONS + 8);
    kvmx_list l{};
    l.size = sizeof(l);
    l.pid = pid;
    l.count = uint32_t(v.size());
    l.entries = addr_of(v.data());
    int e = err_of(ioctl(fd, KVMX_G_LIST, &l));
    if (err)
        *err = e;
    if (e) {
        if (!err)
            failf("list", "KVMX_G_LIST pid %d: %s", pid, std::strerror(e));
        return {};
    }
    v.resize(std::min<size_t>(l.count, v.size()));
    return v;
}

const kvmx_prot_info* find_id(const std::vector<kvmx_prot_info>& v, uint64_t id)
{
    for (const auto& e : v)
        if (e.id == id)
            return &e;
    return nullptr;
}

std::string set_str(const std::set<unsigned>& s)
{
    std::string o = "{";
    for (unsigned i : s)
        o += (o.size() > 1 ? "," : "") + std::to_string(i);
    return o + "}";
}

// Events that arrive on fd within ms (stops at the first batch).
std::vector<kvmx_event> wait_events(int fd, int ms)
{
    std::vector<kvmx_event> out;
    uint64_t end = now_ms() + uint64_t(ms);
    while (out.empty()) {
        int left = int(int64_t(end) - int64_t(now_ms()));
        if (left <= 0)
            break;
        pollfd p{fd, POLLIN, 0};
        int n = poll(&p, 1, left);
        if (n < 0 && errno != EINTR)
            break;
        if (n <= 0)
            continue;
        kvmx_event ev[32];
        ssize_t got = read(fd, ev, sizeof(ev));
        if (got < 0) {
            if (errno == EINTR || errno == EAGAIN)
                continue;
            break;
        }
        for (size_t i = 0; i < size_t(got) / sizeof(kvmx_event); i++)
            out.push_back(ev[i]);
    }
    return out;
}

// An event for protection `id` (waiting up to ms), copied to *out.
bool wait_event_for(int fd, uint64_t id, int ms, kvmx_event* out)
{
    uint64_t end = now_ms() + uint64_t(ms);
    for (;;) {
        int left = int(int64_t(end) - int64_t(now_ms()));
        if (left <= 0)
            return false;
        for (const auto& ev : wait_events(fd, left))
            if (ev.id == id) {
                *out = ev;
                return true;
            }
    }
}

// The first offset in [p, p+len) that does not hold v, or -1.
long first_not(const uint8_t* p, size_t len, uint8_t v)
{
    const volatile uint8_t* q = p;
    for (size_t i = 0; i < len; i++)
        if (q[i] != v)
            return long(i);
    return -1;
}

// ---- SIGSEGV recording ------------------------------------------------------

volatile sig_atomic_t g_segv;
void* volatile g_si_addr;
volatile int g_si_code;

void on_segv(int, siginfo_t* si, void*)
{
    g_segv = g_segv + 1;
    g_si_addr = si->si_addr;
    g_si_code = si->si_code;
    if (g_segv > 1000) {        // a real fault would loop: give up
        static const char msg[] = "FAIL segv-loop endless SIGSEGV\n";
        (void)!write(1, msg, sizeof(msg) - 1);
        _exit(3);
    }
}

struct SegvCatcher {
    struct sigaction old {};
    SegvCatcher()
    {
        g_segv = 0;
        g_si_addr = nullptr;
        g_si_code = 0;
        struct sigaction sa {};
        sa.sa_sigaction = on_segv;
        sa.sa_flags = SA_SIGINFO;
        sigemptyset(&sa.sa_mask);
        sigaction(SIGSEGV, &sa, &old);
    }
    ~SegvCatcher() { sigaction(SIGSEGV, &old, nullptr); }
};

bool wait_segv(int ms)
{
    uint64_t end = now_ms() + uint64_t(ms);
    while (!g_segv && now_ms() < end)
        sched_yield();
    return g_segv != 0;
}

void settle(int ms)     // let a stray interrupt / signal arrive
{
    uint64_t end = now_ms() + uint64_t(ms);
    while (now_ms() < end)
        sched_yield();
}

// ---- tests ---------------------------------------------------------------------

void test_signal()
{
    const std::string t = "signal";
    int fd = open_dev();
    if (fd < 0)
        return;
    uint8_t* page = map_pages(1);
    SegvCatcher catcher;
    uint64_t id = 0;
    int e = protect(fd, page, kPage, KVMX_ACCESS_RO, KVMX_ACTION_SIGNAL, &id);
    if (!check(e == 0 && id != 0, t + ".protect", "errno %s id %" PRIu64,
               errname(e).c_str(), id)) {
        close(fd);
        munmap(page, kPage);
        return;
    }
    auto v = list(fd, getpid());
    const kvmx_prot_info* pi = find_id(v, id);
    check(pi && pi->kind == KVMX_KIND_PROTECT && pi->addr == addr_of(page) &&
              pi->len == kPage && pi->pid == getpid() &&
              pi->access == KVMX_ACCESS_RO && pi->action == KVMX_ACTION_SIGNAL &&
              pi->violations == 0,
          t + ".list", "entry %s in a list of %zu", pi ? "wrong" : "missing",
          v.size());

    static_cast<volatile uint8_t*>(page)[123] = 0x5a;
    bool got = wait_segv(kEventWaitMs);
    if (check(got, t + ".delivered", "no SIGSEGV within %d ms", kEventWaitMs)) {
        check(g_si_addr == page + 123, t + ".si_addr",
              "si_addr %p, want %p (page %p)", g_si_addr, page + 123, page);
        check(g_si_code == SEGV_ACCERR, t + ".si_code",
              "si_code %d, want SEGV_ACCERR (%d)", g_si_code, SEGV_ACCERR);
    }
    long bad = first_not(page, kPage, kPattern);
    check(bad < 0, t + ".unchanged", "offset %ld holds %#x, want %#x", bad,
          bad < 0 ? 0 : page[bad], kPattern);
    settle(300);
    check(g_segv == 1, t + ".once", "%d signals for one write", int(g_segv));
    v = list(fd, getpid());
    pi = find_id(v, id);
    check(pi && pi->violations == 1, t + ".violations",
          "LIST violations %" PRIu64 ", want 1", pi ? uint64_t(pi->violations) : 0);

    e = unprotect(fd, page, kPage);
    check(e == 0, t + ".unprotect", "errno %s", errname(e).c_str());
    check(!find_id(list(fd, getpid()), id), t + ".unlisted",
          "id %" PRIu64 " still listed", id);
    int before = g_segv;
    static_cast<volatile uint8_t*>(page)[123] = 0x5a;
    settle(300);
    check(static_cast<volatile uint8_t*>(page)[123] == 0x5a && g_segv == before,
          t + ".write-after", "byte %#x signals %d->%d",
          static_cast<volatile uint8_t*>(page)[123], before, int(g_segv));
    close(fd);
    munmap(page, kPage);
}

// deny and log: a write at offset 200; an event; no signal.
void test_deny_log(uint32_t action)
{
    const std::string t = action == KVMX_ACTION_DENY ? "deny" : "log";
    const bool lands = action == KVMX_ACTION_LOG;
    int fd = open_dev();
    if (fd < 0)
        return;
    uint8_t* page = map_pages(1);
    SegvCatcher catcher;
    uint64_t id = 0;
    int e = protect(fd, page, kPage, KVMX_ACCESS_RO, action, &id);
    if (!check(e == 0 && id != 0, t + ".protect", "errno %s", errname(e).c_str())) {
        close(fd);
        munmap(page, kPage);
        return;
    }
    static_cast<volatile uint8_t*>(page)[200] = 0x11;
    kvmx_event ev{};
    bool got = wait_event_for(fd, id, kEventWaitMs, &ev);
    if (check(got, t + ".event", "no event for id %" PRIu64 " within %d ms", id,
              kEventWaitMs)) {
        check(ev.addr == addr_of(page) + 200 && ev.pid == getpid() &&
                  ev.access == KVMX_VIOLATION_WRITE && ev.action == action &&
                  ev.len == 1 && ev.gpa % kPage == 200,
              t + ".event-fields",
              "addr %#" PRIx64 " (want %#" PRIx64 ") pid %d access %u action %u "
              "len %u gpa %#" PRIx64,
              uint64_t(ev.addr), addr_of(page) + 200, ev.pid, ev.access,
              ev.action, ev.len, uint64_t(ev.gpa));
    }
    settle(300);
    check(g_segv == 0, t + ".no-signal", "%d SIGSEGV", int(g_segv));
    if (lands) {
        uint8_t b = static_cast<volatile uint8_t*>(page)[200];
        page[200] = kPattern;   // compare the rest below
        check(b == 0x11, t + ".written", "byte %#x, want 0x11", b);
        // (the restore above is itself a logged write)
    }
    long bad = first_not(page, kPage, kPattern);
    check(bad < 0, t + (lands ? ".rest-unchanged" : ".unchanged"),
          "offset %ld holds %#x", bad, bad < 0 ? 0 : page[bad]);
    e = unprotect(fd, page, kPage);
    check(e == 0, t + ".unprotect", "errno %s", errname(e).c_str());
    static_cast<volatile uint8_t*>(page)[200] = 0x22;
    check(static_cast<volatile uint8_t*>(page)[200] == 0x22, t + ".write-after",
          "write did not stick");
    close(fd);
    munmap(page, kPage);
}

void test_none()
{
    const std::string t = "none";
    int fd = open_dev();
    if (fd < 0)
        return;
    uint8_t* page = map_pages(1);
    SegvCatcher catcher;
    uint64_t id = 0;
    int e = protect(fd, page, kPage, KVMX_ACCESS_NONE, KVMX_ACTION_DENY, &id);
    if (!check(e == 0 && id != 0, t + ".protect", "errno %s", errname(e).c_str())) {
        close(fd);
        munmap(page, kPage);
        return;
    }
    uint64_t v = static_cast<volatile uint64_t*>(static_cast<void*>(page))[0];
    check(v == 0, t + ".read-zero", "read %#" PRIx64 ", want 0", v);
    kvmx_event ev{};
    if (check(wait_event_for(fd, id, kEventWaitMs, &ev), t + ".read-event",
              "no event within %d ms", kEventWaitMs))
        check(ev.access == KVMX_VIOLATION_READ && ev.addr == addr_of(page) &&
                  ev.action == KVMX_ACTION_DENY,
              t + ".read-event-fields", "access %u addr %#" PRIx64 " action %u",
              ev.access, uint64_t(ev.addr), ev.action);
    static_cast<volatile uint8_t*>(page)[10] = 0x33;
    if (check(wait_event_for(fd, id, kEventWaitMs, &ev), t + ".write-event",
              "no event within %d ms", kEventWaitMs))
        check(ev.access == KVMX_VIOLATION_WRITE && ev.addr == addr_of(page) + 10,
              t + ".write-event-fields", "access %u addr %#" PRIx64, ev.access,
              uint64_t(ev.addr));
    // The whole page reads as zeros (8-byte reads: fewer events).
    long nz = -1;
    for (size_t i = 0; i < kPage / 8; i++)
        if (static_cast<volatile uint64_t*>(static_cast<void*>(page))[i]) {
            nz = long(i * 8);
            break;
        }
    check(nz < 0, t + ".all-zero", "offset %ld is not zero", nz);
    e = unprotect(fd, page, kPage);
    check(e == 0, t + ".unprotect", "errno %s", errname(e).c_str());
    long bad = first_not(page, kPage, kPattern);
    check(bad < 0, t + ".unchanged", "offset %ld holds %#x after unprotect", bad,
          bad < 0 ? 0 : page[bad]);
    check(g_segv == 0, t + ".no-signal", "%d SIGSEGV", int(g_segv));
    close(fd);
    munmap(page, kPage);
}

void test_track()
{
    const std::string t = "track";
    constexpr unsigned kPages = 64;
    int fd = open_dev();
    if (fd < 0)
        return;
    uint8_t* p = map_pages(kPages);     // touched: every page written
    int e = range_op(fd, KVMX_G_TRACK_START, addr_of(p), kPages * kPage);
    if (!check(e == 0, t + ".start", "errno %s", errname(e).c_str())) {
        close(fd);
        munmap(p, kPages * kPage);
        return;
    }
    auto* vp = static_cast<volatile uint8_t*>(p);
    const std::set<unsigned> want = {0, 5, 6, 63};
    for (unsigned i : want)
        vp[i * kPage + 17] = uint8_t(i);
    uint64_t dirty = 0;
    auto got = track_dirty(fd, p, kPages, &e, &dirty);
    check(e == 0 && got == want && dirty == want.size(), t + ".first",
          "errno %s pages %s dirty %" PRIu64 ", want %s", errname(e).c_str(),
          set_str(got).c_str(), dirty, set_str(want).c_str());
    got = track_dirty(fd, p, kPages, &e, &dirty);
    check(e == 0 && got.empty() && dirty == 0, t + ".none",
          "errno %s pages %s dirty %" PRIu64 ", want {}", errname(e).c_str(),
          set_str(got).c_str(), dirty);
    vp[7 * kPage + 4095] = 7;
    got = track_dirty(fd, p, kPages, &e, &dirty);
    check(e == 0 && got == std::set<unsigned>{7} && dirty == 1, t + ".again",
          "errno %s pages %s dirty %" PRIu64 ", want {7}", errname(e).c_str(),
          set_str(got).c_str(), dirty);
    // A tracking is listed, and its bitmap must be big enough.
    auto l = list(fd, getpid());
    bool listed = false;
    for (const auto& x : l)
        listed |= x.kind == KVMX_KIND_TRACK && x.addr == addr_of(p) &&
                  x.len == kPages * kPage;
    check(listed, t + ".list", "tracking not listed");
    {
        uint8_t bm[8];
        kvmx_range r{};
        r.size = sizeof(r);
        r.mem_fd = -1;
        r.addr = addr_of(p);
        r.len = kPages * kPage;
        r.bitmap = addr_of(bm);
        r.bitmap_len = 7;
        e = err_of(ioctl(fd, KVMX_G_TRACK_DIRTY, &r));
        check(e == EINVAL, t + ".short-bitmap", "errno %s, want EINVAL",
              errname(e).c_str());
    }
    e = range_op(fd, KVMX_G_TRACK_STOP, addr_of(p), kPages * kPage);
    check(e == 0, t + ".stop", "errno %s", errname(e).c_str());
    track_dirty(fd, p, kPages, &e);
    check(e == ENOENT, t + ".after-stop", "TRACK_DIRTY errno %s, want ENOENT",
          errname(e).c_str());
    close(fd);
    munmap(p, kPages * kPage);
}

// Wait until LIST for pid is empty (ms), return what is left.
size_t wait_unlisted(int fd, int pid, int ms)
{
    uint64_t end = now_ms() + uint64_t(ms);
    size_t n;
    while ((n = list(fd, pid).size()) && now_ms() < end)
        settle(20);
    return n;
}

void test_exit()
{
    const std::string t = "exit";
    int fd = open_dev();
    if (fd < 0)
        return;

    // 1. A child protects its own page, closes /dev/kvmx, waits, exits.
    int up[2], down[2];
    if (pipe(up) || pipe(down)) {
        failf(t, "pipe: %s", std::strerror(errno));
        close(fd);
        return;
    }
    pid_t child = fork();
    if (child == 0) {
        close(up[0]);
        close(down[1]);
        int cfd = open(kDevice, O_RDWR | O_CLOEXEC);
        uint8_t* page = map_pages(1);
        uint64_t id = 0;
        int err = cfd < 0 ? errno : protect(cfd, page, kPage, KVMX_ACCESS_RO,
                                            KVMX_ACTION_DENY, &id);
        if (cfd >= 0)
            close(cfd);     // the protection does not belong to the fd
        uint64_t msg[2] = {uint64_t(err), id};
        (void)!write(up[1], msg, sizeof(msg));
        char c;
        (void)!read(down[0], &c, 1);
        _exit(0);           // no unprotect
    }
    close(up[1]);
    close(down[0]);
    uint64_t msg[2] = {~0ull, 0};
    (void)!read(up[0], msg, sizeof(msg));
    check(msg[0] == 0 && msg[1] != 0, t + ".child-protect", "child: errno %s",
          errname(int(msg[0])).c_str());
    auto v = list(fd, child);
    check(v.size() == 1 && v[0].id == msg[1], t + ".listed-after-close",
          "%zu entries for pid %d after the child closed its fd", v.size(),
          int(child));
    close(down[1]);
    int st = 0;
    waitpid(child, &st, 0);
    size_t left = wait_unlisted(fd, child, 2000);
    check(left == 0 && !find_id(list(fd, 0), msg[1]), t + ".released",
          "%zu entries left for pid %d after its exit", left, int(child));
    close(up[0]);

    // 2. We protect a child's page through /proc/PID/mem; SIGKILL it.
    uint8_t* page = map_pages(1);   // inherited by the child
    if (pipe(up)) {
        failf(t, "pipe: %s", std::strerror(errno));
        close(fd);
        return;
    }
    child = fork();
    if (child == 0) {
        close(up[0]);
        (void)!write(up[1], "r", 1);
        for (;;)
            pause();
    }
    close(up[1]);
    char c;
    (void)!read(up[0], &c, 1);
    close(up[0]);
    std::string path = "/proc/" + std::to_string(child) + "/mem";
    int mem = open(path.c_str(), O_RDONLY | O_CLOEXEC);
    uint64_t id = 0;
    int e = mem < 0 ? errno
                    : protect(fd, page, kPage, KVMX_ACCESS_RO, KVMX_ACTION_DENY,
                              &id, child, mem);
    check(e == 0, t + ".other-protect", "protect via %s: %s", path.c_str(),
          errname(e).c_str());
    v = list(fd, child);
    check(v.size() == 1 && v[0].id == id && v[0].pid == child, t + ".other-listed",
          "%zu entries for pid %d", v.size(), int(child));
    if (mem >= 0)
        close(mem);
    kill(child, SIGKILL);
    waitpid(child, &st, 0);
    left = wait_unlisted(fd, child, 2000);
    check(left == 0, t + ".killed-released", "%zu entries left for pid %d",
          left, int(child));
    // Our own copy of the page was never protected.
    static_cast<volatile uint8_t*>(page)[1] = 0x44;
    check(static_cast<volatile uint8_t*>(page)[1] == 0x44, t + ".parent-page",
          "the parent's page was affected");
    munmap(page, kPage);
    close(fd);
}

// One expectation on an errno.
void expect(const std::string& name, int got, std::initializer_list<int> want)
{
    for (int w : want)
        if (got == w) {
            pass(name);
            return;
        }
    std::string ws;
    for (int w : want)
        ws += (ws.empty() ? "" : "|") + errname(w);
    failf(name, "errno %s, want %s", errname(got).c_str(), ws.c_str());
}

unsigned long read_taint()
{
    unsigned long v = 0;
    if (FILE* f = std::fopen("/proc/sys/kernel/tainted", "r")) {
        if (std::fscanf(f, "%lu", &v) != 1)
            v = 0;
        std::fclose(f);
    }
    return v;
}

// Refused: memory some other process may map.  For each kind, a child
// maps the same memory and writes it after the attempt: had the protection
// been made, that write would have been dropped.
void test_shared()
{
    const std::string t = "shared";
    int fd = open_dev();
    if (fd < 0)
        return;
    const size_t baseline = list(fd, 0).size();
    auto sharer_writes = [&](const std::string& name, uint8_t* m) {
        // Another process (a fork shares MAP_SHARED memory) writes it.
        m[0] = 0;
        pid_t c = fork();
        if (c == 0) {
            m[0] = 0x5a;
            _exit(0);
        }
        int st = 0;
        waitpid(c, &st, 0);
        check(m[0] == 0x5a, t + "." + name + ".sharer-writes",
              "the other process's write %s", m[0] == 0x5a ? "landed" : "was lost");
    };
    // shared: a second process maps it; its write must land, which it
    // would not while a protection made by the first stood.
    auto try_kind = [&](const std::string& name, uint8_t* m, size_t len,
                        bool shared = false) {
        uint64_t id = 0;
        int e = protect(fd, m, len, KVMX_ACCESS_RO, KVMX_ACTION_DENY, &id);
        if (shared)
            sharer_writes(name, m);
        if (!e)
            unprotect(fd, m, len);
        expect(t + "." + name + ".protect", e, {EOPNOTSUPP});
        int te = range_op(fd, KVMX_G_TRACK_START, addr_of(m), len);
        if (!te)
            range_op(fd, KVMX_G_TRACK_STOP, addr_of(m), len);
        expect(t + "." + name + ".track", te, {EOPNOTSUPP});
    };
    void* m = mmap(nullptr, kPage, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) {
        failf(t + ".anon-shared", "mmap: %s", std::strerror(errno));
    } else {
        std::memset(m, kPattern, kPage);
        try_kind("anon-shared", static_cast<uint8_t*>(m), kPage, true);
        munmap(m, kPage);
    }

    int mfd = memfd_create("kvmx-prottest", MFD_CLOEXEC);
    if (mfd < 0 || ftruncate(mfd, kPage) < 0) {
        failf(t + ".memfd", "memfd_create: %s", std::strerror(errno));
    } else {
        m = mmap(nullptr, kPage, PROT_READ | PROT_WRITE, MAP_SHARED, mfd, 0);
        if (m != MAP_FAILED) {
            std::memset(m, kPattern, kPage);
            try_kind("memfd-shared", static_cast<uint8_t*>(m), kPage, true);
            munmap(m, kPage);
        } else {
            failf(t + ".memfd-shared", "mmap: %s", std::strerror(errno));
        }
        // Private, but a file's: refused too (only anonymous memory).
        m = mmap(nullptr, kPage, PROT_READ | PROT_WRITE, MAP_PRIVATE, mfd, 0);
        if (m != MAP_FAILED) {
            static_cast<uint8_t*>(m)[0] = 1;
            try_kind("memfd-private", static_cast<uint8_t*>(m), kPage);
            munmap(m, kPage);
        } else {
            failf(t + ".memfd-private", "mmap: %s", std::strerror(errno));
        }
    }
    if (mfd >= 0)
        close(mfd);

    int shmid = shmget(IPC_PRIVATE, kPage, IPC_CREAT | 0600);
    void* sm = shmid >= 0 ? shmat(shmid, nullptr, 0) : reinterpret_cast<void*>(-1);
    if (shmid >= 0)
        shmctl(shmid, IPC_RMID, nullptr);     // gone with the last detach
    if (sm == reinterpret_cast<void*>(-1)) {
        std::printf("SKIP %s.sysv no SysV shm: %s\n", t.c_str(), std::strerror(errno));
    } else {
        std::memset(sm, kPattern, kPage);
        try_kind("sysv", static_cast<uint8_t*>(sm), kPage, true);
        shmdt(sm);
    }

    // hugetlb: reserve two pages for the check if the guest has none.
    {
        const size_t huge = 2u << 20;
        int nr = open("/proc/sys/vm/nr_hugepages", O_RDWR | O_CLOEXEC);
        char old[32] = "";
        ssize_t n = nr >= 0 ? pread(nr, old, sizeof(old) - 1, 0) : -1;
        if (n > 0 && std::atoi(old) < 2)
            (void)!pwrite(nr, "2\n", 2, 0);
        m = mmap(nullptr, huge, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB, -1, 0);
        if (m == MAP_FAILED) {
            std::printf("SKIP %s.hugetlb no huge pages: %s\n", t.c_str(), std::strerror(errno));
        } else {
            static_cast<uint8_t*>(m)[0] = 1;
            try_kind("hugetlb", static_cast<uint8_t*>(m), huge);
            munmap(m, huge);
        }
        if (n > 0 && std::atoi(old) < 2)
            (void)!pwrite(nr, old, size_t(n), 0);
        if (nr >= 0)
            close(nr);
    }

    // A range that starts private anonymous and runs into shared memory.
    {
        auto* a = static_cast<uint8_t*>(mmap(nullptr, 2 * kPage, PROT_READ | PROT_WRITE,
                                             MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
        void* b = a == MAP_FAILED ? MAP_FAILED :
            mmap(a + kPage, kPage, PROT_READ | PROT_WRITE,
                 MAP_SHARED | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
        if (b == MAP_FAILED) {
            failf(t + ".mixed", "mmap: %s", std::strerror(errno));
        } else {
            std::memset(a, kPattern, 2 * kPage);
            try_kind("mixed", a, 2 * kPage);
            // The private half alone is fine.
            int e = protect(fd, a, kPage, KVMX_ACCESS_RO, KVMX_ACTION_DENY);
            check(e == 0, t + ".private-ok", "private anonymous page: errno %s",
                  errname(e).c_str());
            if (!e)
                expect(t + ".private-unprotect", unprotect(fd, a, kPage), {0});
        }
        if (a != MAP_FAILED)
            munmap(a, 2 * kPage);
    }
    check(list(fd, 0).size() == baseline, t + ".nothing-left", "entries left behind");
    close(fd);
}

// The device allows about 20 changes a second; the driver retries.
void test_rate()
{
    const std::string t = "rate";
    constexpr int kPairs = 60;
    int fd = open_dev();
    if (fd < 0)
        return;
    uint8_t* p = map_pages(1);
    int bad = 0, first_err = 0;
    uint64_t t0 = now_ms();
    for (int i = 0; i < kPairs; i++) {
        int e = protect(fd, p, kPage, KVMX_ACCESS_RO, KVMX_ACTION_DENY);
        int u = e ? 0 : unprotect(fd, p, kPage);
        if (e || u) {
            bad++;
            first_err = first_err ? first_err : (e ? e : u);
        }
    }
    uint64_t ms = now_ms() - t0;
    std::printf("INFO %s %d pairs in %" PRIu64 " ms\n", t.c_str(), kPairs, ms);
    check(!bad, t + ".all-succeed", "%d of %d failed, first errno %s", bad, kPairs,
          errname(first_err).c_str());
    check(ms >= 1500, t + ".limited", "%d protections in %" PRIu64 " ms: the device's "
          "limit (20/s, burst 20) should make it take >= 1500 ms", kPairs, ms);
    munmap(p, kPage);
    close(fd);
}

void test_bad()
{
    const std::string t = "bad";
    int fd = open_dev();
    if (fd < 0)
        return;
    uint8_t* p = map_pages(4);
    const size_t baseline = list(fd, 0).size();

    // Raw PROTECT with one field changed; undo an unexpected success.
    auto bad_protect = [&](const std::string& name,
                           const std::function<void(kvmx_protect&)>& edit,
                           std::initializer_list<int> want) {
        kvmx_protect x{};
        x.size = sizeof(x);
        x.mem_fd = -1;
        x.access = KVMX_ACCESS_RO;
        x.action = KVMX_ACTION_DENY;
        x.addr = addr_of(p);
        x.len = kPage;
        edit(x);
        int e = err_of(ioctl(fd, KVMX_G_PROTECT, &x));
        if (e == 0) {
            kvmx_range r{};
            r.size = sizeof(r);
            r.pid = x.pid;
            r.mem_fd = x.mem_fd;
            r.addr = x.addr;
            r.len = x.len;
            ioctl(fd, KVMX_G_UNPROTECT, &r);
        }
        expect(t + "." + name, e, want);
    };
    bad_protect("size-short", [](auto& x) { x.size = sizeof(x) - 8; }, {EINVAL});
    bad_protect("size-zero", [](auto& x) { x.size = 0; }, {EINVAL});
    bad_protect("flags", [](auto& x) { x.flags = 1; }, {EINVAL});
    bad_protect("access-0", [](auto& x) { x.access = 0; }, {EINVAL});
    bad_protect("access-3", [](auto& x) { x.access = 3; }, {EINVAL});
    bad_protect("action-0", [](auto& x) { x.action = 0; }, {EINVAL});
    bad_protect("action-5", [](auto& x) { x.action = 5; }, {EINVAL});
    bad_protect("addr-unaligned", [&](auto& x) { x.addr = addr_of(p) + 1; }, {EINVAL});
    bad_protect("len-unaligned", [](auto& x) { x.len = kPage + 1; }, {EINVAL});
    bad_protect("len-zero", [](auto& x) { x.len = 0; }, {EINVAL});
    bad_protect("len-huge", [](auto& x) { x.len = KVMX_MAX_RANGE_BYTES + kPage; }, {EINVAL});
    bad_protect("overflow", [](auto& x) { x.addr = 0xfffffffffffff000ull; x.len = 2 * kPage; },
                {EINVAL, EFAULT});
    bad_protect("kernel-addr", [](auto& x) { x.addr = 0xffff888000000000ull; },
                {EFAULT, EINVAL});
    bad_protect("pid-negative", [](auto& x) { x.pid = -5; }, {EINVAL, ESRCH});
    bad_protect("pid-nonexistent", [](auto& x) { x.pid = 0x3ffffff0; }, {ESRCH});

    // Unmapped memory, whole and in part.
    {
        uint8_t* u = map_pages(2);
        munmap(u, 2 * kPage);
        bad_protect("unmapped", [&](auto& x) { x.addr = addr_of(u); }, {EFAULT});
        u = map_pages(2);
        munmap(u + kPage, kPage);
        bad_protect("half-mapped", [&](auto& x) { x.addr = addr_of(u); x.len = 2 * kPage; },
                    {EFAULT});
        uint64_t id;
        int e = protect(fd, u, kPage, KVMX_ACCESS_RO, KVMX_ACTION_DENY, &id);
        check(e == 0, t + ".half-mapped-then-ok",
              "the mapped half alone: errno %s", errname(e).c_str());
        if (!e)
            unprotect(fd, u, kPage);
        munmap(u, kPage);
    }
    {
        // A read-only mapping cannot be pinned for writing.
        void* ro = mmap(nullptr, kPage, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        bad_protect("readonly-mapping", [&](auto& x) { x.addr = addr_of(ro); }, {EFAULT});
        munmap(ro, kPage);
    }

    // More than KVMX_MAX_EXTENTS guest-physical runs: E2BIG.  The runs
    // are counted from /proc/self/pagemap (root sees the frame numbers), so
    // the check knows what to expect.
    {
        const size_t n = 2 * KVMX_MAX_EXTENTS + 256;
        auto* a = static_cast<uint8_t*>(mmap(nullptr, n * kPage, PROT_READ | PROT_WRITE,
                                             MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
        auto* b = static_cast<uint8_t*>(mmap(nullptr, n * kPage, PROT_READ | PROT_WRITE,
                                             MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
        if (a == MAP_FAILED || b == MAP_FAILED) {
            failf(t + ".e2big", "mmap: %s", std::strerror(errno));
        } else {
            madvise(a, n * kPage, MADV_NOHUGEPAGE);
            madvise(b, n * kPage, MADV_NOHUGEPAGE);
            for (size_t i = 0; i < n; i++) {    // interleave the frames
                a[i * kPage] = 1;
                b[i * kPage] = 1;
            }
            size_t runs = 0;
            uint64_t prev = 0;
            bool known = true;
            int pm = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
            for (size_t i = 0; i < n && known; i++) {
                uint64_t ent = 0;
                known = pm >= 0 && pread(pm, &ent, 8, off_t(addr_of(a) / kPage + i) * 8) == 8;
                uint64_t pfn = ent & ((1ull << 55) - 1);
                known = known && (ent >> 63) && pfn;
                if (!i || pfn != prev + 1)
                    runs++;
                prev = pfn;
            }
            if (pm >= 0)
                close(pm);
            int e = protect(fd, a, n * kPage, KVMX_ACCESS_RO, KVMX_ACTION_LOG);
            if (!e)
                unprotect(fd, a, n * kPage);
            if (!known)
                std::printf("SKIP %s.e2big frame numbers not readable (errno %s)\n",
                            t.c_str(), errname(e).c_str());
            else if (runs > KVMX_MAX_EXTENTS)
                check(e == E2BIG, t + ".e2big", "%zu runs: errno %s, want E2BIG", runs,
                      errname(e).c_str());
            else
                check(e == 0, t + ".e2big-fits", "%zu runs: errno %s, want success", runs,
                      errname(e).c_str());
        }
        if (a != MAP_FAILED)
            munmap(a, n * kPage);
        if (b != MAP_FAILED)
            munmap(b, n * kPage);
    }

    // Overlaps.
    {
        uint64_t id;
        int e = protect(fd, p, 2 * kPage, KVMX_ACCESS_RO, KVMX_ACTION_DENY, &id);
        check(e == 0, t + ".overlap-setup", "errno %s", errname(e).c_str());
        expect(t + ".overlap-same", protect(fd, p, 2 * kPage, KVMX_ACCESS_RO, KVMX_ACTION_LOG), {EEXIST});
        expect(t + ".overlap-part", protect(fd, p + kPage, 2 * kPage, KVMX_ACCESS_RO, KVMX_ACTION_LOG), {EEXIST});
        expect(t + ".overlap-inside", protect(fd, p + kPage, kPage, KVMX_ACCESS_NONE, KVMX_ACTION_LOG), {EEXIST});
        expect(t + ".unprotect-wrong-len", unprotect(fd, p, kPage), {ENOENT});
        expect(t + ".unprotect-wrong-addr", unprotect(fd, p + kPage, kPage), {ENOENT});
        // Tracking may overlap a protection, not another tracking.
        int te = range_op(fd, KVMX_G_TRACK_START, addr_of(p), 2 * kPage);
        expect(t + ".track-over-protect", te, {0});
        expect(t + ".track-overlap",
               range_op(fd, KVMX_G_TRACK_START, addr_of(p) + kPage, kPage), {EEXIST});
        if (!te)
            expect(t + ".track-stop", range_op(fd, KVMX_G_TRACK_STOP, addr_of(p), 2 * kPage), {0});
        if (!e)
            expect(t + ".overlap-cleanup", unprotect(fd, p, 2 * kPage), {0});
    }
    expect(t + ".unprotect-none", unprotect(fd, p, kPage), {ENOENT});
    expect(t + ".track-stop-none", range_op(fd, KVMX_G_TRACK_STOP, addr_of(p), kPage), {ENOENT});
    {
        int e;
        track_dirty(fd, p, 1, &e);
        expect(t + ".track-dirty-none", e, {ENOENT});
    }

    // Struct sizes and flags of the other ioctls.
    {
        kvmx_range r{};
        r.size = sizeof(r) - 8;
        r.mem_fd = -1;
        r.addr = addr_of(p);
        r.len = kPage;
        expect(t + ".range-size", err_of(ioctl(fd, KVMX_G_UNPROTECT, &r)), {EINVAL});
        r.size = sizeof(r);
        r.flags = 2;
        expect(t + ".range-flags", err_of(ioctl(fd, KVMX_G_TRACK_START, &r)), {EINVAL});
        r.flags = 0;
        r.addr = addr_of(p) + 8;
        expect(t + ".range-unaligned", err_of(ioctl(fd, KVMX_G_TRACK_START, &r)), {EINVAL});
        r.addr = 0xffff888000000000ull;
        expect(t + ".range-kernel", err_of(ioctl(fd, KVMX_G_TRACK_START, &r)), {EFAULT, EINVAL});
        kvmx_list l{};
        l.size = sizeof(l) + 8;
        expect(t + ".list-size", err_of(ioctl(fd, KVMX_G_LIST, &l)), {EINVAL});
        l.size = sizeof(l);
        l.flags = 1;
        expect(t + ".list-flags", err_of(ioctl(fd, KVMX_G_LIST, &l)), {EINVAL});
        expect(t + ".unknown-ioctl", err_of(ioctl(fd, _IO(KVMX_GUEST_IO, 0x7f))), {ENOTTY});
        expect(t + ".wrong-size-ioctl",
               err_of(ioctl(fd, _IOWR(KVMX_GUEST_IO, 0x01, char[40]), &l)), {ENOTTY});
        long v = ioctl(fd, KVMX_G_API_VERSION);
        check(v == KVMX_GUEST_API_VERSION, t + ".api-version", "got %ld", v);
    }

    // Another process: needs its /proc/PID/mem.
    {
        int up[2];
        if (pipe(up) == 0) {
            pid_t child = fork();
            if (child == 0) {
                close(up[0]);
                (void)!write(up[1], "r", 1);
                for (;;)
                    pause();
            }
            close(up[1]);
            char c;
            (void)!read(up[0], &c, 1);
            close(up[0]);
            bad_protect("other-no-memfd", [&](auto& x) { x.pid = child; }, {EPERM});
            char tmpl[] = "/tmp/kvmx-prottest.XXXXXX";
            int reg = mkstemp(tmpl);
            unlink(tmpl);
            bad_protect("other-regular-file", [&](auto& x) { x.pid = child; x.mem_fd = reg; },
                        {EPERM, EBADF});
            int st = open("/proc/self/status", O_RDONLY | O_CLOEXEC);
            bad_protect("other-proc-status", [&](auto& x) { x.pid = child; x.mem_fd = st; },
                        {EPERM});
            int self = open("/proc/self/mem", O_RDONLY | O_CLOEXEC);
            bad_protect("other-wrong-mem", [&](auto& x) { x.pid = child; x.mem_fd = self; },
                        {EPERM});
            bad_protect("other-closed-fd", [&](auto& x) { x.pid = child; x.mem_fd = 1000; },
                        {EBADF, EPERM});
            std::string path = "/proc/" + std::to_string(child) + "/mem";
            int mem = open(path.c_str(), O_RDONLY | O_CLOEXEC);
            uint64_t id = 0;
            int e = protect(fd, p, kPage, KVMX_ACCESS_RO, KVMX_ACTION_DENY, &id, child, mem);
            check(e == 0, t + ".other-with-memfd", "errno %s", errname(e).c_str());
            if (!e) {
                expect(t + ".other-unprotect-no-memfd", unprotect(fd, p, kPage, child, -1), {EPERM});
                expect(t + ".other-unprotect-own", unprotect(fd, p, kPage), {ENOENT});
                expect(t + ".other-unprotect", unprotect(fd, p, kPage, child, mem), {0});
            }
            for (int x : {reg, st, self, mem})
                if (x >= 0)
                    close(x);
            kill(child, SIGKILL);
            waitpid(child, nullptr, 0);
            bad_protect("dead-child", [&](auto& x) { x.pid = child; }, {ESRCH});
        } else {
            failf(t + ".other", "pipe: %s", std::strerror(errno));
        }
    }

    // read(2): a whole record or EINVAL; O_NONBLOCK without events: EAGAIN.
    {
        char small[sizeof(kvmx_event) - 1];
        expect(t + ".read-small", err_of(read(fd, small, sizeof(small))), {EINVAL});
        int nb = open(kDevice, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
        kvmx_event ev;
        expect(t + ".read-nonblock", err_of(read(nb, &ev, sizeof(ev))), {EAGAIN});
        pollfd pf{nb, POLLIN, 0};
        check(poll(&pf, 1, 0) == 0, t + ".poll-idle", "revents %#x", pf.revents);
        close(nb);
    }

    // The limit: KVMX_MAX_PROTECTIONS live entries per guest.
    {
        const size_t have = list(fd, 0).size();
        const size_t n = KVMX_MAX_PROTECTIONS >= have ? KVMX_MAX_PROTECTIONS - have : 0;
        uint8_t* many = map_pages(n + 1);
        size_t made = 0;
        int e = 0;
        for (; made < n; made++) {
            e = protect(fd, many + made * kPage, kPage, KVMX_ACCESS_RO, KVMX_ACTION_LOG);
            if (e)
                break;
        }
        check(made == n, t + ".fill", "protection %zu of %zu: errno %s", made, n,
              errname(e).c_str());
        expect(t + ".enospc",
               protect(fd, many + n * kPage, kPage, KVMX_ACCESS_RO, KVMX_ACTION_LOG), {ENOSPC});
        expect(t + ".enospc-track",
               range_op(fd, KVMX_G_TRACK_START, addr_of(many + n * kPage), kPage), {ENOSPC});
        size_t undone = 0;
        for (size_t i = 0; i < made; i++)
            undone += unprotect(fd, many + i * kPage, kPage) == 0;
        check(undone == made, t + ".unfill", "%zu of %zu unprotected", undone, made);
        munmap(many, (n + 1) * kPage);
    }

    size_t now = list(fd, 0).size();
    check(now == baseline, t + ".nothing-left", "%zu entries, %zu before", now, baseline);
    // Still working after all that.
    uint64_t id;
    int e = protect(fd, p, kPage, KVMX_ACCESS_RO, KVMX_ACTION_DENY, &id);
    check(e == 0, t + ".still-works", "errno %s", errname(e).c_str());
    if (!e)
        unprotect(fd, p, kPage);
    close(fd);
    munmap(p, 4 * kPage);
}

// ---- user: an unprivileged process next to root ------------------------------

constexpr uid_t kNobody = 65534;
constexpr size_t kUserMaxEntries = KVMX_MAX_PROTECTIONS / 4;   // the driver's
constexpr size_t kMemlockPages = 256;                           // 1 MiB
constexpr int kStepMs = 120000;     // one step of the other process (TCG)

// One byte from a pipe within ms: the byte, or 0 (EOF, timeout, error).
char recv_byte(int fd, int ms)
{
    pollfd p{fd, POLLIN, 0};
    int n;
    do
        n = poll(&p, 1, ms);
    while (n < 0 && errno == EINTR);
    char c = 0;
    if (n <= 0 || read(fd, &c, 1) != 1)
        return 0;
    return c;
}

void send_byte(int fd, char c) { (void)!write(fd, &c, 1); }

// VmLck of this process in KiB: mm->locked_vm, where the driver charges
// pinned pages.  -1 when unreadable.
long vmlck_kib()
{
    long v = -1;
    if (FILE* f = std::fopen("/proc/self/status", "r")) {
        char line[256];
        while (std::fgets(line, sizeof(line), f))
            if (std::sscanf(line, "VmLck: %ld kB", &v) == 1)
                break;
        std::fclose(f);
    }
    return v;
}

// The child of test_user, as uid/gid 65534.  root_fd is root's /dev/kvmx
// (inherited), rid/rpage root's protection of its own page; rd/wr talk to
// root: 'o' (our O_NONBLOCK reader is open) -> 'v' (root saw its violation),
// 'f' (64 entries made) -> 'r' (root made one more).
void user_child(pid_t root, int root_fd, uint64_t rid, uint8_t* rpage, int rd, int wr)
{
    const std::string t = "user";
    if (setgroups(0, nullptr) || setresgid(kNobody, kNobody, kNobody) ||
        setresuid(kNobody, kNobody, kNobody)) {
        failf(t + ".drop", "to uid %u: %s", unsigned(kNobody), std::strerror(errno));
        return;
    }
    check(geteuid() == kNobody && getegid() == kNobody && getuid() == kNobody,
          t + ".dropped", "uid %u euid %u egid %u", unsigned(getuid()),
          unsigned(geteuid()), unsigned(getegid()));
    // A descriptor root opened shows us no more than our own.
    {
        int err = 0;
        auto v = list(root_fd, 0, &err);
        check(err == 0 && v.empty(), t + ".inherited-fd-hides",
              "LIST on root's fd: errno %s, %zu entries", errname(err).c_str(),
              v.size());
        close(root_fd);
    }

    // (a) Our own page, ro+signal.
    int fd = open(kDevice, O_RDWR | O_CLOEXEC);
    if (!check(fd >= 0, t + ".open", "%s: %s", kDevice, std::strerror(errno)))
        return;
    uint8_t* page = map_pages(1);
    {
        SegvCatcher catcher;
        uint64_t id = 0;
        int e = protect(fd, page, kPage, KVMX_ACCESS_RO, KVMX_ACTION_SIGNAL, &id);
        if (check(e == 0 && id != 0, t + ".protect-own", "errno %s",
                  errname(e).c_str())) {
            static_cast<volatile uint8_t*>(page)[77] = 0x5a;
            bool got = wait_segv(kEventWaitMs);
            check(got && g_si_addr == page + 77 && g_si_code == SEGV_ACCERR,
                  t + ".own-signal", "SIGSEGV %s si_addr %p (want %p) si_code %d",
                  got ? "arrived" : "missing", g_si_addr, page + 77, g_si_code);
            long bad = first_not(page, kPage, kPattern);
            check(bad < 0, t + ".own-unchanged", "offset %ld holds %#x", bad,
                  bad < 0 ? 0 : page[bad]);
            kvmx_event ev{};
            bool seen = wait_event_for(fd, id, kEventWaitMs, &ev);
            check(seen && ev.pid == getpid() && ev.addr == addr_of(page) + 77,
                  t + ".own-event", "event %s pid %d addr %#" PRIx64,
                  seen ? "read" : "missing", ev.pid, uint64_t(ev.addr));
            auto v = list(fd, 0);
            check(v.size() == 1 && find_id(v, id), t + ".list-own",
                  "%zu entries visible, ours %s", v.size(),
                  find_id(v, id) ? "listed" : "missing");
            e = unprotect(fd, page, kPage);
            check(e == 0, t + ".unprotect-own", "errno %s", errname(e).c_str());
            static_cast<volatile uint8_t*>(page)[77] = 0x5b;
            settle(200);
            check(static_cast<volatile uint8_t*>(page)[77] == 0x5b && g_segv == 1,
                  t + ".own-write-after", "byte %#x, %d signals",
                  static_cast<volatile uint8_t*>(page)[77], int(g_segv));
        }
    }
    // kill-vm would stop everybody's VM: CAP_SYS_ADMIN only.
    {
        int e = protect(fd, page, kPage, KVMX_ACCESS_RO, KVMX_ACTION_KILL_VM);
        if (!e)
            unprotect(fd, page, kPage);     // never written
        expect(t + ".kill-vm", e, {EPERM});
    }

    // (b) root's process: no /proc/PID/mem, so no protection.
    {
        std::string path = "/proc/" + std::to_string(root) + "/mem";
        int mem = open(path.c_str(), O_RDONLY | O_CLOEXEC);
        expect(t + ".root-mem-open", mem < 0 ? errno : 0, {EACCES});
        if (mem >= 0)
            close(mem);
        auto root_protect = [&](int mem_fd) {
            int e = protect(fd, rpage, kPage, KVMX_ACCESS_RO, KVMX_ACTION_DENY,
                            nullptr, root, mem_fd);
            if (!e)
                unprotect(fd, rpage, kPage, root, mem_fd);
            return e;
        };
        expect(t + ".root-protect", root_protect(-1), {EPERM});
        int self = open("/proc/self/mem", O_RDONLY | O_CLOEXEC);
        expect(t + ".root-protect-own-memfd", root_protect(self), {EPERM});
        if (self >= 0)
            close(self);
        expect(t + ".root-unprotect", unprotect(fd, rpage, kPage, root, -1), {EPERM});
        expect(t + ".root-track-stop",
               range_op(fd, KVMX_G_TRACK_STOP, addr_of(rpage), kPage, root, -1), {EPERM});
        // Our copy of that address is ours, root's entry is not found.
        expect(t + ".root-entry-not-ours", unprotect(fd, rpage, kPage), {ENOENT});
    }

    // (c) root's entries and events are not ours to see.
    {
        auto v = list(fd, 0);
        check(v.empty() && !find_id(v, rid), t + ".list-hides-root",
              "%zu entries visible, root's id %" PRIu64 " %s", v.size(), rid,
              find_id(v, rid) ? "listed" : "not listed");
        v = list(fd, root);
        check(v.empty(), t + ".list-pid-root", "%zu entries of pid %d visible",
              v.size(), int(root));
        int nb = open(kDevice, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
        send_byte(wr, 'o');
        char c = recv_byte(rd, kStepMs);
        if (c == 'v') {
            kvmx_event ev{};
            int e = err_of(read(nb, &ev, sizeof(ev)));
            check(e == EAGAIN, t + ".read-hides-root",
                  "read: errno %s (event id %" PRIu64 " pid %d)", errname(e).c_str(),
                  e ? 0 : uint64_t(ev.id), e ? 0 : ev.pid);
            pollfd p{nb, POLLIN, 0};
            int n = poll(&p, 1, 0);
            check(n == 0, t + ".poll-hides-root", "poll %d revents %#x", n, p.revents);
        } else {
            failf(t + ".read-hides-root", "root did not see its violation (%c)",
                  c ? c : '-');
        }
        if (nb >= 0)
            close(nb);
    }

    // (d) 64 live entries per user, then ENOSPC; root still gets one.
    {
        uint8_t* many = map_pages(kUserMaxEntries + 1);
        uint8_t* last = many + kUserMaxEntries * kPage;
        size_t made = 0;
        int e = 0;
        for (; made < kUserMaxEntries; made++) {
            e = protect(fd, many + made * kPage, kPage, KVMX_ACCESS_RO, KVMX_ACTION_LOG);
            if (e)
                break;
        }
        check(made == kUserMaxEntries, t + ".fill", "protection %zu of %zu: errno %s",
              made, kUserMaxEntries, errname(e).c_str());
        auto v = list(fd, 0);
        check(v.size() == made, t + ".list-count", "LIST count %zu, %zu made",
              v.size(), made);
        expect(t + ".enospc",
               protect(fd, last, kPage, KVMX_ACCESS_RO, KVMX_ACTION_LOG), {ENOSPC});
        expect(t + ".enospc-track",
               range_op(fd, KVMX_G_TRACK_START, addr_of(last), kPage), {ENOSPC});
        send_byte(wr, 'f');
        char c = recv_byte(rd, kStepMs);
        check(c == 'r', t + ".root-answered", "got %c", c ? c : '-');
        size_t undone = 0;
        for (size_t i = 0; i < made; i++)
            undone += unprotect(fd, many + i * kPage, kPage) == 0;
        check(undone == made, t + ".unfill", "%zu of %zu unprotected", undone, made);
        munmap(many, (kUserMaxEntries + 1) * kPage);
    }

    // (e) The byte limit: pinned pages count against RLIMIT_MEMLOCK (with
    // mlock's pages, in VmLck); ENOMEM beyond it.
    {
        const uint64_t lim = kMemlockPages * kPage;
        rlimit rl{lim, lim};
        if (check(setrlimit(RLIMIT_MEMLOCK, &rl) == 0, t + ".memlock-setrlimit",
                  "%s", std::strerror(errno))) {
            long lck0 = vmlck_kib();
            uint8_t* big = map_pages(kMemlockPages + 1);
            expect(t + ".memlock-over",
                   protect(fd, big, lim + kPage, KVMX_ACCESS_RO, KVMX_ACTION_LOG), {ENOMEM});
            expect(t + ".memlock-over-track",
                   range_op(fd, KVMX_G_TRACK_START, addr_of(big), lim + kPage), {ENOMEM});
            int e = protect(fd, big, lim, KVMX_ACCESS_RO, KVMX_ACTION_LOG);
            check(e == 0, t + ".memlock-at-limit", "errno %s", errname(e).c_str());
            long lck1 = vmlck_kib();
            check(lck0 >= 0 && lck1 - lck0 == long(lim / 1024), t + ".memlock-charged",
                  "VmLck %ld -> %ld kB, want +%" PRIu64, lck0, lck1, lim / 1024);
            expect(t + ".memlock-sum",
                   protect(fd, big + lim, kPage, KVMX_ACCESS_RO, KVMX_ACTION_LOG), {ENOMEM});
            if (!e)
                expect(t + ".memlock-unprotect", unprotect(fd, big, lim), {0});
            long lck2 = vmlck_kib();
            check(lck2 == lck0, t + ".memlock-uncharged", "VmLck %ld kB, %ld before",
                  lck2, lck0);
            e = range_op(fd, KVMX_G_TRACK_START, addr_of(big), lim);
            check(e == 0, t + ".memlock-again", "TRACK_START of the limit: errno %s",
                  errname(e).c_str());
            if (!e)
                range_op(fd, KVMX_G_TRACK_STOP, addr_of(big), lim);
            munmap(big, (kMemlockPages + 1) * kPage);
        }
    }
    check(list(fd, 0).empty(), t + ".nothing-left", "entries left");
    close(fd);
    munmap(page, kPage);
}

// An unprivileged process (uid/gid 65534, forked from root): see
// user_child; root's side is here.
void test_user()
{
    const std::string t = "user";
    int fd = open_dev();
    if (fd < 0)
        return;
    uint8_t* rpage = map_pages(1);
    uint64_t rid = 0;
    int e = protect(fd, rpage, kPage, KVMX_ACCESS_RO, KVMX_ACTION_LOG, &rid);
    if (!check(e == 0, t + ".root-protect-own", "errno %s", errname(e).c_str())) {
        close(fd);
        munmap(rpage, kPage);
        return;
    }
    int down[2], up[2], counts[2];
    if (pipe(down) || pipe(up) || pipe(counts)) {
        failf(t, "pipe: %s", std::strerror(errno));
        unprotect(fd, rpage, kPage);
        close(fd);
        return;
    }
    const pid_t root = getpid();
    std::fflush(stdout);
    pid_t child = fork();
    if (child == 0) {
        close(down[1]);
        close(up[0]);
        close(counts[0]);
        g_passed = g_failed = 0;
        user_child(root, fd, rid, rpage, down[0], up[1]);
        int msg[2] = {g_passed, g_failed};
        (void)!write(counts[1], msg, sizeof(msg));
        std::fflush(stdout);
        _exit(0);
    }
    close(down[0]);
    close(up[1]);
    close(counts[1]);

    // (c) A violation of ours after the child opened its reader.
    char c = recv_byte(up[0], kStepMs);
    if (c == 'o') {
        static_cast<volatile uint8_t*>(rpage)[300] = 0x77;     // log: lands
        kvmx_event ev{};
        bool got = wait_event_for(fd, rid, kEventWaitMs, &ev);
        check(got && ev.pid == root, t + ".root-sees-own-event",
              "event %s pid %d", got ? "read" : "missing", ev.pid);
        send_byte(down[1], got ? 'v' : 'x');
    } else {
        failf(t + ".root-sees-own-event", "the child did not get there");
    }
    // (d) The child holds its 64: root is not counted with it.
    c = recv_byte(up[0], kStepMs);
    if (c == 'f') {
        uint8_t* extra = map_pages(1);
        e = protect(fd, extra, kPage, KVMX_ACCESS_RO, KVMX_ACTION_LOG);
        check(e == 0, t + ".root-after-user-full", "errno %s", errname(e).c_str());
        if (!e)
            unprotect(fd, extra, kPage);
        munmap(extra, kPage);
        send_byte(down[1], 'r');
    } else {
        failf(t + ".root-after-user-full", "the child did not get there");
    }
    int msg[2] = {0, 0};
    int st = 0;
    waitpid(child, &st, 0);
    ssize_t n = read(counts[0], msg, sizeof(msg));
    check(n == ssize_t(sizeof(msg)) && WIFEXITED(st) && WEXITSTATUS(st) == 0,
          t + ".child-exit", "status %#x, %zd bytes of counts", st, n);
    g_passed += msg[0];
    g_failed += msg[1];
    for (int f : {down[1], up[0], counts[0]})
        close(f);
    check(list(fd, child).empty(), t + ".child-nothing-left", "entries of pid %d",
          int(child));

    // (e) Root is charged too, but not limited by its RLIMIT_MEMLOCK.
    {
        rlimit old{};
        getrlimit(RLIMIT_MEMLOCK, &old);
        const uint64_t lim = kMemlockPages * kPage;
        rlimit rl{lim, old.rlim_max};
        setrlimit(RLIMIT_MEMLOCK, &rl);
        uint8_t* big = map_pages(2 * kMemlockPages);
        long lck0 = vmlck_kib();
        e = protect(fd, big, 2 * lim, KVMX_ACCESS_RO, KVMX_ACTION_LOG);
        check(e == 0, t + ".root-memlock-exempt", "protect %" PRIu64 " bytes over a "
              "limit of %" PRIu64 ": errno %s", 2 * lim, lim, errname(e).c_str());
        long lck1 = vmlck_kib();
        check(lck1 - lck0 == long(2 * lim / 1024), t + ".root-memlock-charged",
              "VmLck %ld -> %ld kB", lck0, lck1);
        if (!e)
            unprotect(fd, big, 2 * lim);
        check(vmlck_kib() == lck0, t + ".root-memlock-uncharged", "VmLck %ld kB, "
              "%ld before", vmlck_kib(), lck0);
        munmap(big, 2 * lim);
        setrlimit(RLIMIT_MEMLOCK, &old);
    }
    e = unprotect(fd, rpage, kPage);
    check(e == 0, t + ".root-unprotect-own", "errno %s", errname(e).c_str());
    close(fd);
    munmap(rpage, kPage);
}

volatile sig_atomic_t g_usr1, g_term;

int hold(const char* arg)
{
    char* end = nullptr;
    unsigned long n = std::strtoul(arg, &end, 0);
    if (!n || *end) {
        std::fprintf(stderr, "kvmx-prottest: hold: bad page count '%s'\n", arg);
        return 2;
    }
    struct sigaction sa {};
    sa.sa_handler = [](int sig) {
        if (sig == SIGUSR1)
            g_usr1 = g_usr1 + 1;
        else
            g_term = 1;
    };
    sigemptyset(&sa.sa_mask);
    sigaction(SIGUSR1, &sa, nullptr);
    sigaction(SIGTERM, &sa, nullptr);
    sigset_t block, old;
    sigemptyset(&block);
    sigaddset(&block, SIGUSR1);
    sigaddset(&block, SIGTERM);
    sigprocmask(SIG_BLOCK, &block, &old);
    uint8_t* p = map_pages(n);
    std::printf("HOLD %d %#" PRIx64 " %#lx\n", int(getpid()), addr_of(p), n * kPage);
    std::fflush(stdout);
    int done = 0;
    while (!g_term) {
        sigsuspend(&old);
        while (done < g_usr1) {
            static_cast<volatile uint8_t*>(p)[0] = uint8_t(done);
            static_cast<volatile uint8_t*>(p)[(n - 1) * kPage] = uint8_t(done);
            done++;
        }
    }
    return 0;
}

int as_user(const char* uid_arg, char** cmd)
{
    char* end = nullptr;
    unsigned long uid = std::strtoul(uid_arg, &end, 0);
    if (!*uid_arg || *end || uid > 0xfffffffeul) {
        std::fprintf(stderr, "kvmx-prottest: --as-user: bad uid '%s'\n", uid_arg);
        return 2;
    }
    if (setgroups(0, nullptr) || setresgid(gid_t(uid), gid_t(uid), gid_t(uid)) ||
        setresuid(uid_t(uid), uid_t(uid), uid_t(uid))) {
        std::fprintf(stderr, "kvmx-prottest: --as-user %lu: %s\n", uid, std::strerror(errno));
        return 126;
    }
    execv(cmd[0], cmd);
    std::fprintf(stderr, "kvmx-prottest: exec %s: %s\n", cmd[0], std::strerror(errno));
    return 127;
}

}  // namespace

int main(int argc, char** argv)
{
    if (argc >= 5 && std::string(argv[1]) == "--as-user" && std::string(argv[3]) == "--")
        return as_user(argv[2], argv + 4);
    std::setvbuf(stdout, nullptr, _IOLBF, 0);
    if (argc == 3 && std::string(argv[1]) == "hold")
        return hold(argv[2]);
    const std::vector<std::pair<std::string, std::function<void()>>> tests = {
        {"signal", test_signal},
        {"deny", [] { test_deny_log(KVMX_ACTION_DENY); }},
        {"log", [] { test_deny_log(KVMX_ACTION_LOG); }},
        {"none", test_none},
        {"track", test_track},
        {"exit", test_exit},
        {"bad", test_bad},
    {"shared", test_shared},
    {"rate", test_rate},
        {"user", test_user},    // last: it changes uids in a child
    };
    std::string which = argc == 2 ? argv[1] : "";
    bool found = which == "all";
    // Bits of /proc/sys/kernel/tainted that mean the kernel misbehaved:
    // B (bad page), M (machine check), D (oops), W (warning), L (lockup).
    constexpr unsigned long kBadTaint = 32 | 16 | 128 | 512 | 16384;
    unsigned long taint0 = read_taint();
    for (const auto& [name, fn] : tests)
        if (which == "all" || which == name) {
            found = true;
            fn();
        }
    if (!found) {
        std::fprintf(stderr, "usage: kvmx-prottest signal|deny|log|none|track|exit|bad|shared|rate|user|all\n"
                             "       kvmx-prottest hold PAGES\n"
                             "       kvmx-prottest --as-user UID -- COMMAND [ARG...]\n");
        return 2;
    }
    unsigned long taint1 = read_taint();
    check(!((taint1 & ~taint0) & kBadTaint), "health.taint",
          "kernel taint went from %#lx to %#lx", taint0, taint1);
    std::printf("SUMMARY %d passed %d failed\n", g_passed, g_failed);
    return g_failed ? 1 : 0;
}
