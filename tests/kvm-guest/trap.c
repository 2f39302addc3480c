/*
 * kvmx-testguest: a minimal IDT for the 32 CPU exception vectors.  Any
 * exception is reported on the serial line as
 *     err exception <vector> rip=0x.. cr2=0x.. code=0x..
 * and the guest halts (interrupts stay off, so it never wakes up).
 */
#include "guest.h"

#define SEL_CODE64      0x08
#define GATE_INTR64     0x8e    /* present, DPL 0, 64-bit interrupt gate */

struct idt_gate {
    uint16_t off_lo;
    uint16_t selector;
    uint8_t ist;
    uint8_t type;
    uint16_t off_mid;
    uint32_t off_hi;
    uint32_t reserved;
} __attribute__((packed));
_Static_assert(sizeof(struct idt_gate) == 16, "IDT gate is 16 bytes");

struct idt_desc {
    uint16_t limit;
    uint64_t base;
} __attribute__((packed));

/* Pushed by isr_common in boot.S, then by the CPU. */
struct trap_frame {
    uint64_t vector;
    uint64_t error;
    uint64_t rip;
    uint64_t cs;
    uint64_t rflags;
    uint64_t rsp;
    uint64_t ss;
};

extern const uint64_t isr_table[32];
static struct idt_gate idt[32] __attribute__((aligned(16)));

_Noreturn void trap_handler(const struct trap_frame *f);

void trap_init(void)
{
    for (unsigned i = 0; i < 32; i++) {
        uint64_t off = isr_table[i];
        idt[i] = (struct idt_gate){
            .off_lo = (uint16_t)off,
            .selector = SEL_CODE64,
            .type = GATE_INTR64,
            .off_mid = (uint16_t)(off >> 16),
            .off_hi = (uint32_t)(off >> 32),
        };
    }
    struct idt_desc d = { sizeof(idt) - 1, (uint64_t)(uintptr_t)idt };
    __asm__ volatile("lidt %0" : : "m"(d));
}

_Noreturn void trap_handler(const struct trap_frame *f)
{
    static bool in_trap;
    uint64_t cr2;

    if (in_trap) {
        /* Faulted while reporting a fault: nothing sane left to do. */
        halt_forever();
    }
    in_trap = true;
    __asm__ volatile("mov %%cr2, %0" : "=r"(cr2));

    /* Start on a fresh line in case a reply was half written. */
    serial_puts("\nerr exception ");
    serial_put_dec(f->vector);
    serial_puts(" rip=");
    serial_put_hex(f->rip);
    serial_puts(" cr2=");
    serial_put_hex(cr2);
    serial_puts(" code=");
    serial_put_hex(f->error);
    serial_puts("\n");
    serial_drain();
    halt_forever();
}
