/*
 * kvmx-testguest: command loop.  See README.md for the line protocol.
 *
 * Every command line gets exactly one reply line starting with "ok " or
 * "err "; empty lines are ignored.  Numbers are hexadecimal with a 0x
 * prefix, decimal without one.
 */
#include "guest.h"

#define LINE_LEN        128
#define MAX_ARGS        8
#define DEBUG_EXIT_PORT 0xf4    /* isa-debug-exit,iobase=0xf4,iosize=4 */
#define DEBUG_EXIT_DFLT 0x501   /* isa-debug-exit with default properties */

struct cpu_info cpu;

extern char __image_start[], __image_end[];

static uint64_t samples[MAX_SAMPLES];

static void cpu_probe(void)
{
    uint32_t r[4];

    cpu.phys_bits = 36;
    cpuid(0x80000000, 0, r);
    uint32_t max_ext = r[0];
    if (max_ext >= 0x80000001) {
        cpuid(0x80000001, 0, r);
        cpu.rdtscp = r[3] & (1u << 27);
        cpu.pdpe1gb = r[3] & (1u << 26);
    }
    if (max_ext >= 0x80000008) {
        cpuid(0x80000008, 0, r);
        cpu.phys_bits = r[0] & 0xff;
    }
    cpuid(1, 0, r);
    cpu.hypervisor = r[2] & (1u << 31);
    if (cpu.hypervisor) {
        cpuid(0x40000000, 0, r);
        memcpy(&cpu.hv_sig[0], &r[1], 4);
        memcpy(&cpu.hv_sig[4], &r[2], 4);
        memcpy(&cpu.hv_sig[8], &r[3], 4);
        for (int i = 0; i < 12; i++) {
            char c = cpu.hv_sig[i];
            cpu.hv_sig[i] = (c > ' ' && c < 0x7f) ? c : '_';
        }
    }
}

static bool streq(const char *a, const char *b)
{
    while (*a && *a == *b) {
        a++;
        b++;
    }
    return *a == *b;
}

/* "0x" prefix: hexadecimal; otherwise decimal.  Rejects overflow. */
static bool parse_u64(const char *s, uint64_t *out)
{
    unsigned base = 10;
    uint64_t v = 0;

    if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
        base = 16;
        s += 2;
    }
    if (!*s) {
        return false;
    }
    for (; *s; s++) {
        unsigned d;
        if (*s >= '0' && *s <= '9') {
            d = (unsigned)(*s - '0');
        } else if (base == 16 && *s >= 'a' && *s <= 'f') {
            d = (unsigned)(*s - 'a' + 10);
        } else if (base == 16 && *s >= 'A' && *s <= 'F') {
            d = (unsigned)(*s - 'A' + 10);
        } else {
            return false;
        }
        if (v > (UINT64_MAX - d) / base) {
            return false;
        }
        v = v * base + d;
    }
    *out = v;
    return true;
}

static void reply_err(const char *msg)
{
    serial_puts("err ");
    serial_puts(msg);
    serial_puts("\n");
}

static void reply_ok(const char *msg)
{
    serial_puts("ok ");
    serial_puts(msg);
    serial_puts("\n");
}

/* Parse "ADDR N", check ADDR is usable and map it.  NULL on success. */
static const char *target_args(int argc, char **argv, bool store,
                               volatile uint64_t **p, uint64_t *n)
{
    uint64_t addr;

    if (argc != 3) {
        return "usage: r|w|br|bw|tr|tw ADDR N";
    }
    if (!parse_u64(argv[1], &addr)) {
        return "bad address";
    }
    if (!parse_u64(argv[2], n)) {
        return "bad count";
    }
    if (addr & 7) {
        return "address not 8-byte aligned";
    }
    if (store && addr + 8 > (uintptr_t)__image_start &&
        addr < (uintptr_t)__image_end) {
        return "address inside the guest image";
    }
    const char *err = paging_map(addr);
    if (err) {
        return err;
    }
    *p = (volatile uint64_t *)(uintptr_t)addr;
    return NULL;
}

/*
 * r/w: N loads or stores.  br/bw: the same inside one TSC window, for the
 * mean cost per access without the per-sample cost of reading the TSC.
 */
