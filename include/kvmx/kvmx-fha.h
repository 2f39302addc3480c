/* SPDX-License-Identifier: GPL-2.0-or-later WITH Linux-syscall-note */
/*
 * kvmx.ko ioctl ABI: flush hint address (FHA) pages handled inside KVM.
 *
 * Declared once, shared by the kernel module (kvm-module/), the QEMU patch
 * that uses it (hw/mem/nvdimm-flush-hint.c carries a copy with the same
 * layout; its size asserts must match these) and the tests.
 *
 * A user (QEMU) opens /dev/kvmx and attaches FHA pages of one of its VMs.
 * Every attachment belongs to that open file: closing it (or the process
 * dying) detaches everything.  The module write-tracks the page's guest
 * frame with KVM's page-track API; a guest write to it is emulated by KVM,
 * and the module's notifier makes the backend durable before the vCPU
 * resumes: no exit to user space.
 *
 * Versioning: every struct starts with its size; the module accepts sizes
 * it knows and rejects the rest with EINVAL.  KVMX_GET_API_VERSION returns
 * KVMX_API_VERSION; a user refuses to use a module with another major.
 */
#ifndef KVMX_FHA_H
#define KVMX_FHA_H

/* Linux only: the same fixed-size types in the kernel and in user space. */
#include <linux/types.h>
#include <linux/ioctl.h>

#define KVMX_DEVICE_NAME "kvmx"
#define KVMX_API_VERSION 1

/* How the backend is made durable on a guest write to the page. */
#define KVMX_FLUSH_FDATASYNC  (1u << 0)  /* vfs_fsync_range(backing_fd, datasync) */
#define KVMX_FLUSH_DEEP       (1u << 1)  /* then write "1" to deep_flush_fd */
#define KVMX_FLUSH_ALL        (KVMX_FLUSH_FDATASYNC | KVMX_FLUSH_DEEP)

/* Most pages one open /dev/kvmx may attach (what a client can make us hold). */
#define KVMX_MAX_ATTACH 256

struct kvmx_fha_attach {
	__u32 size;          /* sizeof(struct kvmx_fha_attach) */
	__u32 flags;         /* KVMX_FLUSH_* */
	__s32 vm_fd;         /* a KVM VM file descriptor of the caller */
	__s32 backing_fd;    /* file to fdatasync, or -1 (FDATASYNC unset) */
	__s32 deep_flush_fd; /* host region's deep_flush, or -1 (DEEP unset) */
	__u32 pad;           /* must be 0 */
	__u64 gpa;           /* guest-physical address of the FHA page, 4 KiB aligned */
	__u64 reserved[4];   /* must be 0 */
	__u32 handle;        /* out: names the attachment in this open file */
	__u32 pad2;
};

struct kvmx_fha_stats {
	__u32 size;          /* sizeof(struct kvmx_fha_stats) */
	__u32 handle;        /* in */
	__u64 guest_flushes; /* tracked guest writes to the page */
	__u64 host_flushes;  /* flushes done (concurrent ones coalesce) */
	__u64 host_flush_errors;
	__u64 latency_min_ns;
	__u64 latency_avg_ns;
	__u64 latency_max_ns;
	__u64 reserved[4];
};

#define KVMX_IO 0xB7
#define KVMX_GET_API_VERSION _IO(KVMX_IO, 0x00)
#define KVMX_FHA_ATTACH      _IOWR(KVMX_IO, 0x01, struct kvmx_fha_attach)
#define KVMX_FHA_DETACH      _IOW(KVMX_IO, 0x02, __u32)
#define KVMX_FHA_STATS       _IOWR(KVMX_IO, 0x03, struct kvmx_fha_stats)

#ifdef __cplusplus
#define KVMX_FHA_ASSERT static_assert
#else
#define KVMX_FHA_ASSERT _Static_assert
#endif
KVMX_FHA_ASSERT(sizeof(struct kvmx_fha_attach) == 72, "kvmx_fha_attach ABI");
KVMX_FHA_ASSERT(sizeof(struct kvmx_fha_stats) == 88, "kvmx_fha_stats ABI");

#endif /* KVMX_FHA_H */
