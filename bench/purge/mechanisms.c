// SPDX-License-Identifier: GPL-2.0-or-later
/*
 * Virtblock purging: what the host kernel gives us, measured.
 * See docs/design/virtblock-purging.md for what the numbers decided.
 *
 *   cc -O2 -pthread -o mechanisms mechanisms.c
 *   ./mechanisms hazard DIR       punch a hole under a MAP_SHARED file mapping
 *   ./mechanisms memfd            memfd: punch + uffd MISSING + UFFDIO_COPY
 *   ./mechanisms swap DIR         file: swap in a uffd anonymous range, fault,
 *                                 restore into the file, map the file back
 *   ./mechanisms vmas DIR         VMAs of a 64 GiB sparse file mapping with
 *                                 10,000 purged extents; vm.max_map_count
 *   ./mechanisms probe DIR        access tracking by zapping PTEs and reading
 *                                 back the present bits (PAGEMAP_SCAN)
 *   ./mechanisms kvm              KVM capabilities that bound memslot holes;
 *                                 memslot add/remove with many slots
 *   ./mechanisms floor DIR        the least a fault-back costs, served in the
 *                                 faulting process: bounce buffer or an
 *                                 O_DIRECT read into the page cache
 *
 * DIR must be on the file system to test (ext4 here).  Needs root for
 * userfaultfd without UFFD_USER_MODE_ONLY and for /dev/kvm.  Every
 * measurement prints "name n=N median=... p99=..." in microseconds.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/kvm.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "common.h"

/* PAGEMAP_SCAN (Linux 6.7); Debian 12's headers are older. */
#ifndef PAGEMAP_SCAN
struct page_region { uint64_t start, end, categories; };
struct pm_scan_arg {
    uint64_t size, flags, start, end, walk_end, vec, vec_len, max_pages;
    uint64_t category_inverted, category_mask, category_anyof_mask;
    uint64_t return_mask;
};
#define PAGE_IS_PRESENT (1 << 3)
#define PAGEMAP_SCAN _IOWR('f', 16, struct pm_scan_arg)
#endif

#define MiB (1UL << 20)
#define GiB (1UL << 30)

static void die(const char *what)
{
    fprintf(stderr, "%s: %s\n", what, strerror(errno));
    exit(1);
}

static long blocks_of(int fd)
{
    struct stat st;

    if (fstat(fd, &st))
        die("fstat");
    return st.st_blocks; /* 512-byte units */
}

static int tmpfile_in(const char *dir, size_t size)
{
    char path[4096];
    int fd;

    snprintf(path, sizeof(path), "%s/purge-bench.%d", dir, getpid());
    fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0)
        die(path);
    unlink(path);
    if (ftruncate(fd, size))
        die("ftruncate");
    return fd;
}

static void fill(int fd, size_t size)
{
    size_t chunk = 4 * MiB;
    unsigned char *buf = malloc(chunk);

    for (size_t off = 0; off < size; off += chunk) {
        for (size_t i = 0; i < chunk; i += 8)
            *(uint64_t *)(buf + i) = (off + i) | 0x8000000000000000ULL;
        if (pwrite(fd, buf, chunk, off) != (ssize_t)chunk)
            die("pwrite");
    }
    free(buf);
    if (fsync(fd))
        die("fsync");
}

static uint64_t expect_at(size_t off)
{
    return (off & ~7UL) | 0x8000000000000000ULL;
}

static int uffd_open(uint64_t features)
{
    struct uffdio_api api = { .api = UFFD_API, .features = features };
    int fd = syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);

    if (fd < 0)
        die("userfaultfd");
    if (ioctl(fd, UFFDIO_API, &api))
        die("UFFDIO_API");
    return fd;
}

static void uffd_register(int uffd, void *p, size_t len)
{
    struct uffdio_register reg = {
        .range = { .start = (uintptr_t)p, .len = len },
        .mode = UFFDIO_REGISTER_MODE_MISSING,
    };

    if (ioctl(uffd, UFFDIO_REGISTER, &reg))
        die("UFFDIO_REGISTER");
}

static int count_vmas(void)
{
    FILE *f = fopen("/proc/self/maps", "r");
    int n = 0, c;

    while ((c = fgetc(f)) != EOF)
        n += c == '\n';
    fclose(f);
    return n;
}

