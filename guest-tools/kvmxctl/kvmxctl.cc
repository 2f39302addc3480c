// SPDX-License-Identifier: GPL-2.0-or-later
// kvmxctl: guest memory protection and dirty tracking from the command line
// (the ioctls of /dev/kvmx, include/kvmx/kvmx-guest.h; the driver is
// kvmx_guest.ko, the device docs/specs/kvmx-chan.md).
//
//   kvmxctl protect   --pid PID --addr ADDR --len LEN --access ro|none
//                     --action deny|signal|log|kill-vm        -> prints the id
//   kvmxctl unprotect --pid PID --addr ADDR --len LEN
//   kvmxctl list      [--pid PID]
//   kvmxctl watch     [--count N] [--timeout SEC]
//   kvmxctl track start|dirty|stop --pid PID --addr ADDR --len LEN
//   kvmxctl version
//
// list --json prints {"protections": [{"id", "kind" (protect|track), "pid",
// "addr", "len", "violations", and for protections "access", "action"}],
// "count": n}; addresses are JSON numbers.
//
// Every command takes --json (machine-readable output: one JSON object, or
// for watch one per line).  ADDR and LEN are decimal or 0x hex; LEN also
// takes a K, M or G suffix (KiB, MiB, GiB).  For a PID that is not kvmxctl's
// own, kvmxctl opens /proc/PID/mem (the kernel checks ptrace attach rights
// there) and hands the fd to the driver.  Protections outlive kvmxctl: they
// end with unprotect or when the target process exits.
//
// Permissions (guest-tools/README.md): /dev/kvmx is open to everybody, but
// a PID that is not the caller's own needs ptrace permission ("kvmxctl:
// open /proc/PID/mem: Permission denied" otherwise); list and watch show
// only entries and events of processes with kvmxctl's euid (everything with
// CAP_SYS_ADMIN).  Without CAP_SYS_ADMIN a user may hold 64 entries
// (ENOSPC), kill-vm is EPERM, and pinned bytes count against the target's
// RLIMIT_MEMLOCK (ENOMEM; CAP_IPC_LOCK lifts that).
//
// Errors: one line on stderr, "kvmxctl: <what>: <strerror>", and exit
// status 1 (2 for usage errors).  watch exits 0 once it saw N events and 1
// when the timeout expires first.
#include <fcntl.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

#include <cerrno>
#include <cinttypes>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <kvmx/kvmx-guest.h>

namespace {

using json = nlohmann::json;

constexpr const char* kDevice = "/dev/" KVMX_GUEST_DEVICE_NAME;
constexpr uint64_t kPage = 4096;

// An error that ends the program: "kvmxctl: what: strerror(err)".
struct Failure {
    std::string what;
    int err;
    int status = 1;
};

[[noreturn]] void fail(std::string what, int err = errno, int status = 1)
{
    throw Failure{std::move(what), err, status};
}

// Decimal or 0x hex; with `suffix`, an optional K/M/G (x1024^n) after it.
std::optional<uint64_t> parse_number(const std::string& s, bool suffix)
{
    if (s.empty() || s[0] == '-' || s[0] == '+' || isspace(uint8_t(s[0])))
        return std::nullopt;
    int base = 10;
    size_t start = 0;
    if (s.size() > 2 && s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
        base = 16;
        start = 2;
    }
    const char* begin = s.c_str() + start;
    char* end = nullptr;
    errno = 0;
    unsigned long long v = strtoull(begin, &end, base);
    if (errno || end == begin)
        return std::nullopt;
    std::string rest(end);
    uint64_t mul = 1;
    if (!rest.empty()) {
        if (!suffix || rest.size() != 1)
            return std::nullopt;
        switch (rest[0]) {
        case 'k': case 'K': mul = 1ull << 10; break;
        case 'm': case 'M': mul = 1ull << 20; break;
        case 'g': case 'G': mul = 1ull << 30; break;
        default: return std::nullopt;
        }
    }
    uint64_t out;
    if (__builtin_mul_overflow(uint64_t(v), mul, &out))
        return std::nullopt;
    return out;
}

uint64_t number_arg(const std::string& opt, const std::string& s, bool suffix)
{
    auto v = parse_number(s, suffix);
    if (!v)
        fail("usage: " + opt + " '" + s + "'", EINVAL, 2);
    return *v;
}

std::string hex(uint64_t v)
{
    char b[24];
    std::snprintf(b, sizeof(b), "0x%" PRIx64, v);
    return b;
}

class Fd {
public:
    explicit Fd(int fd = -1) : fd_(fd) {}
    Fd(const Fd&) = delete;
    Fd& operator=(const Fd&) = delete;
    ~Fd() { if (fd_ >= 0) close(fd_); }
    int get() const { return fd_; }
private:
    int fd_;
};

int open_device(int flags = O_RDWR)
{
    int fd = open(kDevice, flags | O_CLOEXEC);
    if (fd < 0)
        fail(std::string("open ") + kDevice);
    return fd;
}

// The mem_fd for pid: -1 for kvmxctl itself, else an fd of /proc/PID/mem.
int open_mem_fd(int pid)
{
    if (pid == 0 || pid == getpid())
        return -1;
    std::string path = "/proc/" + std::to_string(pid) + "/mem";
    int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        if (errno == ENOENT)
            return -1;      // no such process: the driver says ESRCH
        fail("open " + path);
    }
    return fd;
}

