/*
 * What the destination pays to turn disk references back into pages: 4 KiB
 * O_DIRECT reads at random offsets of an image file on this machine's disk.
 *
 * Build: cc -O2 -o dread dread.c -luring
 * Run:   ./dread FILE [size_mib] [npages]
 * Creates FILE (size_mib, default 2048, random contents) if it is smaller,
 * then measures (wall clock, median of 3 runs unless said):
 *   - pread, one at a time (queue depth 1): latency median and p99 of
 *     2000 reads;
 *   - io_uring, npages (default 16384 = 64 MiB) random 4 KiB reads kept
 *     QD in flight, QD = 1, 8, 32, 128: pages/s and MB/s;
 *   - the same pages sorted by offset (a destination sorting a batch);
 *   - clustered: the same number of pages in runs of 16 contiguous blocks
 *     (files cached whole), read as one 64 KiB request per run at QD 32;
 *   - sequential 1 MiB reads at QD 8 (scanning a whole image);
 *   - buffered pread of cold blocks (POSIX_FADV_DONTNEED + RANDOM), QD 1;
 *   - buffered pread of hot blocks (in the host page cache), 4 KiB and
 *     128 KiB, thread CPU time: the cheapest read a guest can get.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <liburing.h>
#include <stdio.h>
#include <sys/stat.h>
#include <unistd.h>
#include "common.h"

#define PAGE 4096

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static void make_file(const char *path, uint64_t size)
{
    struct stat st;
    if (stat(path, &st) == 0 && (uint64_t)st.st_size >= size) {
        return;
    }
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    if (fd < 0) { perror("create"); exit(1); }
    size_t chunk = 1 << 20;
    uint64_t *b = malloc(chunk), s = 42;
    for (uint64_t off = 0; off < size; off += chunk) {
        for (size_t i = 0; i < chunk / 8; i++) b[i] = rng_next(&s);
        if (pwrite(fd, b, chunk, off) != (ssize_t)chunk) { perror("pwrite"); exit(1); }
    }
    fsync(fd);
    close(fd);
    free(b);
}

/* read n requests of len bytes at offs[] with qd in flight; returns ns */
static double uring_read(int fd, const uint64_t *offs, unsigned n, unsigned len,
                         unsigned qd, uint8_t *bufs)
{
    struct io_uring ring;
    if (io_uring_queue_init(qd, &ring, 0) < 0) { perror("uring"); exit(1); }
    unsigned sub = 0, done = 0, inflight = 0;
    double t0 = now_ns();
    while (done < n) {
        while (inflight < qd && sub < n) {
            struct io_uring_sqe *sqe = io_uring_get_sqe(&ring);
            io_uring_prep_read(sqe, fd, bufs + (size_t)(sub % qd) * len, len,
                               offs[sub]);
            sub++, inflight++;
        }
        io_uring_submit(&ring);
        struct io_uring_cqe *cqe;
        if (io_uring_wait_cqe(&ring, &cqe) < 0) { perror("wait"); exit(1); }
        do {
            if (cqe->res != (int)len) {
                fprintf(stderr, "short read %d\n", cqe->res); exit(1);
            }
            io_uring_cqe_seen(&ring, cqe);
            done++, inflight--;
        } while (io_uring_peek_cqe(&ring, &cqe) == 0);
    }
    double t1 = now_ns();
    io_uring_queue_exit(&ring);
    return t1 - t0;
}

