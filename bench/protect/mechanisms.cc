// Cost of the enforcement mechanisms kvmx could use for guest-requested
// memory protection, measured side by side on this host in one run:
//
//   mprotect       the host's own page protection (the reference the issue
//                  compares against)
//   memslot        KVM read-only memory slot overlay: protecting a range of
//                  a VM's RAM splits its slot in three (KVM_SET_USER_MEMORY_
//                  REGION: delete, then add before / read-only / after);
//                  unprotecting merges them back.  This is what kvmx-chan's
//                  overlays make QEMU do under KVM.
//   uffd-wp        userfaultfd write-protect of the same anonymous memory
//                  (UFFDIO_WRITEPROTECT on / off)
//
// For each size (4 KiB, 2 MiB, 1 GiB by default) it reports the median of
// N protect+unprotect pairs, in microseconds, and one JSON line per result
// so bench/protect/run.py can tabulate and plot.  Also: the time from a
// write to a write-protected page until the handler has it (SIGSEGV for
// mprotect, the uffd event read by another thread for uffd-wp).
//
// Needs /dev/kvm for the memslot rows (skipped with a note otherwise) and
// userfaultfd (root, or vm.unprivileged_userfaultfd=1).
#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include <fcntl.h>
#include <linux/kvm.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

namespace {

using Clock = std::chrono::steady_clock;

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
    std::fprintf(stderr, "mechanisms: %s: %s\n", what, std::strerror(errno));
    std::exit(1);
}

void report(const char *mech, const char *what, uint64_t bytes, double us)
{
    std::printf("{\"mechanism\": \"%s\", \"what\": \"%s\", \"bytes\": %llu, "
                "\"us\": %.2f}\n", mech, what, (unsigned long long)bytes, us);
    std::fflush(stdout);
}

constexpr uint64_t kPage = 4096;

// ---- mprotect -----------------------------------------------------------

Clock::time_point g_fault_t0;
std::atomic<double> g_fault_us;

void on_segv(int, siginfo_t *si, void *)
{
    g_fault_us = us_since(g_fault_t0);
    // Let the write through so the faulting instruction completes.
    mprotect((void *)((uintptr_t)si->si_addr & ~(kPage - 1)), kPage,
             PROT_READ | PROT_WRITE);
}

void bench_mprotect(uint8_t *mem, const std::vector<uint64_t> &sizes, int n)
{
    for (uint64_t sz : sizes) {
        std::vector<double> t;
        for (int i = 0; i < n; i++) {
            auto t0 = Clock::now();
            if (mprotect(mem, sz, PROT_READ) || mprotect(mem, sz, PROT_READ | PROT_WRITE)) {
                die("mprotect");
            }
            t.push_back(us_since(t0));
        }
        report("mprotect", "protect+unprotect", sz, median(t));
    }
    struct sigaction sa = {};
    sa.sa_sigaction = on_segv;
    sa.sa_flags = SA_SIGINFO;
    sigaction(SIGSEGV, &sa, nullptr);
    std::vector<double> t;
    for (int i = 0; i < n; i++) {
        mprotect(mem, kPage, PROT_READ);
        g_fault_t0 = Clock::now();
        mem[8] = (uint8_t)i;
        t.push_back(g_fault_us);
    }
    report("mprotect", "violation-delivery", kPage, median(t));
}

// ---- KVM read-only memslot overlay ---------------------------------------

struct Kvm {
    int sys = -1, vm = -1;
};

void set_slot(int vm, uint32_t slot, uint32_t flags, uint64_t gpa, uint64_t size,
              void *host)
{
    kvm_userspace_memory_region r = {};
    r.slot = slot;
    r.flags = flags;
    r.guest_phys_addr = gpa;
    r.memory_size = size;
    r.userspace_addr = (uint64_t)(uintptr_t)host;
    if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &r) < 0) {
        die("KVM_SET_USER_MEMORY_REGION");
    }
}

void bench_memslot(uint8_t *mem, uint64_t total, const std::vector<uint64_t> &sizes,
                   int n)
{
    Kvm k;
    k.sys = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (k.sys < 0) {
        std::printf("# memslot: skipped, /dev/kvm: %s\n", std::strerror(errno));
        return;
    }
    k.vm = ioctl(k.sys, KVM_CREATE_VM, 0);
    if (k.vm < 0) {
        std::printf("# memslot: skipped, KVM_CREATE_VM: %s\n", std::strerror(errno));
        return;
    }
    const uint64_t base = 1ull << 32;   // like RAM above 4 GiB
    set_slot(k.vm, 0, 0, base, total, mem);
    for (uint64_t sz : sizes) {
        // Protect a range in the middle (or the whole when it is all).
        uint64_t off = sz < total ? ((total - sz) / 2) & ~(kPage - 1) : 0;
        std::vector<double> t;
        for (int i = 0; i < n; i++) {
            auto t0 = Clock::now();
            set_slot(k.vm, 0, 0, base, 0, mem);          // delete
            if (off) {
                set_slot(k.vm, 0, 0, base, off, mem);
            }
            set_slot(k.vm, 1, KVM_MEM_READONLY, base + off, sz, mem + off);
            if (off + sz < total) {
                set_slot(k.vm, 2, 0, base + off + sz, total - off - sz,
                         mem + off + sz);
            }
            // ... and back.
            if (off + sz < total) {
                set_slot(k.vm, 2, 0, base + off + sz, 0, mem + off + sz);
            }
            set_slot(k.vm, 1, KVM_MEM_READONLY, base + off, 0, mem + off);
            if (off) {
                set_slot(k.vm, 0, 0, base, 0, mem);
            }
            set_slot(k.vm, 0, 0, base, total, mem);
            t.push_back(us_since(t0));
        }
        report("memslot", "protect+unprotect", sz, median(t));
    }
    close(k.vm);
    close(k.sys);
}

