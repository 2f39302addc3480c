// SPDX-License-Identifier: GPL-2.0-or-later
// kvmx-flushbench: time NVDIMM region flushes from inside a guest.
//
//   kvmx-flushbench [-n N] LABEL=TARGET ...
//
// TARGET is
//  - a libnvdimm region name (region0) or a path to its deep_flush
//    attribute: each operation writes 1 to it, which makes the kernel run
//    nvdimm_flush() on the region: a write to a flush hint address for an
//    NFIT NVDIMM, a flush request on the virtqueue for virtio-pmem;
//  - a block device (/dev/pmem0): each operation writes 4 KiB at offset 0
//    and fsync()s, i.e. what a synced write costs, flush included.
// Each operation is timed with CLOCK_MONOTONIC.  One JSON object per
// target on stdout:
//   {"label":..,"n":..,"min_ns":..,"p50_ns":..,"p90_ns":..,"p99_ns":..,
//    "max_ns":..,"avg_ns":..}
#include <fcntl.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {

uint64_t now_ns()
{
    timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return uint64_t(ts.tv_sec) * 1000000000u + uint64_t(ts.tv_nsec);
}

int bench(const std::string& label, std::string path, long n)
{
    if (path.find('/') == std::string::npos)
        path = "/sys/bus/nd/devices/" + path + "/deep_flush";
    const bool blockdev = path.rfind("/dev/", 0) == 0;
    static char block[4096];
    int fd = open(path.c_str(), O_WRONLY | O_CLOEXEC);
    if (fd < 0) {
        std::fprintf(stderr, "kvmx-flushbench: cannot open '%s': %s\n",
                     path.c_str(), std::strerror(errno));
        return 1;
    }
    std::vector<uint64_t> t;
    t.reserve(n);
    for (long i = 0; i < n; i++) {
        uint64_t t0 = now_ns();
        bool ok = blockdev ? pwrite(fd, block, sizeof(block), 0) ==
                                 ssize_t(sizeof(block)) && fsync(fd) == 0
                           : pwrite(fd, "1", 1, 0) == 1;
        if (!ok) {
            std::fprintf(stderr, "kvmx-flushbench: write to '%s': %s\n",
                         path.c_str(), std::strerror(errno));
            close(fd);
            return 1;
        }
        t.push_back(now_ns() - t0);
    }
    close(fd);
    std::sort(t.begin(), t.end());
    uint64_t sum = 0;
    for (auto v : t)
        sum += v;
    auto pct = [&](double p) { return t[std::min<size_t>(t.size() - 1, size_t(p * t.size()))]; };
    std::printf("{\"label\":\"%s\",\"n\":%ld,\"min_ns\":%llu,\"p50_ns\":%llu,"
                "\"p90_ns\":%llu,\"p99_ns\":%llu,\"max_ns\":%llu,"
                "\"avg_ns\":%llu}\n",
                label.c_str(), n, (unsigned long long)t.front(),
                (unsigned long long)pct(0.5), (unsigned long long)pct(0.9),
                (unsigned long long)pct(0.99), (unsigned long long)t.back(),
                (unsigned long long)(sum / t.size()));
    std::fflush(stdout);
    return 0;
}

}  // namespace

int main(int argc, char** argv)
{
    long n = 1000;
    int i = 1;
    if (i + 1 < argc && !std::strcmp(argv[i], "-n")) {
        char* end;
        n = std::strtol(argv[i + 1], &end, 10);
        if (*end || n < 1 || n > 10000000) {
            std::fprintf(stderr, "kvmx-flushbench: bad count '%s'\n", argv[i + 1]);
            return 2;
        }
        i += 2;
    }
    if (i >= argc) {
        std::fprintf(stderr, "usage: kvmx-flushbench [-n N] LABEL=REGION...\n");
        return 2;
    }
    int rc = 0;
    for (; i < argc; i++) {
        std::string a = argv[i];
        auto eq = a.find('=');
        if (eq == std::string::npos) {
            std::fprintf(stderr, "kvmx-flushbench: expected LABEL=REGION, got '%s'\n", argv[i]);
            return 2;
        }
        rc |= bench(a.substr(0, eq), a.substr(eq + 1), n);
    }
    return rc;
}
