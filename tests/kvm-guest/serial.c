/*
 * kvmx-testguest: polled 16550 UART on COM1 (115200 8N1, no interrupts),
 * plus the two memory helpers the compiler may call in freestanding code.
 */
#include "guest.h"

#define COM1            0x3f8
#define UART_DATA       0       /* RBR / THR, DLL when DLAB=1 */
#define UART_IER        1       /* DLM when DLAB=1 */
#define UART_FCR        2
#define UART_LCR        3
#define UART_MCR        4
#define UART_LSR        5
#define LSR_DR          0x01    /* receive data ready */
#define LSR_THRE        0x20    /* transmit holding register empty */
#define LSR_TEMT        0x40    /* transmitter completely empty */

/*
 * TSC cycles to wait between two LSR polls while waiting for input (about
 * 10-25 us at 2-5 GHz).  Every LSR read is a port-I/O exit handled by QEMU
 * under its big lock; spacing them out keeps an idle guest from burning a
 * host core on exits and keeps the "exits" statistic readable.
 */
#define POLL_BACKOFF_CYCLES 50000

void *memset(void *dst, int c, size_t n)
{
    void *d = dst;
    __asm__ volatile("rep stosb" : "+D"(d), "+c"(n) : "a"(c) : "memory");
    return dst;
}

void *memcpy(void *dst, const void *src, size_t n)
{
    void *d = dst;
    __asm__ volatile("rep movsb" : "+D"(d), "+S"(src), "+c"(n) : : "memory");
    return dst;
}

void serial_init(void)
{
    outb(COM1 + UART_IER, 0x00);        /* no interrupts */
    outb(COM1 + UART_LCR, 0x80);        /* DLAB on */
    outb(COM1 + UART_DATA, 0x01);       /* divisor 1 = 115200 baud */
    outb(COM1 + UART_IER, 0x00);
    outb(COM1 + UART_LCR, 0x03);        /* 8N1, DLAB off */
    outb(COM1 + UART_FCR, 0xc7);        /* enable + clear FIFOs */
    outb(COM1 + UART_MCR, 0x03);        /* DTR, RTS; OUT2 off (no IRQ) */

    /*
     * If the host sent bytes before this point, QEMU's UART may have been
     * full and its chardev stopped reading the socket; resetting the FIFO
     * above does not restart it, only a receive-buffer read does.  Without
     * this dummy read such a guest never sees input again.
     */
    (void)inb(COM1 + UART_DATA);
}

int serial_getc(void)
{
    while (!(inb(COM1 + UART_LSR) & LSR_DR)) {
        uint64_t t0 = tsc_open();
        while (tsc_open() - t0 < POLL_BACKOFF_CYCLES) {
            cpu_relax();
        }
    }
    return inb(COM1 + UART_DATA);
}

void serial_putc(char c)
{
    while (!(inb(COM1 + UART_LSR) & LSR_THRE)) {
        cpu_relax();
    }
    outb(COM1 + UART_DATA, (uint8_t)c);
}

void serial_puts(const char *s)
{
    for (; *s; s++) {
        if (*s == '\n') {
            serial_putc('\r');
        }
        serial_putc(*s);
    }
}

void serial_put_dec(uint64_t v)
{
    char buf[21];
    int i = sizeof(buf) - 1;

    buf[i] = '\0';
    do {
        buf[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    serial_puts(&buf[i]);
}

void serial_put_hex(uint64_t v)
{
    static const char digits[] = "0123456789abcdef";
    char buf[19];
    int i = sizeof(buf) - 1;

    buf[i] = '\0';
    do {
        buf[--i] = digits[v & 0xf];
        v >>= 4;
    } while (v);
    buf[--i] = 'x';
    buf[--i] = '0';
    serial_puts(&buf[i]);
}

void serial_drain(void)
{
    while (!(inb(COM1 + UART_LSR) & LSR_TEMT)) {
        cpu_relax();
    }
}
