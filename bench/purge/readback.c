// SPDX-License-Identifier: GPL-2.0-or-later
/*
 * Virtblock purging: what the disk side costs on this machine.
 *
 *   cc -O2 -o readback readback.c -luring
 *   ./readback DIR [MiB]
 *
 * In a file of MiB (default 1024) under DIR, opened with O_DIRECT:
 *   - sequential write bandwidth, 2 MiB writes, queue depth 4 (io_uring):
 *     the ceiling of the purge mover;
 *   - random reads of one block at queue depth 1, 2 MiB and 64 KiB, with
 *     io_uring and with pread: the floor of a fault-back;
 *   - a journal commit: a 4 KiB write + fdatasync in a second file.
 * Prints "name n=N median=... p99=..." in microseconds.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <liburing.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "common.h"

#define MiB (1UL << 20)

static void die(const char *what, int err)
{
    fprintf(stderr, "%s: %s\n", what, strerror(err));
    exit(1);
}

static void wait_one(struct io_uring *ring, unsigned expect)
{
    struct io_uring_cqe *cqe;
    int r = io_uring_wait_cqe(ring, &cqe);

    if (r < 0)
        die("io_uring_wait_cqe", -r);
    if (cqe->res < 0)
        die("io_uring I/O", -cqe->res);
    if ((unsigned)cqe->res != expect)
        die("short I/O", EIO);
    io_uring_cqe_seen(ring, cqe);
}

static void seq_write(struct io_uring *ring, int fd, size_t size, void *buf)
{
    const unsigned qd = 4, bs = 2 * MiB;
    size_t off = 0, done = 0;
    unsigned inflight = 0;
    double t = now_us();

    while (done < size) {
        while (inflight < qd && off < size) {
            struct io_uring_sqe *sqe = io_uring_get_sqe(ring);

            io_uring_prep_write(sqe, fd, buf, bs, off);
            off += bs;
            inflight++;
        }
        io_uring_submit(ring);
        wait_one(ring, bs);
        inflight--;
        done += bs;
    }
    if (fdatasync(fd))
        die("fdatasync", errno);
    printf("sequential O_DIRECT write, 2 MiB x QD4, %zu MiB: %.0f MiB/s "
           "(incl. final fdatasync)\n", size / MiB,
           size / MiB / ((now_us() - t) / 1e6));
}

static void rand_read(struct io_uring *ring, int fd, size_t size, void *buf,
                      size_t bs, int n, int use_uring)
{
    double *v = calloc(n, sizeof(double));
    char name[64];

    for (int i = 0; i < n; i++) {
        size_t off = ((size_t)random() % (size / bs)) * bs;
        double t = now_us();

        if (use_uring) {
            struct io_uring_sqe *sqe = io_uring_get_sqe(ring);

            io_uring_prep_read(sqe, fd, buf, bs, off);
            io_uring_submit(ring);
            wait_one(ring, bs);
        } else if (pread(fd, buf, bs, off) != (ssize_t)bs) {
            die("pread", errno);
        }
        v[i] = now_us() - t;
    }
    snprintf(name, sizeof(name), "O_DIRECT read %zu KiB QD1 (%s)", bs >> 10,
             use_uring ? "io_uring" : "pread");
    report(name, v, n);
    free(v);
}

static void journal_commit(const char *dir, int n)
{
    char path[4096];
    double *v = calloc(n, sizeof(double));
    void *buf;
    int fd;

    snprintf(path, sizeof(path), "%s/purge-journal.%d", dir, getpid());
    fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0)
        die(path, errno);
    unlink(path);
    if (fallocate(fd, 0, 0, 4 * MiB))
        die("fallocate", errno);
    if (fsync(fd))
        die("fsync", errno);
    if (posix_memalign(&buf, 4096, 4096))
        die("posix_memalign", ENOMEM);
    memset(buf, 0x5a, 4096);
    for (int i = 0; i < n; i++) {
        double t = now_us();

        if (pwrite(fd, buf, 4096, (off_t)(i % 1024) * 4096) != 4096)
            die("pwrite", errno);
        if (fdatasync(fd))
            die("fdatasync", errno);
        v[i] = now_us() - t;
    }
    report("journal commit: 4 KiB pwrite+fdatasync", v, n);
    close(fd);
    free(buf);
}

int main(int argc, char **argv)
{
    const char *dir = argc > 1 ? argv[1] : "/var/tmp";
    size_t size = (argc > 2 ? strtoul(argv[2], NULL, 0) : 1024) * MiB;
    struct io_uring ring;
    char path[4096];
    void *buf;
    int fd, r;

    snprintf(path, sizeof(path), "%s/purge-disk.%d", dir, getpid());
    fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_DIRECT | O_CLOEXEC, 0600);
    if (fd < 0)
        die(path, errno);
    unlink(path);
    if (posix_memalign(&buf, 4096, 2 * MiB))
        die("posix_memalign", ENOMEM);
    memset(buf, 0xa5, 2 * MiB);
    r = io_uring_queue_init(8, &ring, 0);
    if (r < 0)
        die("io_uring_queue_init", -r);
    srandom(1);
    seq_write(&ring, fd, size, buf);
    rand_read(&ring, fd, size, buf, 2 * MiB, 200, 1);
    rand_read(&ring, fd, size, buf, 2 * MiB, 200, 0);
    rand_read(&ring, fd, size, buf, 64 << 10, 1000, 1);
    rand_read(&ring, fd, size, buf, 64 << 10, 1000, 0);
    journal_commit(dir, 200);
    io_uring_queue_exit(&ring);
    close(fd);
    return 0;
}
