/*
 * kvmx-testguest boot code: multiboot (v1) entry in 32-bit protected mode,
 * identity-map the first 4 GiB with 2 MiB pages, switch to long mode and
 * call kmain().  Also holds the exception entry stubs used by trap.c.
 *
 * The image is linked as x86-64 and converted to ELF32 with objcopy, since
 * QEMU's multiboot loader refuses ELF64 files; all addresses are below
 * 4 GiB, so nothing is lost in the conversion.
 */

#define MB_MAGIC        0x1BADB002
#define MB_FLAGS        0x00000000      /* ELF layout, no extra requests */

#define CR0_PE          (1 << 0)
#define CR0_NW          (1 << 29)
#define CR0_CD          (1 << 30)
#define CR0_PG          (1 << 31)
#define CR4_PAE         (1 << 5)
#define MSR_EFER        0xC0000080
#define EFER_LME        (1 << 8)

#define PTE_P           0x001
#define PTE_W           0x002
#define PTE_PS          0x080           /* 2 MiB page in a PD entry */

#define SEL_CODE64      0x08
#define SEL_DATA        0x10

#define COM1            0x3f8

        .section .multiboot, "a"
        .balign 4
        .long   MB_MAGIC
        .long   MB_FLAGS
        .long   -(MB_MAGIC + MB_FLAGS)

/* ------------------------------------------------------------------ */
        .section .text.boot, "ax"
        .code32
        .globl  _start
_start:
        cli
        cld
        movl    %eax, boot_mb_magic     /* .data: survives the bss clear */
        movl    %ebx, boot_mb_info

        /* Clear .bss (page tables, stack, sample buffer live there). */
        movl    $__bss_start, %edi
        movl    $__bss_end, %ecx
        subl    %edi, %ecx
        shrl    $2, %ecx
        xorl    %eax, %eax
        rep stosl
        movl    $boot_stack_top, %esp

        /* Long mode available?  CPUID 0x80000001 EDX bit 29. */
        movl    $0x80000000, %eax
        cpuid
        cmpl    $0x80000001, %eax
        jb      no_long_mode
        movl    $0x80000001, %eax
        cpuid
        btl     $29, %edx
        jnc     no_long_mode

        /* PML4[0] -> PDPT0; PDPT0[0..3] -> boot_pd[0..3]. */
        movl    $boot_pdpt0, %eax
        orl     $(PTE_P | PTE_W), %eax
        movl    %eax, boot_pml4
        movl    $boot_pd, %eax
        orl     $(PTE_P | PTE_W), %eax
        xorl    %ecx, %ecx
1:      movl    %eax, boot_pdpt0(,%ecx,8)
        addl    $4096, %eax
        incl    %ecx
        cmpl    $4, %ecx
        jb      1b

        /* 2048 PD entries: identity map 0..4 GiB, write-back (PAT 0). */
        movl    $(PTE_P | PTE_W | PTE_PS), %eax
        xorl    %ecx, %ecx
2:      movl    %eax, boot_pd(,%ecx,8)
        addl    $0x200000, %eax
        incl    %ecx
        cmpl    $2048, %ecx
        jb      2b

        movl    %cr4, %eax
        orl     $CR4_PAE, %eax
        movl    %eax, %cr4
        movl    $boot_pml4, %eax
        movl    %eax, %cr3
        movl    $MSR_EFER, %ecx
        rdmsr
        orl     $EFER_LME, %eax
        wrmsr
        movl    %cr0, %eax
        andl    $~(CR0_CD | CR0_NW), %eax
        orl     $(CR0_PE | CR0_PG), %eax
        movl    %eax, %cr0

        lgdt    boot_gdt_desc
        ljmp    $SEL_CODE64, $long_entry

no_long_mode:
        movl    $msg_no_lm, %esi
3:      lodsb
        testb   %al, %al
        jz      5f
        movb    %al, %bl
        movw    $(COM1 + 5), %dx        /* wait for THR empty */
4:      inb     %dx, %al
        testb   $0x20, %al
        jz      4b
        movw    $COM1, %dx
        movb    %bl, %al
        outb    %al, %dx
        jmp     3b
5:      cli
        hlt
        jmp     5b

/* ------------------------------------------------------------------ */
        .code64
long_entry:
        movw    $SEL_DATA, %ax
        movw    %ax, %ds
        movw    %ax, %es
        movw    %ax, %ss
        xorl    %eax, %eax
        movw    %ax, %fs
        movw    %ax, %gs
        movq    $boot_stack_top, %rsp
        call    kmain
6:      cli
        hlt
        jmp     6b

/*
 * Exception stubs: push a dummy error code where the CPU does not push one,
 * then the vector, and hand a pointer to the frame to trap_handler().
 * Frame layout (low to high): vector, error, rip, cs, rflags, rsp, ss.
 */
.macro  ISR_NOERR n
isr_\n: pushq   $0
        pushq   $\n
        jmp     isr_common
.endm
.macro  ISR_ERR n
isr_\n: pushq   $\n
        jmp     isr_common
.endm

        .irp    n, 0,1,2,3,4,5,6,7,9,15,16,18,19,20,22,23,24,25,26,27,28,31
        ISR_NOERR \n
        .endr
        .irp    n, 8,10,11,12,13,14,17,21,29,30
        ISR_ERR \n
        .endr

isr_common:
        movq    %rsp, %rdi
        andq    $-16, %rsp              /* ABI stack alignment for C */
        call    trap_handler            /* does not return */
7:      cli
        hlt
        jmp     7b

        .section .rodata
        .balign 8
        .globl  isr_table
isr_table:
        .irp    n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
        .quad   isr_\n
        .endr

msg_no_lm:
        .asciz  "err kvmx-testguest: CPU has no long mode\r\n"

        .balign 8
boot_gdt:
        .quad   0                       /* null */
        .quad   0x00af9a000000ffff      /* 0x08: 64-bit code, DPL 0 */
        .quad   0x00cf92000000ffff      /* 0x10: flat data */
boot_gdt_end:
boot_gdt_desc:
        .word   boot_gdt_end - boot_gdt - 1
        .quad   boot_gdt

        .section .data
        .balign 4
        .globl  boot_mb_magic, boot_mb_info
boot_mb_magic:  .long 0
boot_mb_info:   .long 0

        .section .bss
        .balign 4096
        .globl  boot_pml4, boot_pdpt0
boot_pml4:      .skip 4096
boot_pdpt0:     .skip 4096
boot_pd:        .skip 4 * 4096
boot_stack:     .skip 64 * 1024
boot_stack_top:

        .section .note.GNU-stack, "", @progbits
