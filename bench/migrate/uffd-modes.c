// SPDX-License-Identifier: GPL-2.0-or-later
/*
 * Which memory can userfaultfd trap on this host?  For each backing kind a
 * VM's RAM or NVDIMM can have, map 2 MiB and try UFFDIO_REGISTER with each
 * mode on its own.  Prints one line per (backing, mode): ok or the errno.
 *
 *   cc -O2 -o uffd-modes uffd-modes.c && ./uffd-modes [DIR-ON-EXT4]
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#define LEN (2UL << 20)

static int uffd_new(void)
{
    struct uffdio_api api = {
        .api = UFFD_API,
        .features = UFFD_FEATURE_MINOR_SHMEM | UFFD_FEATURE_MINOR_HUGETLBFS |
                    UFFD_FEATURE_PAGEFAULT_FLAG_WP,
    };
    int fd = syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);

    if (fd < 0) {
        perror("userfaultfd");
        exit(1);
    }
    if (ioctl(fd, UFFDIO_API, &api)) {
        /* an older kernel: ask for nothing optional */
        close(fd);
        fd = syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
        api.features = 0;
        if (ioctl(fd, UFFDIO_API, &api)) {
            perror("UFFDIO_API");
            exit(1);
        }
    }
    return fd;
}

static void try(const char *what, void *p)
{
    static const struct { const char *name; __u64 mode; } modes[] = {
        { "missing", UFFDIO_REGISTER_MODE_MISSING },
        { "wp", UFFDIO_REGISTER_MODE_WP },
        { "minor", UFFDIO_REGISTER_MODE_MINOR },
    };

    for (size_t i = 0; i < sizeof(modes) / sizeof(modes[0]); i++) {
        int fd = uffd_new();
        struct uffdio_register reg = {
            .range = { .start = (unsigned long)p, .len = LEN },
            .mode = modes[i].mode,
        };
        int r = ioctl(fd, UFFDIO_REGISTER, &reg);

        printf("%-34s %-8s %s\n", what, modes[i].name,
               r ? strerror(errno) : "ok");
        close(fd);
    }
}

static void *map_fd(int fd, int flags)
{
    void *p;

    if (ftruncate(fd, LEN)) {
        perror("ftruncate");
        exit(1);
    }
    p = mmap(NULL, LEN, PROT_READ | PROT_WRITE, flags, fd, 0);
    if (p == MAP_FAILED) {
        perror("mmap");
        exit(1);
    }
    return p;
}

int main(int argc, char **argv)
{
    const char *dir = argc > 1 ? argv[1] : "/var/tmp";
    char path[4096];
    int fd;
    void *p;

    p = mmap(NULL, LEN, PROT_READ | PROT_WRITE,
             MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    try("anonymous private", p);

    fd = memfd_create("uffd-modes", MFD_CLOEXEC);
    try("memfd (shmem) shared", map_fd(fd, MAP_SHARED));
    close(fd);

    snprintf(path, sizeof(path), "/dev/shm/uffd-modes.%d", getpid());
    fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    unlink(path);
    try("tmpfs file shared", map_fd(fd, MAP_SHARED));
    close(fd);

    snprintf(path, sizeof(path), "%s/uffd-modes.%d", dir, getpid());
    fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0) {
        perror(path);
        return 1;
    }
    unlink(path);
    try("regular file shared (NVDIMM)", map_fd(fd, MAP_SHARED));
    try("regular file private", map_fd(fd, MAP_PRIVATE));
    close(fd);
    return 0;
}