const char* access_name(uint32_t a)
{
    switch (a) {
    case KVMX_ACCESS_RO: return "ro";
    case KVMX_ACCESS_NONE: return "none";
    default: return "?";
    }
}

const char* action_name(uint32_t a)
{
    switch (a) {
    case KVMX_ACTION_DENY: return "deny";
    case KVMX_ACTION_SIGNAL: return "signal";
    case KVMX_ACTION_LOG: return "log";
    case KVMX_ACTION_KILL_VM: return "kill-vm";
    default: return "?";
    }
}

const char* violation_name(uint32_t a)
{
    switch (a) {
    case KVMX_VIOLATION_READ: return "read";
    case KVMX_VIOLATION_WRITE: return "write";
    default: return "?";
    }
}

void print_json(const json& j)
{
    std::printf("%s\n", j.dump().c_str());
    std::fflush(stdout);
}

void ok_json(bool as_json)
{
    if (as_json)
        print_json(json{{"ok", true}});
}

// ---- commands --------------------------------------------------------------

struct RangeArgs {
    int pid = 0;
    std::string addr, len;
    uint64_t a = 0, l = 0;

    void add_to(CLI::App* c)
    {
        c->add_option("--pid", pid, "target process (0: kvmxctl itself)")->required();
        c->add_option("--addr", addr, "page aligned start address (decimal or 0x hex)")->required();
        c->add_option("--len", len, "page aligned length (decimal or 0x hex, K/M/G suffix)")->required();
    }
    void parse()
    {
        a = number_arg("--addr", addr, false);
        l = number_arg("--len", len, true);
    }
    kvmx_range range(int mem_fd) const
    {
        kvmx_range r{};
        r.size = sizeof(r);
        r.pid = pid;
        r.mem_fd = mem_fd;
        r.addr = a;
        r.len = l;
        return r;
    }
};

int cmd_protect(const RangeArgs& ra, const std::string& access,
                const std::string& action, bool as_json)
{
    kvmx_protect p{};
    p.size = sizeof(p);
    p.pid = ra.pid;
    p.access = access == "ro" ? KVMX_ACCESS_RO : KVMX_ACCESS_NONE;
    p.action = action == "deny" ? KVMX_ACTION_DENY
             : action == "signal" ? KVMX_ACTION_SIGNAL
             : action == "log" ? KVMX_ACTION_LOG : KVMX_ACTION_KILL_VM;
    p.addr = ra.a;
    p.len = ra.l;
    Fd dev(open_device());
    Fd mem(open_mem_fd(ra.pid));
    p.mem_fd = mem.get();
    if (ioctl(dev.get(), KVMX_G_PROTECT, &p) < 0)
        fail("protect");
    if (as_json)
        print_json(json{{"id", p.id}, {"pid", p.pid}, {"addr", p.addr},
                        {"len", p.len}, {"access", access}, {"action", action}});
    else
        std::printf("%" PRIu64 "\n", uint64_t(p.id));
    return 0;
}

int cmd_range(unsigned long req, const char* what, const RangeArgs& ra,
              bool as_json)
{
    Fd dev(open_device());
    Fd mem(open_mem_fd(ra.pid));
    kvmx_range r = ra.range(mem.get());
    if (ioctl(dev.get(), req, &r) < 0)
        fail(what);
    ok_json(as_json);
    return 0;
}

int cmd_dirty(const RangeArgs& ra, bool as_json)
{
    Fd dev(open_device());
    Fd mem(open_mem_fd(ra.pid));
    kvmx_range r = ra.range(mem.get());
    uint64_t pages = ra.l / kPage;
    std::vector<uint8_t> bitmap((pages + 7) / 8 + 1);
    r.bitmap = uint64_t(uintptr_t(bitmap.data()));
    r.bitmap_len = bitmap.size();
    if (ioctl(dev.get(), KVMX_G_TRACK_DIRTY, &r) < 0)
        fail("track dirty");
    std::vector<uint64_t> dirty;
    for (uint64_t i = 0; i < pages; i++)
        if (bitmap[i / 8] & (1u << (i % 8)))
            dirty.push_back(ra.a + i * kPage);
    if (as_json) {
        print_json(json{{"dirty", dirty}, {"count", dirty.size()}});
    } else {
        for (uint64_t a : dirty)
            std::printf("%s\n", hex(a).c_str());
    }
    return 0;
}

