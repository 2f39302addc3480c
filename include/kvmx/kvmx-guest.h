/* SPDX-License-Identifier: GPL-2.0-or-later WITH Linux-syscall-note */
/*
 * Guest memory protection and dirty tracking: every structure that crosses
 * a boundary, declared once.
 *
 *  1. The guest driver's ioctls on the guest's /dev/kvmx (kvmx_guest.ko),
 *     used by kvmxctl and by any guest program.
 *  2. The kvmx-chan PCI device's request/response format (guest driver <->
 *     QEMU); QEMU's patch series carries a layout-identical QEMU-style
 *     copy as include/hw/misc/kvmx-guest.h, checked by unit test abi-copy.
 *
 * hostd sees none of these: it talks QMP to QEMU (docs/specs/kvmx-chan.md
 * names the commands and events).  Sizes are asserted at the end; every
 * struct that a caller fills starts with its size, and unknown sizes, flags
 * or non-zero reserved fields are rejected with EINVAL.
 */
#ifndef KVMX_GUEST_H
#define KVMX_GUEST_H

#include <linux/types.h>
#include <linux/ioctl.h>

#define KVMX_GUEST_API_VERSION 1
#define KVMX_GUEST_DEVICE_NAME "kvmx"

/* What the protected pages still allow. */
#define KVMX_ACCESS_RO   1u   /* reads allowed, writes violate */
#define KVMX_ACCESS_NONE 2u   /* reads and writes violate */

/* What a violation does.  In every case the host records it. */
#define KVMX_ACTION_DENY    1u  /* the access is dropped (reads see zeros) */
#define KVMX_ACTION_SIGNAL  2u  /* dropped, and the owner gets SIGSEGV     */
#define KVMX_ACTION_LOG     3u  /* the access proceeds                     */
#define KVMX_ACTION_KILL_VM 4u  /* dropped, and the VM is stopped          */

/* Limits (per VM; the device enforces them again, it trusts no guest). */
#define KVMX_MAX_PROTECTIONS   256          /* protections and trackings */
#define KVMX_MAX_RANGE_BYTES   (1ull << 32) /* one protect/track call    */
#define KVMX_MAX_EXTENTS       4096         /* contiguous guest-physical
                                               runs in one request         */

/* ---- 1. guest ioctls (/dev/kvmx in the guest) ------------------------ */

struct kvmx_protect {
	__u32 size;      /* sizeof(struct kvmx_protect) */
	__u32 flags;     /* must be 0 */
	__s32 pid;       /* target process (0: the caller) */
	__s32 mem_fd;    /* open /proc/<pid>/mem of the target when it is not
	                    the caller (the kernel checked ptrace attach rights
	                    when it was opened), else -1 */
	__u32 access;    /* KVMX_ACCESS_* */
	__u32 action;    /* KVMX_ACTION_* */
	__u64 addr;      /* page aligned user address in the target */
	__u64 len;       /* page aligned, > 0, <= KVMX_MAX_RANGE_BYTES */
	__u64 id;        /* out: names the protection */
};

struct kvmx_range {
	__u32 size;      /* sizeof(struct kvmx_range) */
	__u32 flags;     /* must be 0 */
	__s32 pid;
	__s32 mem_fd;
	__u64 addr;
	__u64 len;
	/* KVMX_TRACK_DIRTY only: */
	__u64 bitmap;    /* user pointer: one bit per page of the range, bit i
	                    of byte i/8 set when page i was written since the
	                    last KVMX_TRACK_DIRTY (or KVMX_TRACK_START) */
	__u64 bitmap_len;/* bytes at bitmap, >= (len / 4096 + 7) / 8 */
	__u64 dirty;     /* out: number of bits set */
};

struct kvmx_prot_info {
	__u64 id;
	__u64 addr;
	__u64 len;
	__s32 pid;
	__u32 kind;      /* KVMX_KIND_* */
	__u32 access;    /* protections only */
	__u32 action;
	__u64 violations;
};
#define KVMX_KIND_PROTECT 1u
#define KVMX_KIND_TRACK   2u

struct kvmx_list {
	__u32 size;      /* sizeof(struct kvmx_list) */
	__u32 flags;     /* must be 0 */
	__s32 pid;       /* 0: every process */
	__u32 count;     /* in: entries at `entries`; out: how many exist */
	__u64 entries;   /* user pointer to struct kvmx_prot_info[count] */
};

/* read(2) on /dev/kvmx returns these, one per violation (poll(2) works). */
struct kvmx_event {
	__u64 seq;       /* per-guest sequence number; a gap means dropped */
	__u64 id;        /* protection */
	__u64 gpa;       /* guest-physical address of the access */
	__u64 addr;      /* the same address in the owner's address space */
	__s32 pid;       /* owner */
	__u32 access;    /* KVMX_VIOLATION_READ / _WRITE */
	__u32 action;    /* KVMX_ACTION_* taken */
	__u32 len;       /* bytes of the access */
	__u64 time_ns;   /* host CLOCK_REALTIME when QEMU saw it */
};
#define KVMX_VIOLATION_READ  1u
#define KVMX_VIOLATION_WRITE 2u