static long slab_bytes(const char *name)
{
    FILE *f = fopen("/proc/slabinfo", "r");
    char line[512], n[64];
    long active, total, size, r = -1;

    if (!f)
        return -1;
    while (fgets(line, sizeof(line), f))
        if (sscanf(line, "%63s %ld %ld %ld", n, &active, &total, &size) == 4 &&
            !strcmp(n, name))
            r = active * size;
    fclose(f);
    return r;
}

/* ---- hazard: a punched hole under a MAP_SHARED file mapping ---------- */

static int cmd_hazard(const char *dir)
{
    size_t size = 8 * MiB, off = 2 * MiB, bs = 2 * MiB;
    int fd = tmpfile_in(dir, size);
    volatile uint64_t *p;
    size_t zeros = 0, right = 0;
    long b0, b1, b2;

    fill(fd, size);
    p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED)
        die("mmap");
    for (size_t i = 0; i < size / 8; i++) /* map every page */
        right += p[i] == expect_at(i * 8);
    b0 = blocks_of(fd);
    if (fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, bs))
        die("fallocate(PUNCH_HOLE)");
    b1 = blocks_of(fd);
    for (size_t i = off / 8; i < (off + bs) / 8; i++)
        zeros += p[i] == 0;
    printf("hazard: %zu of %zu words right before the punch\n", right,
           size / 8);
    printf("hazard: st_blocks %ld before, %ld after punching 2 MiB "
           "(freed %ld KiB)\n", b0, b1, (b0 - b1) / 2);
    printf("hazard: reads of the hole through the mapping: %zu of %zu "
           "words are zero, no fault, no signal\n", zeros, bs / 8);
    printf("hazard: st_blocks after reading the hole: %ld\n",
           blocks_of(fd));
    p[off / 8 + 1] = 0x1234; /* one guest-like store into the hole */
    if (msync((void *)p, size, MS_SYNC))
        die("msync");
    b2 = blocks_of(fd);
    printf("hazard: one 8-byte store into the hole: accepted silently; "
           "st_blocks %ld (re-allocated %ld KiB), the rest of that page "
           "reads %s\n", b2, (b2 - b1) / 2,
           p[off / 8] == 0 ? "zeros" : "data");
    {
        uint64_t v;

        if (pread(fd, &v, 8, off + 4096) != 8)
            die("pread");
        printf("hazard: pread() of the hole through the fd: 0x%llx\n",
               (unsigned long long)v);
    }
    munmap((void *)p, size);
    close(fd);
    return 0;
}

/* ---- memfd: punch + uffd MISSING + UFFDIO_COPY ------------------------ */

struct faulter {
    int uffd;
    size_t bs;
    unsigned char *src;       /* the "disk copy" */
    uintptr_t base;           /* start of the registered mapping */
    double copy_us;           /* last UFFDIO_COPY, measured by the handler */
    atomic_int stop;
    /* swap mode: restore into the file, map it back, wake */
    int file_fd;
    unsigned char *view;      /* hostd's own mapping of the file */
    double restore_us, sync_us, remap_us;
    atomic_int done;          /* faults handled, stored after the numbers */
};

/*
 * The next page fault on @uffd into @msg: true, or false after 100 ms
 * without one (so that the caller can look at its stop flag).
 */
static bool next_fault(int uffd, struct uffd_msg *msg)
{
    struct pollfd pfd = { .fd = uffd, .events = POLLIN };

    return poll(&pfd, 1, 100) > 0 &&
           read(uffd, msg, sizeof(*msg)) == sizeof(*msg) &&
           msg->event == UFFD_EVENT_PAGEFAULT;
}

/* Maps the file back over [base + off, + len) and wakes its waiters. */
static void map_back(int uffd, uintptr_t base, int fd, size_t off, size_t len)
{
    struct uffdio_range r = { .start = base + off, .len = len };

    if (mmap((void *)(base + off), len, PROT_READ | PROT_WRITE,
             MAP_SHARED | MAP_FIXED, fd, off) == MAP_FAILED)
        die("mmap file back");
    if (ioctl(uffd, UFFDIO_WAKE, &r))
        die("UFFDIO_WAKE");
}