std::vector<kvmx_prot_info> list_entries(int dev, int pid)
{
    std::vector<kvmx_prot_info> v;
    for (int tries = 0; tries < 8; tries++) {
        kvmx_list l{};
        l.size = sizeof(l);
        l.pid = pid;
        l.count = uint32_t(v.size());
        l.entries = uint64_t(uintptr_t(v.data()));
        if (ioctl(dev, KVMX_G_LIST, &l) < 0)
            fail("list");
        if (l.count <= v.size()) {
            v.resize(l.count);
            return v;
        }
        v.resize(l.count + 16);     // it grew: ask again
    }
    fail("list", EAGAIN);
}

int cmd_list(int pid, bool as_json)
{
    Fd dev(open_device(O_RDONLY));
    auto v = list_entries(dev.get(), pid);
    if (as_json) {
        json arr = json::array();
        for (const auto& e : v) {
            json j{{"id", e.id}, {"kind", e.kind == KVMX_KIND_TRACK ? "track" : "protect"},
                   {"pid", e.pid}, {"addr", e.addr}, {"len", e.len},
                   {"violations", e.violations}};
            if (e.kind == KVMX_KIND_PROTECT) {
                j["access"] = access_name(e.access);
                j["action"] = action_name(e.action);
            }
            arr.push_back(j);
        }
        print_json(json{{"protections", arr}, {"count", v.size()}});
        return 0;
    }
    std::printf("%-6s %-8s %-7s %-18s %-12s %-6s %-8s %s\n", "ID", "KIND",
                "PID", "ADDR", "LEN", "ACCESS", "ACTION", "VIOLATIONS");
    for (const auto& e : v) {
        bool prot = e.kind == KVMX_KIND_PROTECT;
        std::printf("%-6" PRIu64 " %-8s %-7d %-18s %-12s %-6s %-8s %" PRIu64 "\n",
                    uint64_t(e.id), prot ? "protect" : "track", e.pid,
                    hex(e.addr).c_str(), hex(e.len).c_str(),
                    prot ? access_name(e.access) : "-",
                    prot ? action_name(e.action) : "-", uint64_t(e.violations));
    }
    return 0;
}

double now_s()
{
    timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return double(ts.tv_sec) + double(ts.tv_nsec) / 1e9;
}

void print_event(const kvmx_event& ev, bool as_json)
{
    if (as_json) {
        print_json(json{{"seq", ev.seq}, {"id", ev.id}, {"pid", ev.pid},
                        {"addr", ev.addr}, {"gpa", ev.gpa},
                        {"access", violation_name(ev.access)},
                        {"action", action_name(ev.action)}, {"len", ev.len},
                        {"time_ns", ev.time_ns}});
        return;
    }
    std::printf("seq=%" PRIu64 " id=%" PRIu64 " pid=%d addr=%s gpa=%s access=%s "
                "action=%s len=%u time_ns=%" PRIu64 "\n",
                uint64_t(ev.seq), uint64_t(ev.id), ev.pid, hex(ev.addr).c_str(),
                hex(ev.gpa).c_str(), violation_name(ev.access),
                action_name(ev.action), ev.len, uint64_t(ev.time_ns));
    std::fflush(stdout);
}

int cmd_watch(std::optional<uint64_t> count, std::optional<double> timeout,
              bool as_json)
{
    Fd dev(open_device(O_RDONLY | O_NONBLOCK));
    const double deadline = timeout ? now_s() + *timeout : 0;
    uint64_t seen = 0;
    kvmx_event evs[64];
    while (!count || seen < *count) {
        int ms = -1;
        if (timeout) {
            double left = deadline - now_s();
            if (left <= 0)
                return 1;
            ms = int(left * 1000) + 1;
        }
        pollfd p{dev.get(), POLLIN, 0};
        int n = poll(&p, 1, ms);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            fail("poll");
        }
        if (n == 0)
            continue;       // the deadline check above ends it
        ssize_t got = read(dev.get(), evs, sizeof(evs));
        if (got < 0) {
            if (errno == EAGAIN || errno == EINTR)
                continue;
            fail(std::string("read ") + kDevice);
        }
        if (got == 0)
            fail(std::string("read ") + kDevice, ENODEV);  // device removed
        for (size_t i = 0; i < size_t(got) / sizeof(kvmx_event); i++) {
            if (count && seen >= *count)
                break;
            print_event(evs[i], as_json);
            seen++;
        }
    }
    return 0;
}

