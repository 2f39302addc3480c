/*
 * Hash throughput on 4 KiB pages: the per-page cost of the content hash a
 * disk-dedup record carries (hashed once at read completion, once more
 * when the page is sent, once on the destination after its disk read).
 *
 * Build: cc -O2 -mavx2 -msse4.2 -o hash hash.c -lz -lcrypto
 * Run:   ./hash [reps]
 * Times are the thread's CPU time (the machine is shared with builds).
 * Prints ns per 4 KiB page and GB/s per algorithm, the median of reps runs,
 * twice: "cold" walks a 64 MiB buffer (larger than this machine's caches,
 * like guest pages the migration thread has not touched), "hot" hashes
 * the same 64 pages (256 KiB) again and again (a page just filled by a
 * disk read and still in cache).
 */
#define XXH_INLINE_ALL
#include <xxhash.h>
#include <zlib.h>
#include <nmmintrin.h>
#include <openssl/evp.h>
#include <stdio.h>
#include "common.h"

#define PAGE 4096
#define BUF (64u << 20)

static uint8_t *buf;
static volatile uint64_t sink;

static uint64_t h_xxh3_64(const void *p) { return XXH3_64bits(p, PAGE); }
static uint64_t h_xxh3_64s(const void *p) { return XXH3_64bits_withSeed(p, PAGE, 0x9e3779b97f4a7c15ULL); }
static uint64_t h_xxh128(const void *p) { XXH128_hash_t h = XXH3_128bits(p, PAGE); return h.low64 ^ h.high64; }
static uint64_t h_xxh64(const void *p) { return XXH64(p, PAGE, 0); }
static uint64_t h_crc32_zlib(const void *p) { return crc32(0, p, PAGE); }
static uint64_t h_crc32c(const void *p)
{
    const uint64_t *q = p;
    uint64_t c = ~0ULL;
    for (int i = 0; i < PAGE / 8; i++) {
        c = _mm_crc32_u64(c, q[i]);
    }
    return c;
}
static EVP_MD_CTX *mdctx;
static EVP_MD *md_sha256, *md_blake2;
static uint64_t h_evp(const void *p, const EVP_MD *md)
{
    unsigned char out[64];
    unsigned int n;
    EVP_Digest(p, PAGE, out, &n, md, NULL);
    uint64_t r;
    memcpy(&r, out, 8);
    return r;
}
static uint64_t h_sha256(const void *p) { return h_evp(p, md_sha256); }
static uint64_t h_blake2s(const void *p) { return h_evp(p, md_blake2); }
/* a filter, not a proof: 8 cache lines at a 512-byte stride */
static uint64_t h_sample8(const void *p)
{
    uint8_t tmp[512];
    for (int i = 0; i < 8; i++) {
        memcpy(tmp + 64 * i, (const uint8_t *)p + 512 * i + (i & 1) * 448, 64);
    }
    return XXH3_64bits(tmp, sizeof(tmp));
}
static uint64_t h_memcpy(const void *p)
{
    static uint8_t dst[PAGE];
    memcpy(dst, p, PAGE);
    return dst[17];
}

struct algo { const char *name; uint64_t (*fn)(const void *); };

int main(int argc, char **argv)
{
    int reps = argc > 1 ? atoi(argv[1]) : 7;
    struct algo algos[] = {
        { "memcpy 4 KiB (reference)", h_memcpy },
        { "xxh3-64", h_xxh3_64 },
        { "xxh3-64 seeded", h_xxh3_64s },
        { "xxh3-128", h_xxh128 },
        { "xxh64", h_xxh64 },
        { "xxh3-64 of 8 sampled lines", h_sample8 },
        { "crc32c (sse4.2, 1 stream)", h_crc32c },
        { "crc32 (zlib)", h_crc32_zlib },
        { "sha256 (openssl)", h_sha256 },
        { "blake2s-256 (openssl)", h_blake2s },
    };
    buf = aligned_alloc(PAGE, BUF);
    uint64_t s = 88172645463325252ULL;
    for (size_t i = 0; i < BUF / 8; i++) {
        ((uint64_t *)buf)[i] = rng_next(&s);
    }
    mdctx = EVP_MD_CTX_new();
    md_sha256 = EVP_MD_fetch(NULL, "SHA256", NULL); /* fetched once: an implicit fetch per page doubles the cost */
    md_blake2 = EVP_MD_fetch(NULL, "BLAKE2S-256", NULL);

    printf("%-28s %12s %8s %12s %8s\n", "algorithm", "cold ns/page", "GB/s",
           "hot ns/page", "GB/s");
    for (size_t a = 0; a < sizeof(algos) / sizeof(algos[0]); a++) {
        double res[2];
        for (int mode = 0; mode < 2; mode++) {
            double v[64];
            unsigned npages = BUF / PAGE;          /* 16384 per run */
            unsigned mask = mode ? 63 : npages - 1;
            for (int r = 0; r < reps && r < 64; r++) {
                double t0 = cpu_ns();
                uint64_t acc = 0;
                for (unsigned i = 0; i < npages; i++) {
                    acc += algos[a].fn(buf + (size_t)(i & mask) * PAGE);
                }
                double t1 = cpu_ns();
                sink = acc;
                v[r] = (t1 - t0) / npages;
            }
            res[mode] = median(v, reps < 64 ? reps : 64);
        }
        printf("%-28s %12.1f %8.2f %12.1f %8.2f\n", algos[a].name,
               res[0], PAGE / res[0], res[1], PAGE / res[1]);
    }
    return 0;
}