/* the faulter resumes inside the handler's ioctl: wait for its numbers */
static void wait_done(struct faulter *f, int n)
{
    while (atomic_load(&f->done) < n)
        ;
}

static void *memfd_handler(void *arg)
{
    struct faulter *f = arg;

    while (!atomic_load(&f->stop)) {
        struct uffd_msg msg;

        if (!next_fault(f->uffd, &msg))
            continue;
        uintptr_t blk = (msg.arg.pagefault.address - f->base) & ~(f->bs - 1);
        if (!f->view) {
            struct uffdio_copy c = {
                .dst = f->base + blk, .src = (uintptr_t)f->src + blk,
                .len = f->bs, .mode = 0,
            };
            double t = now_us();

            if (ioctl(f->uffd, UFFDIO_COPY, &c) && errno != EEXIST)
                die("UFFDIO_COPY");
            f->copy_us = now_us() - t;
        } else {
            double t = now_us();

            /* the mover has read and checked the disk copy: write it into
             * the backend through the fd (the guest cannot see the range
             * yet), make it durable, only then give the range back */
            if (pwrite(f->file_fd, f->src + blk, f->bs, blk) != (ssize_t)f->bs)
                die("pwrite restore");
            f->restore_us = now_us() - t;
            t = now_us();
            if (fdatasync(f->file_fd))
                die("fdatasync");
            f->sync_us = now_us() - t;
            t = now_us();
            map_back(f->uffd, f->base, f->file_fd, blk, f->bs);
            f->remap_us = now_us() - t;
        }
        atomic_fetch_add(&f->done, 1);
    }
    return NULL;
}

static void memfd_run(size_t bs, int iters)
{
    size_t size = 64 * MiB;
    int nblk = size / bs;
    int fd = memfd_create("purge-bench", MFD_CLOEXEC);
    struct faulter f = { .bs = bs };
    volatile uint64_t *p;
    double *fault = calloc(iters, sizeof(double));
    double *copy = calloc(iters, sizeof(double));
    double *punch = calloc(iters, sizeof(double));
    pthread_t th;
    long wrong = 0, pread_zero = 0;
    char name[64];

    if (fd < 0)
        die("memfd_create");
    if (ftruncate(fd, size))
        die("ftruncate");
    fill(fd, size);
    f.src = malloc(size);
    if (pread(fd, f.src, size, 0) != (ssize_t)size)
        die("pread");
    p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED)
        die("mmap");
    f.base = (uintptr_t)p;
    f.uffd = uffd_open(UFFD_FEATURE_MISSING_SHMEM);
    uffd_register(f.uffd, (void *)p, size);
    for (size_t i = 0; i < size / 8; i += 512)
        (void)p[i];
    pthread_create(&th, NULL, memfd_handler, &f);
    for (int i = 0; i < iters; i++) {
        size_t blk = (size_t)(i % nblk) * bs;
        double t = now_us();
        uint64_t v;

        if (fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, blk, bs))
            die("fallocate");
        punch[i] = now_us() - t;
        if (i == 0) { /* the fd path is not trapped: it sees the hole */
            if (pread(fd, &v, 8, blk) != 8)
                die("pread");
            pread_zero = v == 0;
        }
        t = now_us();
        v = p[(blk + bs / 2) / 8]; /* a read in the middle of the block */
        fault[i] = now_us() - t;
        wait_done(&f, i + 1);
        copy[i] = f.copy_us;
        wrong += v != expect_at(blk + bs / 2);
        wrong += p[blk / 8] != expect_at(blk);
    }
    atomic_store(&f.stop, 1);
    pthread_join(th, NULL);
    printf("memfd %zu KiB: %ld wrong words after fault-back; pread() of a "
           "punched block through the fd returns %s\n", bs >> 10, wrong,
           pread_zero ? "zeros (not trapped)" : "data");
    snprintf(name, sizeof(name), "memfd punch %zuK", bs >> 10);
    report(name, punch, iters);
    snprintf(name, sizeof(name), "memfd fault+UFFDIO_COPY %zuK (faulter)",
             bs >> 10);
    report(name, fault, iters);
    snprintf(name, sizeof(name), "memfd UFFDIO_COPY %zuK (handler)", bs >> 10);
    report(name, copy, iters);
    munmap((void *)p, size);
    close(fd);
    close(f.uffd);
    free(f.src);
}