static void cmd_rw(int argc, char **argv, bool store, bool batch)
{
    volatile uint64_t *p;
    uint64_t n, x = 0, t0 = 0, t1 = 0;
    const char *err = target_args(argc, argv, store, &p, &n);

    if (err) {
        reply_err(err);
        return;
    }
    if (batch) {
        t0 = tsc_open();
    }
    if (store) {
        /* Linux's nvdimm flush: writeq(1, flush_hint); wmb(); */
        for (uint64_t i = 0; i < n; i++) {
            *p = 1;
            __asm__ volatile("sfence" ::: "memory");
        }
    } else {
        for (uint64_t i = 0; i < n; i++) {
            x ^= *p;
        }
    }
    if (batch) {
        t1 = tsc_close(cpu.rdtscp);
        serial_puts(store ? "ok bw n=" : "ok br n=");
        serial_put_dec(n);
        serial_puts(" cycles=");
        serial_put_dec(t1 - t0);
        serial_puts(" avg=");
        serial_put_dec(n ? (t1 - t0) / n : 0);
        serial_puts("\n");
    } else if (store) {
        reply_ok("w");
    } else {
        serial_puts("ok r ");
        serial_put_hex(x);
        serial_puts("\n");
    }
}

/*
 * sr ADDR BYTES: one load per 4 KiB page of [ADDR, ADDR + BYTES) in one TSC
 * window, "ok sr n=PAGES cycles=C avg=A": a working set that a benchmark
 * keeps in use.  Each 2 MiB page is mapped on demand as it is reached.
 */
static void cmd_sweep(int argc, char **argv)
{
    uint64_t addr, bytes, x = 0, n = 0, t0, t1;

    if (argc != 3 || !parse_u64(argv[1], &addr) ||
        !parse_u64(argv[2], &bytes) || (addr & 4095) || !bytes ||
        bytes > (1ull << 30)) {
        reply_err("usage: sr ADDR BYTES (ADDR 4 KiB-aligned, BYTES 1..1 GiB)");
        return;
    }
    t0 = tsc_open();
    for (uint64_t a = addr; a < addr + bytes; a += 4096) {
        if (a == addr || !(a & ((2ull << 20) - 1))) {
            const char *err = paging_map(a);

            if (err) {
                reply_err(err);
                return;
            }
        }
        x ^= *(volatile uint64_t *)(uintptr_t)a;
        n++;
    }
    t1 = tsc_close(cpu.rdtscp);
    (void)x;
    serial_puts("ok sr n=");
    serial_put_dec(n);
    serial_puts(" cycles=");
    serial_put_dec(t1 - t0);
    serial_puts(" avg=");
    serial_put_dec((t1 - t0) / n);
    serial_puts("\n");
}

/*
 * fill ADDR BYTES SEED: every 8-byte word of [ADDR, ADDR + BYTES) gets
 * fill_word(its address, SEED), "ok fill n=PAGES"; check ADDR BYTES SEED
 * compares, "ok check n=PAGES bad=WORDS first=ADDRESS" (first is 0 when
 * nothing differs).  For migration tests: the destination must have the
 * memory the source had.
 */
static uint64_t fill_word(uint64_t a, uint64_t seed)
{
    return (a ^ seed) * 0x9E3779B97F4A7C15ull + (seed | 1);
}

static void cmd_fill(int argc, char **argv, bool check)
{
    uint64_t addr, bytes, seed, n = 0, bad = 0, first = 0;

    if (argc != 4 || !parse_u64(argv[1], &addr) ||
        !parse_u64(argv[2], &bytes) || !parse_u64(argv[3], &seed) ||
        (addr & 4095) || (bytes & 4095) || !bytes || bytes > (1ull << 30)) {
        reply_err("usage: fill|check ADDR BYTES SEED (4 KiB-aligned, "
                  "BYTES up to 1 GiB)");
        return;
    }
    if (addr + bytes > (uintptr_t)__image_start &&
        addr < (uintptr_t)__image_end + (1ull << 20)) {
        reply_err("range overlaps the guest image or its stack");
        return;
    }
    for (uint64_t a = addr; a < addr + bytes; a += 4096) {
        volatile uint64_t *w = (volatile uint64_t *)(uintptr_t)a;

        if (a == addr || !(a & ((2ull << 20) - 1))) {
            const char *err = paging_map(a);

            if (err) {
                reply_err(err);
                return;
            }
        }
        for (unsigned i = 0; i < 512; i++) {
            uint64_t want = fill_word(a + i * 8, seed);

            if (!check) {
                w[i] = want;
            } else if (w[i] != want) {
                if (!bad++) {
                    first = a + i * 8;
                }
            }
        }
        n++;
    }
    serial_puts(check ? "ok check n=" : "ok fill n=");
    serial_put_dec(n);
    if (check) {
        serial_puts(" bad=");
        serial_put_dec(bad);
        serial_puts(" first=");
        serial_put_hex(first);
    }
    serial_puts("\n");
}

