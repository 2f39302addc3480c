/*
 * The tracking table a disk-dedup source keeps: guest page -> (image,
 * disk block, content hash), with a reverse index so that a write to a
 * disk range finds its records, a fixed capacity (the memory bound) and
 * CLOCK eviction when full. This is a model of the data structure the
 * design note proposes (docs/design/disk-dedup.md), not QEMU code.
 *
 * Build: cc -O2 -o table table.c
 * Run:   ./table [max_guest_gib]
 * For guests of 256 MiB .. 64 GiB it sizes the table to cover every
 * guest page (the worst case a bound must cap), fills it, and measures
 * per operation (thread CPU time, median of 5 runs of 200k operations):
 * insert into a full table (one CLOCK eviction each), lookup by guest
 * page (the migration's question), lookup miss, and invalidation by disk
 * block (a write to the disk). Prints bytes per record.
 */
#include <stdio.h>
#include <stdbool.h>
#include "common.h"

struct rec {                /* 24 bytes */
    uint64_t hash;          /* content hash of the block read (xxh3-64) */
    uint32_t page;          /* guest RAM page index (ram_addr >> 12) */
    uint32_t blk_lo;        /* disk block index (offset >> 12), low bits */
    uint8_t  blk_hi;        /* high bits: 40-bit block index, 4 PiB */
    uint8_t  image;         /* tracked image, < 255 per VM */
    uint16_t gen;           /* image generation when recorded */
    uint32_t flags;         /* bit 0: in use, bit 1: CLOCK referenced */
};
_Static_assert(sizeof(struct rec) == 24, "record size");

struct table {
    struct rec *recs;       /* capacity records */
    uint32_t cap, used, hand, free_head;
    uint32_t *fwd, *rev;    /* open addressing, slot+1 (0 = empty) */
    uint32_t nidx;          /* index slots: cap * 4 / 3 (load <= 0.75) */
};

static inline uint32_t mix32(uint64_t k, uint32_t n)
{
    k *= 0x9E3779B97F4A7C15ULL;
    k ^= k >> 29;
    return (uint32_t)(((k >> 32) * (uint64_t)n) >> 32);
}
static inline uint64_t rkey(const struct rec *r)
{
    return ((uint64_t)r->image << 40) | ((uint64_t)r->blk_hi << 32) | r->blk_lo;
}

static void tinit(struct table *t, uint32_t cap)
{
    t->cap = cap;
    t->nidx = (uint32_t)((uint64_t)cap * 4 / 3) + 1;
    t->recs = calloc(cap, sizeof(struct rec));
    t->fwd = calloc(t->nidx, 4);
    t->rev = calloc(t->nidx, 4);
    t->used = t->hand = 0;
}
static size_t tbytes(const struct table *t)
{
    return (size_t)t->cap * sizeof(struct rec) + 2ull * t->nidx * 4;
}

/* find slot in an index for key; returns index position */
static uint32_t ifind(const struct table *t, const uint32_t *idx, bool fwd,
                      uint64_t key)
{
    uint32_t i = mix32(key, t->nidx);
    for (;;) {
        uint32_t s = idx[i];
        if (!s) {
            return i;
        }
        const struct rec *r = &t->recs[s - 1];
        if ((fwd ? r->page : rkey(r)) == key) {
            return i;
        }
        if (++i == t->nidx) {
            i = 0;
        }
    }
}

/* backward-shift deletion for linear probing */
static void idel(struct table *t, uint32_t *idx, bool fwd, uint32_t i)
{
    uint32_t j = i;
    for (;;) {
        idx[i] = 0;
        for (;;) {
            if (++j == t->nidx) {
                j = 0;
            }
            if (!idx[j]) {
                return;
            }
            const struct rec *r = &t->recs[idx[j] - 1];
            uint32_t home = mix32(fwd ? r->page : rkey(r), t->nidx);
            /* can idx[j] move to i? yes if home is not in (i, j] cyclically */
            bool between = i <= j ? (home > i && home <= j)
                                  : (home > i || home <= j);
            if (!between) {
                break;
            }
        }
        idx[i] = idx[j];
        i = j;
    }
}

static void tremove(struct table *t, uint32_t slot)
{
    struct rec *r = &t->recs[slot];
    idel(t, t->fwd, true, ifind(t, t->fwd, true, r->page));
    idel(t, t->rev, false, ifind(t, t->rev, false, rkey(r)));
    r->flags = 0;
    t->used--;
}

static uint32_t tevict(struct table *t)
{
    for (;;) {
        uint32_t s = t->hand;
        if (++t->hand == t->cap) {
            t->hand = 0;
        }
        struct rec *r = &t->recs[s];
        if (!(r->flags & 1)) {
            return s;
        }
        if (r->flags & 2) {
            r->flags &= ~2u;
            continue;
        }
        tremove(t, s);
        return s;
    }
}