static int cmd_memfd(void)
{
    memfd_run(2 * MiB, 200);
    memfd_run(64 << 10, 1000);
    return 0;
}

/* ---- swap: anonymous uffd range over a piece of a file mapping -------- */

static void swap_run(const char *dir, size_t bs, int iters)
{
    size_t size = 64 * MiB;
    int nblk = size / bs;
    int fd = tmpfile_in(dir, size);
    struct faulter f = { .bs = bs, .file_fd = fd };
    volatile uint64_t *p;
    double *out = calloc(iters, sizeof(double));
    double *punch = calloc(iters, sizeof(double));
    double *fault = calloc(iters, sizeof(double));
    double *restore = calloc(iters, sizeof(double));
    double *remap = calloc(iters, sizeof(double));
    double *sync = calloc(iters, sizeof(double));
    pthread_t th;
    long wrong = 0, b0, b1 = 0;
    int vmas0, vmas_out = 0;
    char name[80];

    fill(fd, size);
    f.src = malloc(size);
    if (pread(fd, f.src, size, 0) != (ssize_t)size)
        die("pread");
    p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    f.view = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED || f.view == MAP_FAILED)
        die("mmap");
    f.base = (uintptr_t)p;
    f.uffd = uffd_open(0);
    for (size_t i = 0; i < size / 8; i += 512)
        (void)p[i];
    vmas0 = count_vmas();
    b0 = blocks_of(fd);
    pthread_create(&th, NULL, memfd_handler, &f);
    for (int i = 0; i < iters; i++) {
        size_t blk = (size_t)((i * 7) % nblk) * bs; /* not always adjacent */
        double t = now_us();
        uint64_t v;

        /* purge, after the disk copy is durable: first take the range away
         * from the guest, only then free the NVM space */
        if (mmap((void *)(f.base + blk), bs, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE,
                 -1, 0) == MAP_FAILED)
            die("mmap anon over file");
        uffd_register(f.uffd, (void *)(f.base + blk), bs);
        out[i] = now_us() - t;
        t = now_us();
        if (fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, blk, bs))
            die("fallocate");
        punch[i] = now_us() - t;
        if (i == 0) {
            vmas_out = count_vmas();
            b1 = blocks_of(fd);
        }
        t = now_us();
        v = p[(blk + bs / 2) / 8];
        fault[i] = now_us() - t;
        wait_done(&f, i + 1);
        restore[i] = f.restore_us;
        remap[i] = f.remap_us;
        sync[i] = f.sync_us;
        wrong += v != expect_at(blk + bs / 2);
        wrong += p[blk / 8] != expect_at(blk);
    }
    atomic_store(&f.stop, 1);
    pthread_join(th, NULL);
    printf("swap %zu KiB: %ld wrong words; VMAs %d before, %d with one "
           "block out, %d after all faults; st_blocks %ld -> %ld after one "
           "purge\n", bs >> 10, wrong, vmas0, vmas_out, count_vmas(), b0, b1);
    snprintf(name, sizeof(name), "swap out (mmap anon+register) %zuK",
             bs >> 10);
    report(name, out, iters);
    snprintf(name, sizeof(name), "swap punch %zuK", bs >> 10);
    report(name, punch, iters);
    snprintf(name, sizeof(name), "swap fault-back total (faulter) %zuK",
             bs >> 10);
    report(name, fault, iters);
    snprintf(name, sizeof(name), "  of which pwrite into file %zuK",
             bs >> 10);
    report(name, restore, iters);
    snprintf(name, sizeof(name), "  of which fdatasync %zuK", bs >> 10);
    report(name, sync, iters);
    snprintf(name, sizeof(name), "  of which mmap file back+wake %zuK",
             bs >> 10);
    report(name, remap, iters);
    munmap((void *)p, size);
    munmap(f.view, size);
    close(fd);
    close(f.uffd);
    free(f.src);
}

static int cmd_swap(const char *dir)
{
    swap_run(dir, 2 * MiB, 200);
    swap_run(dir, 64 << 10, 1000);
    return 0;
}

/* ---- vmas: 64 GiB sparse NVDIMM, 10,000 purged extents ---------------- */