/*
 * p ADDR SIZE VALUE: one store of SIZE (1, 2, 4, 8) bytes; k ADDR SIZE: one
 * load, "ok k VALUE".  For driving devices and filling memory with chosen
 * values (registers that take 4-byte accesses only, request structures).
 */
static const char *poke_args(int argc, char **argv, int want, bool store,
                             uintptr_t *addr, uint64_t *size, uint64_t *val)
{
    const char *err;

    if (argc != want) {
        return "usage: p ADDR SIZE VALUE | k ADDR SIZE";
    }
    if (!parse_u64(argv[1], (uint64_t *)addr) || !parse_u64(argv[2], size) ||
        (want == 4 && !parse_u64(argv[3], val))) {
        return "bad number";
    }
    if (*size != 1 && *size != 2 && *size != 4 && *size != 8) {
        return "size must be 1, 2, 4 or 8";
    }
    if (*addr & (*size - 1)) {
        return "address not aligned to size";
    }
    if (store && *addr + *size > (uintptr_t)__image_start &&
        *addr < (uintptr_t)__image_end) {
        return "address inside the guest image";
    }
    err = paging_map(*addr);
    return err;
}

static void cmd_poke(int argc, char **argv, bool store)
{
    uintptr_t a;
    uint64_t size, v = 0;
    const char *err = poke_args(argc, argv, store ? 4 : 3, store, &a, &size,
                                &v);

    if (err) {
        reply_err(err);
        return;
    }
    if (store) {
        switch (size) {
        case 1: *(volatile uint8_t *)a = (uint8_t)v; break;
        case 2: *(volatile uint16_t *)a = (uint16_t)v; break;
        case 4: *(volatile uint32_t *)a = (uint32_t)v; break;
        default: *(volatile uint64_t *)a = v; break;
        }
        reply_ok("p");
        return;
    }
    switch (size) {
    case 1: v = *(volatile uint8_t *)a; break;
    case 2: v = *(volatile uint16_t *)a; break;
    case 4: v = *(volatile uint32_t *)a; break;
    default: v = *(volatile uint64_t *)a; break;
    }
    serial_puts("ok k ");
    serial_put_hex(v);
    serial_puts("\n");
}

/* o PORT SIZE VALUE: outb/outw/outl, e.g. PCI configuration writes. */
static void cmd_out(int argc, char **argv)
{
    uint64_t port, size, v;

    if (argc != 4 || !parse_u64(argv[1], &port) || port > 0xffff ||
        !parse_u64(argv[2], &size) || !parse_u64(argv[3], &v)) {
        reply_err("usage: o PORT SIZE VALUE");
        return;
    }
    switch (size) {
    case 1: outb((uint16_t)port, (uint8_t)v); break;
    case 2: outw((uint16_t)port, (uint16_t)v); break;
    case 4: outl((uint16_t)port, (uint32_t)v); break;
    default: reply_err("size must be 1, 2 or 4"); return;
    }
    reply_ok("o");
}

/*
 * db BAR REQ LEN N: ring kvmx-chan's doorbell N times with the request of
 * LEN bytes at REQ, as the guest driver does (REQ_LO, REQ_HI, DOORBELL,
 * then read STATUS; the header's count, which the device overwrites, is
 * restored before each ring); db2 BAR REQ1 LEN1 REQ2 LEN2 N alternates two
 * requests
 * (e.g. PROTECT and UNPROTECT).  Replies "ok db ok=<statuses 0>
 * again=<statuses -EAGAIN> last=<last status, hex> cycles=<TSC>", db2 with
 * those fields for each request (ok1= again1= last1= ok2= ...).
 */
