/* SPDX-License-Identifier: GPL-2.0-or-later WITH Linux-syscall-note */
/*
 * kvmx.ko ioctl ABI: flush hint address (FHA) pages handled inside KVM.
 *
 * Declared once, shared by the kernel module (kvm-module/), the QEMU patch
 * that uses it (QEMU's series carries a layout-identical QEMU-style copy
 * as include/hw/mem/kvmx-fha.h, checked by unit test abi-copy) and the
 * tests.
 *
 * A user (QEMU) opens /dev/kvmx and attaches FHA pages of one of its VMs.
 * Every attachment belongs to that open file: closing it (or the process
 * dying) detaches everything.  The module write-tracks the page's guest
 * frame with KVM's page-track API; a guest write to it is emulated by KVM,
 * and the module makes the backend durable before the vCPU runs guest code
 * again: no exit to user space.
 *
 * Versioning.
 *   KVMX_GET_API_VERSION returns KVMX_API_VERSION, the major: it changes
 *   only when the ABI changes incompatibly; a user refuses a module with
 *   another major.  Compatible additions are features: KVMX_GET_FEATURES
 *   returns the KVMX_FEATURE_* bits the module has (a module without that
 *   ioctl answers ENOTTY: it has none of them).
 *
 *   Every struct starts with its size, which the user sets to the sizeof
 *   it was compiled with; the module works like copy_struct_from_user():
 *     - size < the first published size (..._SIZE_VER0): EINVAL;
 *     - size > PAGE_SIZE (4096): E2BIG;
 *     - a size smaller than the module's (an older user): accepted, the
 *       fields it lacks read as 0;
 *     - a size larger than the module's (a newer user): accepted if every
 *       byte the module does not know is 0, E2BIG otherwise;
 *     - output: the module writes min(size, its own size) bytes and zeroes
 *       the rest of a larger struct; `size` comes back as what it wrote.
 *   Fields come only at the end or out of reserved space (which must be
 *   0), so 0 always means "not used", and an old user's struct keeps its
 *   meaning.  The ioctl numbers are fixed: they encode the VER0 sizes and
 *   stay the same when a struct grows.
 */
#ifndef KVMX_FHA_H
#define KVMX_FHA_H

/* Linux only: the same fixed-size types in the kernel and in user space. */
#include <linux/types.h>
#include <linux/ioctl.h>

#define KVMX_DEVICE_NAME "kvmx"
#define KVMX_API_VERSION 1

/* KVMX_GET_FEATURES bits. */
/* KVMX_ATTACH_ERROR_NOTIFY, KVMX_FHA_CLEAR_ERROR, stats error/failed_flushes */
#define KVMX_FEATURE_ERROR_NOTIFY (1u << 0)
/* Host flushes run after KVM dropped kvm->srcu (memslot updates don't wait) */
#define KVMX_FEATURE_FLUSH_OUTSIDE_SRCU (1u << 1)
/* Struct sizes handled as copy_struct_from_user() (see above) */
#define KVMX_FEATURE_SIZED_STRUCTS (1u << 2)
/* KVMX_FLUSH_DEEP alone (device DAX); deep_flush_fd checked to be a
 * region's deep_flush; FDATASYNC on a character device refused */
#define KVMX_FEATURE_DEEP_ONLY (1u << 3)

/* How the backend is made durable on a guest write to the page. */
#define KVMX_FLUSH_FDATASYNC  (1u << 0)  /* vfs_fsync_range(backing_fd, datasync) */
#define KVMX_FLUSH_DEEP       (1u << 1)  /* then write "1" to deep_flush_fd */
#define KVMX_FLUSH_ALL        (KVMX_FLUSH_FDATASYNC | KVMX_FLUSH_DEEP)

/*
 * Flush errors stop the guest (kvmx_fha_attach.flags).  Without it a
 * failed host flush is counted and shown in the stats (error,
 * failed_flushes), and the guest goes on as if it had worked (version 1
 * behaviour).  With it:
 *   - the first failed host flush latches its errno in the attachment
 *     ("failed"); it stays until KVMX_FHA_CLEAR_ERROR;
 *   - a guest flush is "not done" when the host flush covering it failed,
 *     or when it arrives while the attachment is failed (then no host
 *     flush is tried: Linux reports a writeback error once per open file,
 *     so a retry would "succeed" without the data);
 *   - for each guest flush not done the module adds 1 to error_eventfd
 *     and sends error_signal to the vCPU thread that wrote, before that
 *     vCPU runs another guest instruction: KVM_RUN returns -1/EINTR
 *     (exit_reason KVM_EXIT_INTR) with the guest stopped right after its
 *     write to the flush hint page.  The signal must not be blocked while
 *     in KVM_RUN (KVM_SET_SIGNAL_MASK, as QEMU does for SIG_IPI); a user
 *     that blocks it there is not stopped.
 */