static int cmd_vmas(const char *dir)
{
    size_t size = 64 * GiB, bs = 2 * MiB;
    int fd = tmpfile_in(dir, size); /* sparse: nothing allocated */
    int uffd = uffd_open(0);
    unsigned char *p;
    int vmas0, n = 10000, made = 0;
    long slab0 = slab_bytes("vm_area_struct"), slab1;
    double t, per;
    FILE *f = fopen("/proc/sys/vm/max_map_count", "r");
    long max_map = -1;

    if (f) {
        if (fscanf(f, "%ld", &max_map) != 1)
            max_map = -1;
        fclose(f);
    }
    p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE,
             fd, 0);
    if (p == MAP_FAILED)
        die("mmap 64 GiB");
    vmas0 = count_vmas();
    /* 10,000 isolated extents, spread over the whole NVDIMM */
    t = now_us();
    for (int i = 0; i < n; i++) {
        size_t off = (size_t)i * (size / n / bs) * bs;

        if (mmap(p + off, bs, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE,
                 -1, 0) == MAP_FAILED)
            break;
        uffd_register(uffd, p + off, bs);
        made++;
    }
    per = (now_us() - t) / made;
    slab1 = slab_bytes("vm_area_struct");
    printf("vmas: vm.max_map_count=%ld; 64 GiB file mapping: %d VMAs in "
           "the process; with %d purged 2 MiB extents: %d (+%d); "
           "%.1f us per swap-out at that size; vm_area_struct slab +%ld KiB\n",
           max_map, vmas0, made, count_vmas(), count_vmas() - vmas0, per,
           slab0 >= 0 ? (slab1 - slab0) >> 10 : -1);
    /* how far do 64 KiB extents get (every other block purged)? */
    {
        size_t s = 64 << 10;
        int more = 0;

        for (size_t off = bs / 2; off + s <= size; off += 2 * s) {
            if (((off / bs) % (size / n / bs)) == 0)
                continue; /* skip the 2 MiB extents made above */
            if (mmap(p + off, s, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE,
                     -1, 0) == MAP_FAILED) {
                printf("vmas: adding isolated 64 KiB extents: mmap fails "
                       "with %s after %d more (%d VMAs)\n", strerror(errno),
                       more, count_vmas());
                break;
            }
            more++;
        }
    }
    munmap(p, size);
    close(uffd);
    close(fd);
    return 0;
}

/* ---- probe: read+write access tracking by zapping PTEs ---------------- */

static long scan_present(void *p, size_t len, int pm, double *us)
{
    static struct page_region vec[4096];
    struct pm_scan_arg a = {
        .size = sizeof(a), .start = (uintptr_t)p,
        .end = (uintptr_t)p + len, .vec = (uintptr_t)vec, .vec_len = 4096,
        .category_mask = PAGE_IS_PRESENT, .return_mask = PAGE_IS_PRESENT,
    };
    long pages = 0;
    double t = now_us();

    for (;;) {
        long n = ioctl(pm, PAGEMAP_SCAN, &a);

        if (n < 0)
            return -errno;
        for (long i = 0; i < n; i++)
            pages += (vec[i].end - vec[i].start) >> 12;
        if (a.walk_end >= a.end)
            break;
        a.start = a.walk_end;
    }
    *us = now_us() - t;
    return pages;
}