#define CHAN_REQ_LO   0x08
#define CHAN_REQ_HI   0x0c
#define CHAN_DOORBELL 0x10
#define CHAN_STATUS   0x14
#define CHAN_EAGAIN   ((uint32_t)-11)

/* The device writes the header's count back: restore it (as the driver
 * rebuilds its request) before each ring, only if it changed. */
static uint32_t chan_ring(uintptr_t bar, uint64_t req, uint32_t len,
                          uint32_t count)
{
    volatile uint32_t *cnt = (volatile uint32_t *)(uintptr_t)(req + 12);

    if (*cnt != count) {
        *cnt = count;
    }
    *(volatile uint32_t *)(bar + CHAN_REQ_LO) = (uint32_t)req;
    *(volatile uint32_t *)(bar + CHAN_REQ_HI) = (uint32_t)(req >> 32);
    *(volatile uint32_t *)(bar + CHAN_DOORBELL) = len;
    return *(volatile uint32_t *)(bar + CHAN_STATUS);
}

static void put_field(const char *name, uint64_t v, bool hex)
{
    serial_puts(" ");
    serial_puts(name);
    serial_puts("=");
    if (hex) {
        serial_put_hex(v);
    } else {
        serial_put_dec(v);
    }
}

static void cmd_doorbell(int argc, char **argv, bool two)
{
    uint64_t bar, req[2] = { 0, 0 }, len[2] = { 0, 0 }, n, t0, t1;
    uint64_t ok[2] = { 0, 0 }, again[2] = { 0, 0 };
    uint32_t last[2] = { 0, 0 }, count[2] = { 0, 0 };
    int k = two ? 2 : 1;
    const char *err;

    if (argc != (two ? 7 : 5) || !parse_u64(argv[1], &bar) ||
        !parse_u64(argv[2], &req[0]) || !parse_u64(argv[3], &len[0]) ||
        (two && (!parse_u64(argv[4], &req[1]) ||
                 !parse_u64(argv[5], &len[1]))) ||
        !parse_u64(argv[argc - 1], &n) || (bar & 0xfff) ||
        len[0] > UINT32_MAX || len[1] > UINT32_MAX) {
        reply_err("usage: db BAR REQ LEN N | db2 BAR REQ1 LEN1 REQ2 LEN2 N");
        return;
    }
    err = paging_map(bar);
    for (int j = 0; j < k && !err; j++) {
        err = paging_map(req[j]);
        if (!err && req[j] + 16 > (uintptr_t)__image_start &&
            req[j] < (uintptr_t)__image_end) {
            err = "request inside the guest image";
        }
        if (!err && (req[j] & 7)) {
            err = "request not 8-byte aligned";
        }
        if (!err) {
            count[j] = *(volatile uint32_t *)(uintptr_t)(req[j] + 12);
        }
    }
    if (err) {
        reply_err(err);
        return;
    }
    t0 = tsc_open();
    for (uint64_t i = 0; i < n; i++) {
        for (int j = 0; j < k; j++) {
            last[j] = chan_ring((uintptr_t)bar, req[j], (uint32_t)len[j],
                                count[j]);
            ok[j] += last[j] == 0;
            again[j] += last[j] == CHAN_EAGAIN;
        }
    }
    t1 = tsc_close(cpu.rdtscp);
    serial_puts(two ? "ok db2" : "ok db");
    for (int j = 0; j < k; j++) {
        static const char *const names[2][3] = {
            { "ok", "again", "last" }, { "ok2", "again2", "last2" } };
        static const char *const names1[3] = { "ok1", "again1", "last1" };
        const char *const *nm = !two ? names[0] : j ? names[1] : names1;

        put_field(nm[0], ok[j], false);
        put_field(nm[1], again[j], false);
        put_field(nm[2], last[j], true);
    }
    put_field("cycles", t1 - t0, false);
    serial_puts("\n");
}