int main(int argc, char **argv)
{
    if (argc < 2) { fprintf(stderr, "usage: dread FILE [size_mib] [npages]\n"); return 2; }
    const char *path = argv[1];
    uint64_t size = (argc > 2 ? strtoull(argv[2], 0, 0) : 2048) << 20;
    unsigned n = argc > 3 ? atoi(argv[3]) : 16384;
    uint64_t nblk = size / PAGE, s = 7;
    make_file(path, size);

    int fd = open(path, O_RDONLY | O_DIRECT);
    if (fd < 0) { perror("open O_DIRECT"); return 1; }
    uint8_t *bufs = aligned_alloc(PAGE, 128 * 65536);
    uint64_t *offs = malloc(n * sizeof(*offs));

    /* QD1 pread latency */
    {
        enum { L = 2000 };
        static double lat[L];
        for (int i = 0; i < L; i++) {
            uint64_t off = (rng_next(&s) % nblk) * PAGE;
            double t0 = now_ns();
            if (pread(fd, bufs, PAGE, off) != PAGE) { perror("pread"); return 1; }
            lat[i] = now_ns() - t0;
        }
        double m = median(lat, L);
        printf("pread O_DIRECT 4 KiB QD1: median %.1f us, p99 %.1f us, %.0f pages/s\n",
               m / 1e3, pct(lat, L, 0.99) / 1e3, 1e9 / m);
    }

    const char *orders[] = { "random", "sorted" };
    for (int o = 0; o < 2; o++) {
        unsigned qds[] = { 1, 8, 32, 128 };
        for (unsigned q = 0; q < 4; q++) {
            if (o == 1 && qds[q] == 1) continue;
            double v[3];
            for (int r = 0; r < 3; r++) {
                for (unsigned i = 0; i < n; i++) offs[i] = (rng_next(&s) % nblk) * PAGE;
                if (o == 1) qsort(offs, n, sizeof(*offs), cmp_u64);
                unsigned cnt = qds[q] == 1 ? n / 4 : n;   /* QD1 is slow: fewer */
                v[r] = uring_read(fd, offs, cnt, PAGE, qds[q], bufs) / cnt;
            }
            double m = median(v, 3);
            printf("io_uring O_DIRECT 4 KiB %s QD%-3u: %8.0f pages/s %7.1f MB/s (%.1f us/page)\n",
                   orders[o], qds[q], 1e9 / m, PAGE * 1e3 / m, m / 1e3);
        }
    }

    /* clustered: runs of 16 contiguous blocks, one 64 KiB read per run */
    {
        unsigned runs = n / 16;
        double v[3];
        for (int r = 0; r < 3; r++) {
            for (unsigned i = 0; i < runs; i++) offs[i] = (rng_next(&s) % (nblk / 16)) * 16 * PAGE;
            v[r] = uring_read(fd, offs, runs, 16 * PAGE, 32, bufs) / (runs * 16.0);
        }
        double m = median(v, 3);
        printf("io_uring O_DIRECT 64 KiB runs QD32: %8.0f pages/s %7.1f MB/s\n",
               1e9 / m, PAGE * 1e3 / m);
    }
    /* sequential: what scanning a whole image costs (candidate b) */
    {
        unsigned len = 1 << 20, cnt = 256;      /* 256 MiB per run */
        uint64_t *so = malloc(cnt * sizeof(*so));
        double v[3];
        for (int r = 0; r < 3; r++) {
            uint64_t base = (rng_next(&s) % (size / len - cnt)) * len;
            for (unsigned i = 0; i < cnt; i++) so[i] = base + (uint64_t)i * len;
            v[r] = uring_read(fd, so, cnt, len, 8, aligned_alloc(PAGE, 8u * len)) / cnt;
        }
        double m = median(v, 3);
        printf("io_uring O_DIRECT 1 MiB sequential QD8: %7.1f MB/s\n", len * 1e3 / m);
        free(so);
    }
    close(fd);

    /* buffered, cold */
    {
        int bfd = open(path, O_RDONLY);
        posix_fadvise(bfd, 0, 0, POSIX_FADV_DONTNEED);
        posix_fadvise(bfd, 0, 0, POSIX_FADV_RANDOM);
        enum { L = 2000 };
        static double lat[L];
        for (int i = 0; i < L; i++) {
            uint64_t off = (rng_next(&s) % nblk) * PAGE;
            double t0 = now_ns();
            if (pread(bfd, bufs, PAGE, off) != PAGE) { perror("pread"); return 1; }
            lat[i] = now_ns() - t0;
        }
        double m = median(lat, L);
        printf("pread buffered cold 4 KiB QD1: median %.1f us, p99 %.1f us\n",
               m / 1e3, pct(lat, L, 0.99) / 1e3);
        /* hot: the same 16 MiB again and again, served by the page cache:
         * the cheapest read a guest can get, against which the
         * per-page cost of recording is largest */
        unsigned lens[] = { PAGE, 32 * PAGE };
        for (int k = 0; k < 2; k++) {
            uint64_t span = 16 << 20;
            for (uint64_t off = 0; off < span; off += 65536) {
                if (pread(bfd, bufs, 65536, off) != 65536) { perror("warm"); return 1; }
            }
            double v[5];
            for (int r = 0; r < 5; r++) {
                unsigned cnt = 4000;
                double t0 = cpu_ns();
                for (unsigned i = 0; i < cnt; i++) {
                    uint64_t off = (rng_next(&s) % (span / lens[k])) * lens[k];
                    if (pread(bfd, bufs, lens[k], off) != lens[k]) { perror("pread"); return 1; }
                }
                v[r] = (cpu_ns() - t0) / cnt;
            }
            printf("pread buffered hot %3u KiB: %.2f us CPU per read (%.0f ns per 4 KiB)\n",
                   lens[k] / 1024, median(v, 5) / 1e3, median(v, 5) * PAGE / lens[k]);
        }
        posix_fadvise(bfd, 0, 0, POSIX_FADV_DONTNEED);
        close(bfd);
    }
    return 0;
}
