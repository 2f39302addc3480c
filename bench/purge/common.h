/* Timing helpers shared by the bench/purge measurement programs. */
#ifndef PURGE_BENCH_COMMON_H
#define PURGE_BENCH_COMMON_H
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static inline double now_us(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e6 + ts.tv_nsec / 1e3;
}

static int cmp_dbl(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;

    return x < y ? -1 : x > y;
}

/* Sorts v in place and prints its median, p99 and minimum, in µs. */
static inline void report(const char *name, double *v, int n)
{
    qsort(v, n, sizeof(*v), cmp_dbl);
    printf("%-44s n=%-5d median=%9.1f p99=%9.1f min=%9.1f us\n", name, n,
           v[n / 2], v[(n * 99) / 100], v[0]);
}
#endif