/*
 * xsave ADDR: one XSAVE of the x87 and SSE state (XCR0 = 3) to ADDR
 * (64-byte aligned): a store KVM's instruction emulator cannot perform,
 * as Linux does when it builds a signal frame on a user's stack.  Turns
 * on CR4.OSXSAVE first.  "ok xsave", or "err no xsave".
 */
static void cmd_xsave(int argc, char **argv)
{
    uint64_t addr, cr4;
    uint32_t r[4];
    const char *err;

    if (argc != 2 || !parse_u64(argv[1], &addr) || (addr & 63)) {
        reply_err("usage: xsave ADDR (64-byte aligned)");
        return;
    }
    if (addr + 576 > (uintptr_t)__image_start &&
        addr < (uintptr_t)__image_end) {
        reply_err("address inside the guest image");
        return;
    }
    cpuid(1, 0, r);
    if (!(r[2] & (1u << 26))) {
        reply_err("no xsave");
        return;
    }
    err = paging_map(addr);
    if (err) {
        reply_err(err);
        return;
    }
    __asm__ volatile("mov %%cr4, %0" : "=r"(cr4));
    cr4 |= 1u << 18;                            /* OSXSAVE */
    __asm__ volatile("mov %0, %%cr4" : : "r"(cr4) : "memory");
    __asm__ volatile("xsetbv" : : "c"(0), "a"(3), "d"(0) : "memory");
    __asm__ volatile("xsave64 (%0)" : : "r"(addr), "a"(3), "d"(0)
                     : "memory");
    reply_ok("xsave");
}

enum timed_op { TIMED_NONE, TIMED_LOAD, TIMED_STORE };

/*
 * Time each access in its own TSC window.  TIMED_NONE times an empty
 * window: the fixed cost of the measurement itself, which is large when
 * the hypervisor traps or emulates RDTSC and the fences (PVM does).
 */
static void cmd_timed(int argc, char **argv, enum timed_op op)
{
    static const char *const reply[] = { "ok tn", "ok tr", "ok tw" };
    volatile uint64_t *p = NULL;
    uint64_t n;
    const char *err = NULL;
    const bool tscp = cpu.rdtscp;

    if (op == TIMED_NONE) {
        if (argc != 2 || !parse_u64(argv[1], &n)) {
            err = "usage: tn N";
        }
    } else {
        err = target_args(argc, argv, op == TIMED_STORE, &p, &n);
    }
    if (err) {
        reply_err(err);
        return;
    }
    if (n < 1 || n > MAX_SAMPLES) {
        reply_err("count must be 1..65536");
        return;
    }
    for (uint32_t i = 0; i < n; i++) {
        uint64_t t0 = tsc_open();
        if (op == TIMED_STORE) {
            *p = 1;
            __asm__ volatile("sfence" ::: "memory");
        } else if (op == TIMED_LOAD) {
            (void)*p;
        }
        samples[i] = tsc_close(tscp) - t0;
    }
    serial_puts(reply[op]);
    stats_print(samples, (uint32_t)n);
    serial_puts("\n");
}

static void cmd_tsc(int argc, char **argv)
{
    const char *src, *err;
    bool force_pit = false;

    if (argc == 2 && streq(argv[1], "pit")) {
        force_pit = true;
    } else if (argc != 1) {
        reply_err("usage: tsc [pit]");
        return;
    }
    uint64_t khz = tsc_khz(force_pit, &src, &err);
    if (!khz) {
        reply_err(err ? err : "TSC frequency unknown");
        return;
    }
    serial_puts("ok tsc khz=");
    serial_put_dec(khz);
    serial_puts(" src=");
    serial_puts(src);
    serial_puts("\n");
}

static void cmd_info(void)
{
    serial_puts("ok info physbits=");
    serial_put_dec(cpu.phys_bits);
    serial_puts(cpu.rdtscp ? " rdtscp=1" : " rdtscp=0");
    serial_puts(cpu.pdpe1gb ? " pdpe1gb=1" : " pdpe1gb=0");
    serial_puts(" hv=");
    serial_puts(cpu.hypervisor ? cpu.hv_sig : "none");
    serial_puts("\n");
}