#define KVMX_GUEST_IO 0xB8
#define KVMX_G_API_VERSION  _IO(KVMX_GUEST_IO, 0x00)
#define KVMX_G_PROTECT      _IOWR(KVMX_GUEST_IO, 0x01, struct kvmx_protect)
#define KVMX_G_UNPROTECT    _IOW(KVMX_GUEST_IO, 0x02, struct kvmx_range)
#define KVMX_G_LIST         _IOWR(KVMX_GUEST_IO, 0x03, struct kvmx_list)
#define KVMX_G_TRACK_START  _IOW(KVMX_GUEST_IO, 0x04, struct kvmx_range)
#define KVMX_G_TRACK_DIRTY  _IOWR(KVMX_GUEST_IO, 0x05, struct kvmx_range)
#define KVMX_G_TRACK_STOP   _IOW(KVMX_GUEST_IO, 0x06, struct kvmx_range)

/* ---- 2. kvmx-chan PCI device (guest driver <-> QEMU) ------------------ */

#define KVMX_CHAN_VENDOR_ID 0x1af4   /* experimental range of pci-ids.rst */
#define KVMX_CHAN_DEVICE_ID 0x10f0
#define KVMX_CHAN_MAGIC     0x584d564bu  /* "KVMX" little endian */
#define KVMX_CHAN_VERSION   1u

/* BAR0, 4 KiB, 32-bit little-endian registers. */
#define KVMX_CHAN_REG_MAGIC    0x00  /* RO */
#define KVMX_CHAN_REG_VERSION  0x04  /* RO */
#define KVMX_CHAN_REG_REQ_LO   0x08  /* guest-physical address of a request */
#define KVMX_CHAN_REG_REQ_HI   0x0c
#define KVMX_CHAN_REG_DOORBELL 0x10  /* write: the request's length in bytes;
                                        done when the write returns */
#define KVMX_CHAN_REG_STATUS   0x14  /* RO: status of the last request */
#define KVMX_CHAN_REG_ISR      0x18  /* RO, read clears: bit 0 events ready */
#define KVMX_CHAN_REG_MAX_REQ  0x1c  /* RO: largest request in bytes */

#define KVMX_CHAN_ISR_EVENTS 1u

/* Request ops. */
#define KVMX_CHAN_OP_RESET       1u  /* drop every protection and tracking */
#define KVMX_CHAN_OP_PROTECT     2u  /* id, access, action, extents */
#define KVMX_CHAN_OP_UNPROTECT   3u  /* id */
#define KVMX_CHAN_OP_TRACK_START 4u  /* id, extents */
#define KVMX_CHAN_OP_TRACK_READ  5u  /* id, out_gpa/out_len: bitmap */
#define KVMX_CHAN_OP_TRACK_STOP  6u  /* id */
#define KVMX_CHAN_OP_EVENTS      7u  /* out_gpa/out_len: kvmx_chan_event[] */

/*
 * A request is a header followed by `count` extents, in one guest-physically
 * contiguous buffer.  The device writes `status` (0 or a negative Linux
 * errno) and `count` (TRACK_READ: bits set; EVENTS: events written) back
 * into the header.
 */
struct kvmx_chan_req {
	__u32 op;
	__u32 len;       /* header + extents, bytes; <= REG_MAX_REQ */
	__s32 status;    /* out */
	__u32 count;     /* in: extents; out: see above */
	__u64 id;        /* chosen by the driver, unique among live ones */
	__u32 access;
	__u32 action;
	__s32 pid;       /* informational: owner, shown to the host */
	__u32 flags;     /* must be 0 */
	__u64 vaddr;     /* informational: owner's address of the range */
	__u64 out_gpa;   /* TRACK_READ, EVENTS: where the device writes */
	__u64 out_len;
};

/* Runs of guest-physical pages, in the order of the owner's pages. */
struct kvmx_chan_extent {
	__u64 gpa;       /* page aligned */
	__u64 len;       /* page aligned, > 0 */
};

struct kvmx_chan_event {
	__u64 seq;
	__u64 id;
	__u64 gpa;
	__u64 time_ns;
	__u32 access;    /* KVMX_VIOLATION_* */
	__u32 action;
	__u32 len;
	__u32 pad;
};

#ifdef __cplusplus
#define KVMX_GUEST_ASSERT static_assert
#else
#define KVMX_GUEST_ASSERT _Static_assert
#endif
KVMX_GUEST_ASSERT(sizeof(struct kvmx_protect) == 48, "kvmx_protect ABI");
KVMX_GUEST_ASSERT(sizeof(struct kvmx_range) == 56, "kvmx_range ABI");
KVMX_GUEST_ASSERT(sizeof(struct kvmx_prot_info) == 48, "kvmx_prot_info ABI");
KVMX_GUEST_ASSERT(sizeof(struct kvmx_list) == 24, "kvmx_list ABI");
KVMX_GUEST_ASSERT(sizeof(struct kvmx_event) == 56, "kvmx_event ABI");
KVMX_GUEST_ASSERT(sizeof(struct kvmx_chan_req) == 64, "kvmx_chan_req ABI");
KVMX_GUEST_ASSERT(sizeof(struct kvmx_chan_extent) == 16, "kvmx_chan_extent ABI");
KVMX_GUEST_ASSERT(sizeof(struct kvmx_chan_event) == 48, "kvmx_chan_event ABI");

#endif /* KVMX_GUEST_H */