static int cmd_probe(const char *dir)
{
    size_t size = 1 * GiB, bs = 2 * MiB;
    int fd = tmpfile_in(dir, size);
    int pm = open("/proc/self/pagemap", O_RDONLY);
    volatile unsigned char *p;
    int nblk = size / bs, iters = 100;
    double *zap = calloc(iters, sizeof(double));
    double *rd = calloc(iters, sizeof(double));
    double *wr = calloc(iters, sizeof(double));
    double scan_us;
    long pages;

    fill(fd, size);
    p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED)
        die("mmap");
    for (size_t i = 0; i < size; i += 4096)
        (void)p[i];
    pages = scan_present((void *)p, size, pm, &scan_us);
    if (pages < 0) {
        printf("probe: PAGEMAP_SCAN: %s\n", strerror(-pages));
        return 0;
    }
    printf("probe: 1 GiB file mapping, all touched: PAGEMAP_SCAN finds %ld "
           "present pages in %.0f us\n", pages, scan_us);
    if (madvise((void *)p, size, MADV_DONTNEED))
        die("madvise");
    pages = scan_present((void *)p, size, pm, &scan_us);
    printf("probe: after MADV_DONTNEED of all: %ld present, scan %.0f us; "
           "page cache kept: st_blocks %ld\n", pages, scan_us,
           blocks_of(fd));
    /* touch one read in block 3 and one write in block 7: both show */
    (void)p[3 * bs + 100];
    p[7 * bs + 5000] = 1;
    pages = scan_present((void *)p, size, pm, &scan_us);
    printf("probe: after 1 read + 1 write in 2 different blocks: %ld "
           "present pages (reads are seen too), scan %.0f us\n", pages,
           scan_us);
    for (int i = 0; i < iters; i++) {
        size_t b = (size_t)(i % nblk) * bs;
        double t;

        for (size_t o = 0; o < bs; o += 4096)
            (void)p[b + o];
        t = now_us();
        if (madvise((void *)(p + b), bs, MADV_DONTNEED))
            die("madvise");
        zap[i] = now_us() - t;
        t = now_us();
        for (size_t o = 0; o < bs; o += 4096)
            (void)p[b + o];
        rd[i] = now_us() - t;
        madvise((void *)(p + b), bs, MADV_DONTNEED);
        t = now_us();
        for (size_t o = 0; o < bs; o += 4096)
            p[b + o] = 2;
        wr[i] = now_us() - t;
    }
    report("probe zap 2 MiB mapped (MADV_DONTNEED)", zap, iters);
    report("probe re-touch 2 MiB after zap, reads", rd, iters);
    report("probe re-touch 2 MiB after zap, writes", wr, iters);
    munmap((void *)p, size);
    close(fd);
    close(pm);
    return 0;
}

/* ---- kvm: what bounds memslot holes ----------------------------------- */

static int cmd_kvm(void)
{
    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC), vm;
    static const struct { const char *name; int cap; } caps[] = {
        { "KVM_CAP_NR_MEMSLOTS", KVM_CAP_NR_MEMSLOTS },
        { "KVM_CAP_MULTI_ADDRESS_SPACE", KVM_CAP_MULTI_ADDRESS_SPACE },
        { "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2", KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 },
        { "KVM_CAP_DIRTY_LOG_RING", KVM_CAP_DIRTY_LOG_RING },
        { "KVM_CAP_READONLY_MEM", KVM_CAP_READONLY_MEM },
        { "KVM_CAP_USER_MEMORY2 (231)", 231 },
        { "KVM_CAP_MEMORY_ATTRIBUTES (233)", 233 },
        { "KVM_CAP_GUEST_MEMFD (234)", 234 },
        { "KVM_CAP_MEMORY_FAULT_INFO (232)", 232 },
    };
    size_t size = 64 * GiB, bs = 2 * MiB;
    int n = 10000, slots;
    unsigned char *p;
    double t, *pair;

    if (kvm < 0)
        die("/dev/kvm");
    for (size_t i = 0; i < sizeof(caps) / sizeof(caps[0]); i++)
        printf("kvm: %-36s %d\n", caps[i].name,
               ioctl(kvm, KVM_CHECK_EXTENSION, caps[i].cap));
    slots = ioctl(kvm, KVM_CHECK_EXTENSION, KVM_CAP_NR_MEMSLOTS);
    vm = ioctl(kvm, KVM_CREATE_VM, 0);
    if (vm < 0)
        die("KVM_CREATE_VM");
    p = mmap(NULL, size, PROT_READ | PROT_WRITE,
             MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED)
        die("mmap");
    /* a 64 GiB NVDIMM cut around 10,000 holes: 10,001 slots; each hole
     * filled back and cut again is what a fault-back and a purge cost */
    t = now_us();
    int made = 0;
    for (int i = 0; i < n && i < slots; i++) {
        size_t stride = size / n / bs * bs;
        struct kvm_userspace_memory_region r = {
            .slot = i, .guest_phys_addr = 4 * GiB + i * stride,
            .memory_size = stride - bs,
            .userspace_addr = (uintptr_t)p + i * stride,
        };

        if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &r))
            break;
        made++;
    }
    printf("kvm: %d slots for 10,000 holes in 64 GiB: %.1f us per slot "
           "added\n", made, (now_us() - t) / made);
    pair = calloc(50, sizeof(double));
    for (int i = 0; i < 50; i++) {
        size_t stride = size / n / bs * bs;
        struct kvm_userspace_memory_region hole = {
            .slot = made, .guest_phys_addr = 4 * GiB + i * stride + stride - bs,
            .memory_size = bs,
            .userspace_addr = (uintptr_t)p + i * stride + stride - bs,
        };

        t = now_us();
        if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &hole))
            die("fill hole");
        hole.memory_size = 0;
        if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &hole))
            die("cut hole");
        pair[i] = now_us() - t;
    }
    report("kvm fill+cut one hole with 10,001 slots", pair, 50);
    close(vm);
    close(kvm);
    return 0;
}