/* record: page now holds disk block blk of image img, content hash h */
static void tinsert(struct table *t, uint32_t page, uint8_t img, uint64_t blk,
                    uint64_t h)
{
    uint32_t fi = ifind(t, t->fwd, true, page);
    if (t->fwd[fi]) {                     /* page re-read: replace */
        tremove(t, t->fwd[fi] - 1);
    }
    struct rec probe = { .image = img, .blk_hi = blk >> 32,
                         .blk_lo = (uint32_t)blk };
    uint32_t ri = ifind(t, t->rev, false, rkey(&probe));
    if (t->rev[ri]) {                     /* block cached in another page */
        tremove(t, t->rev[ri] - 1);       /* keep one page per block */
    }
    uint32_t s = t->used < t->cap && !(t->recs[t->used].flags & 1)
                 ? t->used : tevict(t);
    struct rec *r = &t->recs[s];
    *r = (struct rec){ .hash = h, .page = page, .blk_lo = (uint32_t)blk,
                       .blk_hi = blk >> 32, .image = img, .flags = 3 };
    t->fwd[ifind(t, t->fwd, true, page)] = s + 1;
    t->rev[ifind(t, t->rev, false, rkey(r))] = s + 1;
    t->used++;
}

static const struct rec *tlookup(const struct table *t, uint32_t page)
{
    uint32_t s = t->fwd[ifind(t, t->fwd, true, page)];
    return s ? &t->recs[s - 1] : NULL;
}

static bool tinval_block(struct table *t, uint8_t img, uint64_t blk)
{
    struct rec probe = { .image = img, .blk_hi = blk >> 32,
                         .blk_lo = (uint32_t)blk };
    uint32_t ri = ifind(t, t->rev, false, rkey(&probe));
    if (!t->rev[ri]) {
        return false;
    }
    tremove(t, t->rev[ri] - 1);
    return true;
}

#define OPS 200000
#define REPS 5

int main(int argc, char **argv)
{
    int maxg = argc > 1 ? atoi(argv[1]) : 64;
    uint64_t sizes_mib[] = { 256, 1024, 4096, 16384, 65536 };
    printf("%9s %10s %9s %8s %9s %9s %9s %9s\n", "guest", "records",
           "table MiB", "B/rec", "insert", "hit", "miss", "inval");
    printf("%9s %10s %9s %8s %9s %9s %9s %9s\n", "", "", "", "", "ns", "ns",
           "ns", "ns");
    for (unsigned z = 0; z < 5; z++) {
        if (sizes_mib[z] > (uint64_t)maxg * 1024) {
            break;
        }
        uint32_t pages = sizes_mib[z] * 256;     /* 4 KiB pages */
        struct table t;
        tinit(&t, pages);
        uint64_t seed = 12345 + z;
        uint64_t disk_blocks = 4ull * pages;     /* disk 4x the RAM */
        /* fill: every guest page holds a distinct random disk block */
        for (uint32_t p = 0; p < pages; p++) {
            tinsert(&t, p, 0, rng_next(&seed) % disk_blocks, p);
        }
        double vi[REPS], vh[REPS], vm[REPS], vv[REPS];
        volatile uint64_t sink = 0;
        for (int r = 0; r < REPS; r++) {
            double t0 = cpu_ns();
            for (int i = 0; i < OPS; i++) {      /* full: each evicts */
                tinsert(&t, rng_next(&seed) % pages, 0,
                        rng_next(&seed) % disk_blocks, i);
            }
            double t1 = cpu_ns();
            for (int i = 0; i < OPS; i++) {
                const struct rec *x = tlookup(&t, rng_next(&seed) % pages);
                sink += x ? x->hash : 0;
            }
            double t2 = cpu_ns();
            for (int i = 0; i < OPS; i++) {      /* pages never recorded */
                const struct rec *x = tlookup(&t, pages + rng_next(&seed) % pages);
                sink += x ? 1 : 0;
            }
            double t3 = cpu_ns();
            for (int i = 0; i < OPS; i++) {
                sink += tinval_block(&t, 0, rng_next(&seed) % disk_blocks);
            }
            double t4 = cpu_ns();
            vi[r] = (t1 - t0) / OPS;
            vh[r] = (t2 - t1) / OPS;
            vm[r] = (t3 - t2) / OPS;
            vv[r] = (t4 - t3) / OPS;
        }
        printf("%7.2fG %10u %9.1f %8.1f %9.0f %9.0f %9.0f %9.0f\n",
               sizes_mib[z] / 1024.0, pages, tbytes(&t) / 1048576.0,
               (double)tbytes(&t) / pages, median(vi, REPS), median(vh, REPS),
               median(vm, REPS), median(vv, REPS));
        free(t.recs); free(t.fwd); free(t.rev);
    }
    return 0;
}