int cmd_version(bool as_json)
{
    Fd dev(open_device(O_RDONLY));
    int v = ioctl(dev.get(), KVMX_G_API_VERSION);
    if (v < 0)
        fail("api version");
    if (as_json)
        print_json(json{{"api_version", v}, {"kvmxctl_api_version", KVMX_GUEST_API_VERSION}});
    else
        std::printf("%d\n", v);
    return 0;
}

int run(int argc, char** argv)
{
    CLI::App app{"kvmxctl: guest memory protection and dirty tracking (/dev/kvmx)"};
    app.require_subcommand(1);
    bool as_json = false;
    app.add_flag("--json", as_json, "machine-readable output");
    auto json_flag = [&](CLI::App* c) {
        c->add_flag("--json", as_json, "machine-readable output");
    };

    RangeArgs ra;
    std::string access, action;
    auto* protect = app.add_subcommand("protect", "protect a range; prints its id");
    ra.add_to(protect);
    protect->add_option("--access", access, "what stays allowed: ro (reads) or none")
        ->required()->check(CLI::IsMember({"ro", "none"}));
    protect->add_option("--action", action, "on a violation: deny, signal, log or kill-vm")
        ->required()->check(CLI::IsMember({"deny", "signal", "log", "kill-vm"}));
    json_flag(protect);

    auto* unprotect = app.add_subcommand("unprotect", "remove a protection (exact range)");
    ra.add_to(unprotect);
    json_flag(unprotect);

    int list_pid = 0;
    auto* list = app.add_subcommand("list", "list protections and trackings");
    list->add_option("--pid", list_pid, "only this process (default: all)");
    json_flag(list);

    uint64_t count = 0;
    double timeout = 0;
    auto* watch = app.add_subcommand("watch", "print violation events as they happen");
    auto* count_opt = watch->add_option("--count", count, "exit 0 after N events");
    auto* timeout_opt = watch->add_option("--timeout", timeout, "exit 1 after SEC seconds")
        ->check(CLI::NonNegativeNumber);
    json_flag(watch);

    auto* track = app.add_subcommand("track", "dirty page tracking");
    track->require_subcommand(1);
    auto* tstart = track->add_subcommand("start", "start tracking a range");
    auto* tdirty = track->add_subcommand("dirty", "print the pages written since the last call");
    auto* tstop = track->add_subcommand("stop", "stop tracking a range");
    for (auto* c : {tstart, tdirty, tstop}) {
        ra.add_to(c);
        json_flag(c);
    }
    json_flag(track);

    auto* version = app.add_subcommand("version", "print the driver's API version");
    json_flag(version);

    try {
        app.parse(argc, argv);
    } catch (const CLI::CallForHelp& e) {
        return app.exit(e);
    } catch (const CLI::CallForAllHelp& e) {
        return app.exit(e);
    } catch (const CLI::ParseError& e) {
        std::fprintf(stderr, "kvmxctl: usage: %s: %s\n", e.what(), std::strerror(EINVAL));
        return 2;
    }

    if (*protect) {
        ra.parse();
        return cmd_protect(ra, access, action, as_json);
    }
    if (*unprotect) {
        ra.parse();
        return cmd_range(KVMX_G_UNPROTECT, "unprotect", ra, as_json);
    }
    if (*list)
        return cmd_list(list_pid, as_json);
    if (*watch)
        return cmd_watch(*count_opt ? std::optional<uint64_t>(count) : std::nullopt,
                         *timeout_opt ? std::optional<double>(timeout) : std::nullopt,
                         as_json);
    if (*track) {
        ra.parse();
        if (*tstart)
            return cmd_range(KVMX_G_TRACK_START, "track start", ra, as_json);
        if (*tdirty)
            return cmd_dirty(ra, as_json);
        return cmd_range(KVMX_G_TRACK_STOP, "track stop", ra, as_json);
    }
    if (*version)
        return cmd_version(as_json);
    return 2;
}

}  // namespace

int main(int argc, char** argv)
{
    try {
        return run(argc, argv);
    } catch (const Failure& f) {
        std::fflush(stdout);
        std::fprintf(stderr, "kvmxctl: %s: %s\n", f.what.c_str(), std::strerror(f.err));
        return f.status;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "kvmxctl: %s: %s\n", e.what(), std::strerror(EIO));
        return 1;
    }
}