#define KVMX_ATTACH_ERROR_NOTIFY (1u << 8)
#define KVMX_ATTACH_FLAGS     (KVMX_FLUSH_ALL | KVMX_ATTACH_ERROR_NOTIFY)

/* Most pages one open /dev/kvmx may attach (what a client can make us hold). */
#define KVMX_MAX_ATTACH 256

struct kvmx_fha_attach {
	__u32 size;          /* sizeof(struct kvmx_fha_attach) */
	__u32 flags;         /* KVMX_FLUSH_* (at least one), KVMX_ATTACH_ERROR_NOTIFY */
	__s32 vm_fd;         /* a KVM VM file descriptor of the caller */
	__s32 backing_fd;    /* file to fdatasync, or -1 (FDATASYNC unset) */
	__s32 deep_flush_fd; /* host region's deep_flush, or -1 (DEEP unset) */
	__u32 pad;           /* must be 0 */
	__u64 gpa;           /* guest-physical address of the FHA page, 4 KiB aligned */
	/* With KVMX_ATTACH_ERROR_NOTIFY; both 0 without it: */
	__s32 error_eventfd; /* an eventfd, +1 per guest flush not done; -1: none */
	__s32 error_signal;  /* sent to the vCPU thread: 1..SIGRTMAX, not SIGKILL/SIGSTOP */
	__u64 reserved[3];   /* must be 0 */
	__u32 handle;        /* out: names the attachment in this open file */
	__u32 pad2;          /* must be 0 */
};

struct kvmx_fha_stats {
	__u32 size;          /* in: sizeof(struct kvmx_fha_stats); out: bytes written */
	__u32 handle;        /* in */
	__u64 guest_flushes; /* tracked guest writes to the page */
	__u64 host_flushes;  /* flushes done (concurrent ones coalesce) */
	__u64 host_flush_errors; /* of those, failed */
	__u64 latency_min_ns;
	__u64 latency_avg_ns;
	__u64 latency_max_ns;
	__s32 error;         /* latched negative errno of the first failed host
			      * flush since attach or CLEAR_ERROR; 0: none */
	__u32 pad;           /* 0 */
	__u64 failed_flushes; /* guest flushes not covered by a successful host
			       * flush (with ERROR_NOTIFY: not done) */
	__u64 reserved[2];
};

#define KVMX_FHA_ATTACH_SIZE_VER0 72
#define KVMX_FHA_STATS_SIZE_VER0  88

#define KVMX_IO 0xB7
#define KVMX_GET_API_VERSION _IO(KVMX_IO, 0x00)
#define KVMX_FHA_ATTACH      _IOC(_IOC_READ | _IOC_WRITE, KVMX_IO, 0x01, KVMX_FHA_ATTACH_SIZE_VER0)
#define KVMX_FHA_DETACH      _IOW(KVMX_IO, 0x02, __u32)
#define KVMX_FHA_STATS       _IOC(_IOC_READ | _IOC_WRITE, KVMX_IO, 0x03, KVMX_FHA_STATS_SIZE_VER0)
/*
 * The argument is the handle.  The user has made the backend durable by
 * its own means (rewritten what the guest wrote and flushed it itself):
 * the attachment is no longer failed; later guest flushes flush again.
 * failed_flushes and host_flush_errors stay as they are.
 */
#define KVMX_FHA_CLEAR_ERROR _IOW(KVMX_IO, 0x04, __u32)
#define KVMX_GET_FEATURES    _IO(KVMX_IO, 0x05)

#ifdef __cplusplus
#define KVMX_FHA_ASSERT static_assert
#else
#define KVMX_FHA_ASSERT _Static_assert
#endif
KVMX_FHA_ASSERT(sizeof(struct kvmx_fha_attach) == 72, "kvmx_fha_attach ABI");
KVMX_FHA_ASSERT(sizeof(struct kvmx_fha_stats) == 88, "kvmx_fha_stats ABI");
KVMX_FHA_ASSERT(KVMX_FHA_ATTACH == _IOWR(KVMX_IO, 0x01, struct kvmx_fha_attach),
		"KVMX_FHA_ATTACH number");
KVMX_FHA_ASSERT(KVMX_FHA_STATS == _IOWR(KVMX_IO, 0x03, struct kvmx_fha_stats),
		"KVMX_FHA_STATS number");

#endif /* KVMX_FHA_H */
