/*
 * kvmx-testguest: shared declarations and small CPU helpers.
 *
 * Freestanding C11: only the compiler's own headers are used.
 */
#ifndef KVMX_TESTGUEST_GUEST_H
#define KVMX_TESTGUEST_GUEST_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define MAX_SAMPLES     65536u          /* per tr/tw command */

/* ---- port I/O and CPU instructions -------------------------------- */

static inline void outb(uint16_t port, uint8_t v)
{
    __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port));
}

static inline void outw(uint16_t port, uint16_t v)
{
    __asm__ volatile("outw %0, %1" : : "a"(v), "Nd"(port));
}

static inline void outl(uint16_t port, uint32_t v)
{
    __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port));
}

static inline uint8_t inb(uint16_t port)
{
    uint8_t v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}

static inline void cpuid(uint32_t leaf, uint32_t sub, uint32_t r[4])
{
    __asm__ volatile("cpuid"
                     : "=a"(r[0]), "=b"(r[1]), "=c"(r[2]), "=d"(r[3])
                     : "a"(leaf), "c"(sub));
}

static inline void cpu_relax(void)
{
    __asm__ volatile("pause" ::: "memory");
}

static inline _Noreturn void halt_forever(void)
{
    for (;;) {
        __asm__ volatile("cli; hlt" ::: "memory");
    }
}

/* TSC read that waits for earlier instructions; used to open a window. */
static inline uint64_t tsc_open(void)
{
    uint32_t lo, hi;
    __asm__ volatile("lfence; rdtsc; lfence" : "=a"(lo), "=d"(hi) : : "memory");
    return ((uint64_t)hi << 32) | lo;
}

/* TSC read that waits for the measured instructions to complete. */
static inline uint64_t tsc_close(bool have_rdtscp)
{
    uint32_t lo, hi;
    if (have_rdtscp) {
        __asm__ volatile("rdtscp; lfence"
                         : "=a"(lo), "=d"(hi) : : "rcx", "memory");
    } else {
        __asm__ volatile("lfence; rdtsc; lfence"
                         : "=a"(lo), "=d"(hi) : : "memory");
    }
    return ((uint64_t)hi << 32) | lo;
}

/* ---- cpu features probed at boot (main.c) ------------------------- */

struct cpu_info {
    unsigned phys_bits;     /* CPUID 0x80000008 EAX[7:0], 36 if absent */
    bool rdtscp;            /* CPUID 0x80000001 EDX bit 27 */
    bool pdpe1gb;           /* 1 GiB pages, reported only */
    bool hypervisor;        /* CPUID 1 ECX bit 31 */
    char hv_sig[13];        /* CPUID 0x40000000 vendor string */
};
extern struct cpu_info cpu;

/* ---- libc-ish helpers (serial.c) ---------------------------------- */

void *memset(void *dst, int c, size_t n);
void *memcpy(void *dst, const void *src, size_t n);

/* ---- serial console (serial.c) ------------------------------------ */

void serial_init(void);
int serial_getc(void);              /* blocking */
void serial_putc(char c);
void serial_puts(const char *s);
void serial_put_dec(uint64_t v);
void serial_put_hex(uint64_t v);    /* with 0x prefix, lower case */
void serial_drain(void);            /* wait until the transmitter is empty */

/* ---- traps (trap.c) ------------------------------------------------ */

void trap_init(void);

/* ---- paging (paging.c) --------------------------------------------- */

/*
 * Make sure the 2 MiB page holding guest-physical address addr is
 * identity mapped.  Returns NULL on success or an error phrase.
 */
const char *paging_map(uint64_t addr);

/* ---- timing (timing.c) --------------------------------------------- */

/* TSC frequency in kHz; *src is "cpuid" or "pit"; 0 if unknown. */
uint64_t tsc_khz(bool force_pit, const char **src, const char **err);

/* Sort samples[0..n) in place and print " n=.. min=.. p50=.. ...". */
void stats_print(uint64_t *samples, uint32_t n);

#endif /* KVMX_TESTGUEST_GUEST_H */
