/*
 * kvmx-testguest: on-demand identity mapping above 4 GiB.
 *
 * boot.S identity maps 0..4 GiB with 2 MiB pages (PML4[0] -> PDPT0[0..3]).
 * Anything higher is mapped here, one 2 MiB write-back page at a time, with
 * page-table pages taken from a small static pool.  When the pool runs dry
 * every on-demand mapping is dropped and the pool starts over; a command
 * only ever needs one page mapped, so this cannot fail for lack of tables.
 */
#include "guest.h"

#define PTE_P           0x001ull
#define PTE_W           0x002ull
#define PTE_PS          0x080ull
#define PTE_ADDR        0x000ffffffffff000ull
#define PAGE_2M         (1ull << 21)
#define LOW_MAPPED      (4ull << 30)    /* mapped by boot.S */
#define POOL_PAGES      32

extern uint64_t boot_pml4[512];
extern uint64_t boot_pdpt0[512];

static uint64_t pool[POOL_PAGES][512] __attribute__((aligned(4096)));
static unsigned pool_used;

static inline void invlpg(uint64_t va)
{
    __asm__ volatile("invlpg (%0)" : : "r"(va) : "memory");
}

static inline void flush_tlb_all(void)
{
    uint64_t cr3;
    __asm__ volatile("mov %%cr3, %0; mov %0, %%cr3" : "=r"(cr3) : : "memory");
}

static uint64_t *table_alloc(void)
{
    if (pool_used == POOL_PAGES) {
        return NULL;
    }
    uint64_t *t = pool[pool_used++];
    memset(t, 0, 4096);
    return t;
}

/* Drop every mapping paging_map() made; the boot mapping stays. */
static void pool_reset(void)
{
    for (unsigned i = 1; i < 512; i++) {
        boot_pml4[i] = 0;
    }
    for (unsigned i = 4; i < 512; i++) {
        boot_pdpt0[i] = 0;
    }
    pool_used = 0;
    flush_tlb_all();
}

/* Look up (or create) the next-level table behind entry *e. */
static uint64_t *next_table(uint64_t *e)
{
    if (!(*e & PTE_P)) {
        uint64_t *t = table_alloc();
        if (!t) {
            return NULL;
        }
        *e = (uint64_t)(uintptr_t)t | PTE_P | PTE_W;
    }
    /* Table pages live in identity-mapped low memory. */
    return (uint64_t *)(uintptr_t)(*e & PTE_ADDR);
}

static bool map_2m(uint64_t page)
{
    uint64_t *pdpt = next_table(&boot_pml4[(page >> 39) & 511]);
    if (!pdpt) {
        return false;
    }
    uint64_t *pd = next_table(&pdpt[(page >> 30) & 511]);
    if (!pd) {
        return false;
    }
    /* PAT/PCD/PWT all clear: write-back; the MTRRs may still override. */
    pd[(page >> 21) & 511] = page | PTE_P | PTE_W | PTE_PS;
    invlpg(page);
    return true;
}

const char *paging_map(uint64_t addr)
{
    unsigned max_bits = cpu.phys_bits;

    /*
     * Identity mapping needs a canonical virtual address too; with 4-level
     * paging that is below 2^47 (128 TiB).
     */
    if (max_bits > 47) {
        max_bits = 47;
    }
    if (addr >> max_bits) {
        return "address beyond physical address width";
    }
    if (addr < LOW_MAPPED) {
        return NULL;
    }
    uint64_t page = addr & ~(PAGE_2M - 1);
    if (!map_2m(page)) {
        pool_reset();
        if (!map_2m(page)) {
            return "cannot allocate page tables";
        }
    }
    return NULL;
}