/* ---- floor: the least a fault-back can cost, in one process ------------ */

/*
 * The swap mechanism as kvmx uses it (an anonymous placeholder registered
 * with userfaultfd over a punched range of the backend), served by a
 * handler thread in the faulting process itself: no daemon, no sockets,
 * no checksum.  What is left is the I/O and the kernel's part, so this is
 * the floor of any design built on the swap.  Three ways to restore:
 *   read    no fault at all: an O_DIRECT read at queue depth 1 (what fio
 *           measures; the goal's reference) of the same block of another
 *           copy, just before each fault;
 *   bounce  O_DIRECT read into a buffer, pwrite into the backend, map the
 *           file back, wake (hostd's way, without its hand-offs);
 *   direct  O_DIRECT read straight into the handler's own shared mapping
 *           of the backend (the page cache is the DMA target), map back,
 *           wake.
 */
enum floor_mode { FLOOR_BOUNCE, FLOOR_DIRECT };

struct floor_ctx {
    int uffd, file_fd, copy_fd;
    enum floor_mode mode;
    size_t bs;
    uintptr_t base;           /* QEMU's mapping, in this process */
    unsigned char *view;      /* the handler's own mapping of the backend */
    unsigned char *buf;       /* aligned bounce buffer */
    double read_us;
    atomic_int stop, done;
};

static void *floor_handler(void *arg)
{
    struct floor_ctx *c = arg;

    while (!atomic_load(&c->stop)) {
        struct uffd_msg msg;

        if (!next_fault(c->uffd, &msg))
            continue;
        size_t blk = (msg.arg.pagefault.address - c->base) & ~(c->bs - 1);
        double t = now_us();

        if (c->mode == FLOOR_BOUNCE) {
            if (pread(c->copy_fd, c->buf, c->bs, blk) != (ssize_t)c->bs)
                die("pread copy");
            c->read_us = now_us() - t;
            if (pwrite(c->file_fd, c->buf, c->bs, blk) != (ssize_t)c->bs)
                die("pwrite backend");
        } else {
            if (pread(c->copy_fd, c->view + blk, c->bs, blk) !=
                (ssize_t)c->bs)
                die("pread copy into the backend's mapping");
            c->read_us = now_us() - t;
        }
        map_back(c->uffd, c->base, c->file_fd, blk, c->bs);
        atomic_fetch_add(&c->done, 1);
    }
    return NULL;
}

