/*
 * kvmx-testguest: TSC frequency and latency statistics.
 */
#include "guest.h"

#define PIT_HZ          1193182ull
#define PIT_CH2         0x42
#define PIT_CMD         0x43
#define PORT_61         0x61    /* bit 0: ch2 gate, bit 1: speaker, bit 5: OUT2 */
#define CALIB_MS        50
#define CALIB_LATCH     ((PIT_HZ * CALIB_MS + 500) / 1000)
#define CALIB_MAX_POLLS 5000000u
#define CALIB_RUNS      8

/* Hypervisor timing leaf (VMware convention, also offered by QEMU/KVM). */
static uint64_t tsc_khz_hv_leaf(void)
{
    uint32_t r[4];

    if (!cpu.hypervisor) {
        return 0;
    }
    cpuid(0x40000000, 0, r);
    if (r[0] < 0x40000010) {
        return 0;
    }
    cpuid(0x40000010, 0, r);
    return r[0];
}

/* CPUID 0x15: TSC = crystal * EBX / EAX. */
static uint64_t tsc_khz_leaf15(void)
{
    uint32_t r[4];

    cpuid(0, 0, r);
    if (r[0] < 0x15) {
        return 0;
    }
    cpuid(0x15, 0, r);
    if (!r[0] || !r[1] || !r[2]) {
        return 0;
    }
    return (uint64_t)r[2] * r[1] / r[0] / 1000;
}

/*
 * One calibration run: count TSC ticks while PIT channel 2 counts
 * CALIB_LATCH input clocks in mode 0 (OUT2, port 0x61 bit 5, goes high at
 * terminal count).  Both ends are bracketed by TSC reads, so a run that
 * the host preempted at the wrong moment shows up as a large *err.
 */
static uint64_t pit_run(uint64_t *err_ticks, const char **err)
{
    uint8_t p61 = inb(PORT_61);
    uint64_t s0, s1, low_at, a, b;
    uint32_t polls = 0;
    bool high;

    outb(PORT_61, (uint8_t)((p61 & ~0x02) | 0x01));    /* gate on, speaker off */
    outb(PIT_CMD, 0xb0);            /* ch2, lo/hi byte, mode 0, binary */
    outb(PIT_CH2, CALIB_LATCH & 0xff);
    s0 = tsc_open();
    outb(PIT_CH2, CALIB_LATCH >> 8);  /* counting starts here */
    s1 = tsc_open();

    low_at = s1;                    /* OUT2 was low at or after this */
    do {
        a = tsc_open();
        high = inb(PORT_61) & 0x20;
        b = tsc_open();
        if (!high) {
            low_at = a;
        }
    } while (!high && ++polls < CALIB_MAX_POLLS);
    outb(PORT_61, p61);

    if (!high) {
        *err = "PIT channel 2 never reached terminal count";
        return 0;
    }
    if (polls == 0) {
        *err = "PIT channel 2 output already high";
        return 0;
    }
    /* start in [s0, s1], end in [low_at, b]: take the midpoints */
    *err_ticks = (s1 - s0) / 2 + (b - low_at) / 2;
    return (low_at + b) / 2 - (s0 + s1) / 2;
}

/* Best of up to CALIB_RUNS runs; stop early once one is within 0.05%. */
static uint64_t tsc_khz_pit(const char **err)
{
    uint64_t best = 0, best_err = UINT64_MAX;

    for (unsigned i = 0; i < CALIB_RUNS; i++) {
        uint64_t e, ticks = pit_run(&e, err);
        if (!ticks) {
            return 0;
        }
        if (e < best_err) {
            best = ticks;
            best_err = e;
        }
        if (best_err < best / 2000) {
            break;
        }
    }
    /* kHz = ticks / (latch / PIT_HZ) / 1000 */
    return best * PIT_HZ / (CALIB_LATCH * 1000ull);
}

uint64_t tsc_khz(bool force_pit, const char **src, const char **err)
{
    uint64_t khz = 0;

    *err = NULL;
    if (!force_pit) {
        khz = tsc_khz_hv_leaf();
        if (!khz) {
            khz = tsc_khz_leaf15();
        }
        if (khz) {
            *src = "cpuid";
            return khz;
        }
    }
    *src = "pit";
    return tsc_khz_pit(err);
}

/* In-place heapsort: O(n log n) and no extra memory. */
static void sift_down(uint64_t *a, uint32_t root, uint32_t n)
{
    for (;;) {
        uint32_t child = 2 * root + 1;
        if (child >= n) {
            return;
        }
        if (child + 1 < n && a[child + 1] > a[child]) {
            child++;
        }
        if (a[root] >= a[child]) {
            return;
        }
        uint64_t t = a[root];
        a[root] = a[child];
        a[child] = t;
        root = child;
    }
}

static void sort_u64(uint64_t *a, uint32_t n)
{
    for (uint32_t i = n / 2; i-- > 0;) {
        sift_down(a, i, n);
    }
    for (uint32_t end = n; end-- > 1;) {
        uint64_t t = a[0];
        a[0] = a[end];
        a[end] = t;
        sift_down(a, 0, end);
    }
}

/* Nearest-rank percentile of sorted a[0..n): a[ceil(p/100 * n) - 1]. */
static uint64_t percentile(const uint64_t *a, uint32_t n, uint32_t p)
{
    uint64_t rank = ((uint64_t)p * n + 99) / 100;
    return a[rank ? rank - 1 : 0];
}

void stats_print(uint64_t *samples, uint32_t n)
{
    static const struct { const char *name; uint32_t p; } pct[] = {
        { " p50=", 50 }, { " p90=", 90 }, { " p99=", 99 },
    };
    uint64_t sum = 0;

    sort_u64(samples, n);
    for (uint32_t i = 0; i < n; i++) {
        sum += samples[i];
    }
    serial_puts(" n=");
    serial_put_dec(n);
    serial_puts(" min=");
    serial_put_dec(samples[0]);
    for (unsigned i = 0; i < sizeof(pct) / sizeof(pct[0]); i++) {
        serial_puts(pct[i].name);
        serial_put_dec(percentile(samples, n, pct[i].p));
    }
    serial_puts(" max=");
    serial_put_dec(samples[n - 1]);
    serial_puts(" avg=");
    serial_put_dec(sum / n);
}