// ---- userfaultfd write-protect -------------------------------------------

void bench_uffd(uint8_t *mem, uint64_t total, const std::vector<uint64_t> &sizes,
                int n)
{
    int uffd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    if (uffd < 0) {
        std::printf("# uffd-wp: skipped, userfaultfd: %s\n", std::strerror(errno));
        return;
    }
    uffdio_api api = {};
    api.api = UFFD_API;
    api.features = UFFD_FEATURE_PAGEFAULT_FLAG_WP;
    if (ioctl(uffd, UFFDIO_API, &api) < 0) {
        std::printf("# uffd-wp: skipped, UFFDIO_API: %s\n", std::strerror(errno));
        return;
    }
    uffdio_register reg = {};
    reg.range.start = (uint64_t)(uintptr_t)mem;
    reg.range.len = total;
    reg.mode = UFFDIO_REGISTER_MODE_WP;
    if (ioctl(uffd, UFFDIO_REGISTER, &reg) < 0) {
        std::printf("# uffd-wp: skipped, UFFDIO_REGISTER: %s\n", std::strerror(errno));
        return;
    }
    auto wp = [&](uint64_t off, uint64_t len, bool on) {
        uffdio_writeprotect w = {};
        w.range.start = (uint64_t)(uintptr_t)(mem + off);
        w.range.len = len;
        w.mode = on ? UFFDIO_WRITEPROTECT_MODE_WP : 0;
        if (ioctl(uffd, UFFDIO_WRITEPROTECT, &w) < 0) {
            die("UFFDIO_WRITEPROTECT");
        }
    };
    for (uint64_t sz : sizes) {
        std::vector<double> t;
        for (int i = 0; i < n; i++) {
            auto t0 = Clock::now();
            wp(0, sz, true);
            wp(0, sz, false);
            t.push_back(us_since(t0));
        }
        report("uffd-wp", "protect+unprotect", sz, median(t));
    }
    // Violation delivery: a writer thread faults, this thread reads the
    // event, then resolves it (unprotects) so the writer goes on.
    std::vector<double> t;
    for (int i = 0; i < n; i++) {
        wp(0, kPage, true);
        Clock::time_point t0;
        std::atomic<bool> go{false};
        std::thread writer([&] {
            while (!go) {
            }
            t0 = Clock::now();
            mem[8] = (uint8_t)i;
        });
        go = true;
        pollfd p = {uffd, POLLIN, 0};
        if (poll(&p, 1, 5000) != 1) {
            die("poll(uffd)");
        }
        double us = us_since(t0);
        uffd_msg msg;
        if (read(uffd, &msg, sizeof(msg)) != sizeof(msg)) {
            die("read(uffd)");
        }
        t.push_back(us);
        wp(0, kPage, false);
        writer.join();
    }
    report("uffd-wp", "violation-delivery", kPage, median(t));
    close(uffd);
}

} // namespace

int main(int argc, char **argv)
{
    int n = 21;
    std::vector<uint64_t> sizes = {kPage, 2ull << 20, 1ull << 30};
    for (int i = 1; i < argc; i++) {
        std::string a = argv[i];
        if (a == "-n" && i + 1 < argc) {
            n = std::atoi(argv[++i]);
        } else if (a == "--small") {            // CI smoke: no 1 GiB
            sizes = {kPage, 2ull << 20};
        } else {
            std::fprintf(stderr, "usage: %s [-n REPEAT] [--small]\n", argv[0]);
            return 2;
        }
    }
    uint64_t total = sizes.back() * 2;
    auto *mem = (uint8_t *)mmap(nullptr, total, PROT_READ | PROT_WRITE,
                                MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (mem == MAP_FAILED) {
        die("mmap");
    }
    madvise(mem, total, MADV_NOHUGEPAGE);   // 4 KiB pages, as a guest's are
    std::memset(mem, 1, total);
    // The same mprotect on transparent huge pages (how a guest's
    // kvmx-protbench maps its buffers, MADV_HUGEPAGE).
    auto *thp = (uint8_t *)mmap(nullptr, sizes.back() + (2ull << 20),
                                PROT_READ | PROT_WRITE,
                                MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (thp == MAP_FAILED) {
        die("mmap");
    }
    thp = (uint8_t *)(((uintptr_t)thp + (2ull << 20) - 1) & ~((2ull << 20) - 1));
    madvise(thp, sizes.back(), MADV_HUGEPAGE);
    std::memset(thp, 1, sizes.back());
    for (uint64_t sz : sizes) {
        std::vector<double> t;
        for (int i = 0; i < n; i++) {
            auto t0 = Clock::now();
            if (mprotect(thp, sz, PROT_READ) ||
                mprotect(thp, sz, PROT_READ | PROT_WRITE)) {
                die("mprotect");
            }
            t.push_back(us_since(t0));
        }
        report("mprotect-thp", "protect+unprotect", sz, median(t));
    }
    bench_memslot(mem, total, sizes, n);
    bench_uffd(mem, total, sizes, n);
    bench_mprotect(mem, sizes, n);
    return 0;
}