static void floor_run(const char *dir, size_t bs, int iters)
{
    size_t size = 256 * MiB;
    int nblk = size / bs;
    char path[4096];
    int fd = tmpfile_in(dir, size), copy, ref;
    unsigned char *buf;
    double *plain = calloc(2 * iters, sizeof(double));
    double *fault[2] = { calloc(iters, sizeof(double)),
                         calloc(iters, sizeof(double)) };
    double *rd[2] = { calloc(iters, sizeof(double)),
                      calloc(iters, sizeof(double)) };
    int *order = calloc(iters, sizeof(int));
    long wrong = 0;
    char name[80];

    if (posix_memalign((void **)&buf, 4096, bs))
        die("posix_memalign");
    for (int i = 0; i < iters; i++)
        order[i] = (int)(((uint64_t)i * 2654435761u) % nblk);

    for (int mode = FLOOR_BOUNCE; mode <= FLOOR_DIRECT; mode++) {
        struct floor_ctx c = { .mode = mode, .bs = bs, .file_fd = fd,
                               .buf = buf };
        volatile uint64_t *p;
        pthread_t th;

        /* the disk copies: the same bytes at the same offsets, read with
         * O_DIRECT; a fresh file per mode, so neither inherits the other's
         * cached metadata */
        snprintf(path, sizeof(path), "%s/purge-floor-copy.%d", dir,
                 getpid());
        copy = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
        if (copy < 0)
            die(path);
        fill(copy, size);
        close(copy);
        c.copy_fd = open(path, O_RDONLY | O_DIRECT | O_CLOEXEC);
        if (c.copy_fd < 0)
            die("open O_DIRECT");
        unlink(path);
        /* and the reference reads' own copy, written the same way, so that
         * neither read finds the other's block in a cache below */
        ref = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
        if (ref < 0)
            die(path);
        fill(ref, size);
        close(ref);
        ref = open(path, O_RDONLY | O_DIRECT | O_CLOEXEC);
        if (ref < 0)
            die("open O_DIRECT");
        unlink(path);
        /* the backend starts as one big hole: every block purged */
        if (fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0,
                      size))
            die("punch");
        p = mmap(NULL, size, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        c.view = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (p == MAP_FAILED || c.view == MAP_FAILED)
            die("mmap");
        c.base = (uintptr_t)p;
        c.uffd = uffd_open(0);
        uffd_register(c.uffd, (void *)p, size);
        pthread_create(&th, NULL, floor_handler, &c);
        for (int i = 0; i < iters; i++) {
            size_t blk = (size_t)order[i] * bs;
            double t;
            uint64_t v;

            /* the reference, interleaved: the same block, no fault */
            t = now_us();
            if (pread(ref, buf, bs, blk) != (ssize_t)bs)
                die("pread");
            plain[mode * iters + i] = now_us() - t;
            t = now_us();
            v = p[(blk + bs / 2) / 8];
            fault[mode][i] = now_us() - t;
            while (atomic_load(&c.done) < i + 1)
                ;
            rd[mode][i] = c.read_us;
            wrong += v != expect_at(blk + bs / 2);
        }
        atomic_store(&c.stop, 1);
        pthread_join(th, NULL);
        munmap((void *)p, size);
        munmap(c.view, size);
        close(c.uffd);
        close(c.copy_fd);
        close(ref);
    }
    printf("floor %zu KiB: %ld wrong words\n", bs >> 10, wrong);
    snprintf(name, sizeof(name), "floor O_DIRECT read, no fault %zuK",
             bs >> 10);
    report(name, plain, 2 * iters);
    snprintf(name, sizeof(name), "floor fault, bounce (faulter) %zuK",
             bs >> 10);
    report(name, fault[FLOOR_BOUNCE], iters);
    snprintf(name, sizeof(name), "  of which the read %zuK", bs >> 10);
    report(name, rd[FLOOR_BOUNCE], iters);
    snprintf(name, sizeof(name), "floor fault, direct (faulter) %zuK",
             bs >> 10);
    report(name, fault[FLOOR_DIRECT], iters);
    snprintf(name, sizeof(name), "  of which the read %zuK", bs >> 10);
    report(name, rd[FLOOR_DIRECT], iters);
    close(fd);
    free(buf);
    free(order);
}

static int cmd_floor(const char *dir)
{
    floor_run(dir, 64 << 10, 1000);
    floor_run(dir, 2 * MiB, 100);
    return 0;
}

int main(int argc, char **argv)
{
    const char *dir = argc > 2 ? argv[2] : "/var/tmp";

    if (argc < 2) {
        fprintf(stderr, "usage: %s hazard|memfd|swap|vmas|probe|kvm|floor [DIR]\n",
                argv[0]);
        return 2;
    }
    if (!strcmp(argv[1], "hazard"))
        return cmd_hazard(dir);
    if (!strcmp(argv[1], "memfd"))
        return cmd_memfd();
    if (!strcmp(argv[1], "swap"))
        return cmd_swap(dir);
    if (!strcmp(argv[1], "vmas"))
        return cmd_vmas(dir);
    if (!strcmp(argv[1], "probe"))
        return cmd_probe(dir);
    if (!strcmp(argv[1], "kvm"))
        return cmd_kvm();
    if (!strcmp(argv[1], "floor"))
        return cmd_floor(dir);
    fprintf(stderr, "unknown command '%s'\n", argv[1]);
    return 2;
}