static void cmd_quit(int argc, char **argv)
{
    uint64_t code;

    if (argc != 2 || !parse_u64(argv[1], &code) || code > UINT32_MAX) {
        reply_err("usage: q CODE");
        return;
    }
    reply_ok("q");
    serial_drain();
    outl(DEBUG_EXIT_PORT, (uint32_t)code);
    /* Still here: try the device's default port, then give up. */
    outw(DEBUG_EXIT_DFLT, (uint16_t)code);
    halt_forever();
}

static void dispatch(int argc, char **argv)
{
    const char *c = argv[0];

    if (streq(c, "ping") && argc == 1) {
        reply_ok("pong");
    } else if (streq(c, "info") && argc == 1) {
        cmd_info();
    } else if (streq(c, "echo") && argc == 2) {
        /* Lets the host resynchronise: "ok echo TOKEN" marks a point. */
        serial_puts("ok echo ");
        serial_puts(argv[1]);
        serial_puts("\n");
    } else if (streq(c, "r")) {
        cmd_rw(argc, argv, false, false);
    } else if (streq(c, "w")) {
        cmd_rw(argc, argv, true, false);
    } else if (streq(c, "br")) {
        cmd_rw(argc, argv, false, true);
    } else if (streq(c, "bw")) {
        cmd_rw(argc, argv, true, true);
    } else if (streq(c, "sr")) {
        cmd_sweep(argc, argv);
    } else if (streq(c, "fill")) {
        cmd_fill(argc, argv, false);
    } else if (streq(c, "check")) {
        cmd_fill(argc, argv, true);
    } else if (streq(c, "tr")) {
        cmd_timed(argc, argv, TIMED_LOAD);
    } else if (streq(c, "tw")) {
        cmd_timed(argc, argv, TIMED_STORE);
    } else if (streq(c, "tn")) {
        cmd_timed(argc, argv, TIMED_NONE);
    } else if (streq(c, "p")) {
        cmd_poke(argc, argv, true);
    } else if (streq(c, "k")) {
        cmd_poke(argc, argv, false);
    } else if (streq(c, "o")) {
        cmd_out(argc, argv);
    } else if (streq(c, "db")) {
        cmd_doorbell(argc, argv, false);
    } else if (streq(c, "db2")) {
        cmd_doorbell(argc, argv, true);
    } else if (streq(c, "xsave")) {
        cmd_xsave(argc, argv);
    } else if (streq(c, "tsc")) {
        cmd_tsc(argc, argv);
    } else if (streq(c, "q")) {
        cmd_quit(argc, argv);
    } else if (streq(c, "ud2") && argc == 1) {
        __asm__ volatile("ud2");        /* exercises the exception path */
    } else {
        reply_err("unknown command");
    }
}

/* Split line in place at blanks; returns argc or -1 if too many. */
static int tokenize(char *line, char **argv)
{
    int argc = 0;

    for (char *s = line; *s;) {
        while (*s == ' ' || *s == '\t') {
            *s++ = '\0';
        }
        if (!*s) {
            break;
        }
        if (argc == MAX_ARGS) {
            return -1;
        }
        argv[argc++] = s;
        while (*s && *s != ' ' && *s != '\t') {
            s++;
        }
    }
    return argc;
}

void kmain(void);

void kmain(void)
{
    static char line[LINE_LEN];
    char *argv[MAX_ARGS];

    serial_init();
    trap_init();
    cpu_probe();
    /* SeaBIOS leaves "Booting from ROM.." without a newline. */
    serial_puts("\nkvmx-testguest ready\n");

    for (;;) {
        size_t len = 0;
        bool too_long = false, bad_char = false;
        int c;

        while ((c = serial_getc()) != '\n' && c != '\r') {
            if (c < ' ' ? c != '\t' : c > '~') {
                bad_char = true;
            } else if (len == LINE_LEN - 1) {
                too_long = true;
            } else {
                line[len++] = (char)c;
            }
        }
        line[len] = '\0';
        if (too_long) {
            reply_err("line too long");
            continue;
        }
        if (bad_char) {
            reply_err("bad character");
            continue;
        }
        int argc = tokenize(line, argv);
        if (argc < 0) {
            reply_err("too many arguments");
        } else if (argc > 0) {
            dispatch(argc, argv);
        }
    }
}
