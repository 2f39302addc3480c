/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * kvmx.ko internals: flush hint address (FHA) pages flushed inside KVM.
 * The user ABI is include/kvmx/kvmx-fha.h; docs/kvm-module.md explains
 * the module for operators.
 *
 * Objects and who owns them:
 *
 *   struct kvmx_file   one per open /dev/kvmx.  Owns its attachments (by
 *                      handle, in an xarray) and one kvmx_vm per VM they
 *                      belong to.  Its mutex serialises ioctls and release.
 *   struct kvmx_vm     one per (open file, VM): the page-track notifier
 *                      node registered with that VM, a reference on the
 *                      struct kvm and on the module that implements the
 *                      VM's file (kvm_amd/kvm_intel).  It lives while it
 *                      has attachments.
 *   struct kvmx_att    one attached FHA page: its gfn, the files to flush,
 *                      the group-commit state and the counters.  While the
 *                      gfn is write-tracked it is on vm->tracked, a list
 *                      that the notifier reads under RCU.  Refcounted: the
 *                      handle holds one reference, a flush in progress
 *                      another, so detaching a page does not wait for its
 *                      flush (detaching a VM's last page does: the
 *                      notifier's unregistration waits for running
 *                      callbacks).
 *
 * Locks, outermost first:
 *   kvmx_file.lock (mutex)  ioctls, release;
 *   kvm->slots_lock (mutex) held around "is it tracked" + the KVM call
 *                           that adds/removes the tracking, so no memslot
 *                           changes in between (see attach.c); KVM holds
 *                           it when it calls track_remove_region;
 *   kvmx_vm.lock (spin)     vm->tracked and att->tracked;
 *   kvmx_flusher.run (mutex) held by the one vCPU thread running a host
 *                           flush of the attachment (flush.c);
 *   kvmx_flusher.lock (spin) the flusher's numbers, error latch, counters.
 * The notifier callbacks take only kvmx_vm.lock and kvmx_flusher.lock and
 * run inside kvm->srcu and KVM's track_srcu (read), never kvmx_file.lock
 * or kvm->slots_lock: kvm_page_track_unregister_notifier(), called with
 * kvmx_file.lock held, waits (synchronize_srcu) for callbacks in
 * progress, and a memslot change holding slots_lock waits for every vCPU
 * inside kvm->srcu.
 *
 * Where the host flush runs (flush.c).  Not in the notifier: it only
 * queues a task_work on the vCPU thread (task_work_add(current, ...,
 * TWA_RESUME)), which runs once KVM has dropped kvm->srcu and before the
 * vCPU enters the guest again (Linux 6.12 vcpu_run(): after the exit
 * handler, __xfer_to_guest_mode_work_pending() sees TIF_NOTIFY_RESUME,
 * and kvm_vcpu_srcu_read_unlock(); xfer_to_guest_mode_handle_work() ->
 * resume_user_mode_work() -> task_work_run(); vcpu_enter_guest() checks
 * the same flags, kvm_vcpu_exit_request(), with interrupts off right
 * before VM entry; a KVM_RUN that returns to user space instead runs it on
 * the way out).  There it holds only the vCPU mutex and fl->run, so a
 * slow or stuck disk stalls that vCPU (as QEMU's own fdatasync in its
 * MMIO handler does) and nothing else: memslot updates, other vCPUs and
 * other ioctls of the VM go on.  The queued work holds a reference on the
 * attachment and on the /dev/kvmx file (so the module cannot go away
 * under it; the final fput is itself deferred past our return).  If the
 * work cannot be queued (no memory, the file being released, the thread
 * exiting) the flush runs in the notifier as before.
 */
#ifndef KVMX_INTERNAL_H
#define KVMX_INTERNAL_H

#include <linux/kvm_host.h>
#include <linux/list.h>
#include <linux/kref.h>
#include <linux/mutex.h>
#include <linux/spinlock.h>
#include <linux/xarray.h>
#include <asm/kvm_page_track.h>

#include <kvmx/kvmx-fha.h>

/*
 * All attachments of all open files together.  KVM counts the trackers of
 * a gfn in an unsigned short and WARNs on overflow; with this cap the
 * module can never get near it, however many files attach the same page.
 */
#define KVMX_MAX_ATTACH_TOTAL 16384

/* Group commit of the host flushes of one attachment (flush.c). */
struct kvmx_flusher {
	struct mutex run;	/* held by the vCPU that runs a host flush */
	spinlock_t lock;	/* everything below */
	u64 started;		/* host flushes begun */
	u64 done;		/* host flushes finished; == started outside run */
	u64 last_ok;		/* number of the last one that succeeded, 0: none */
	int last_err;		/* errno of the last one that failed */
	int error;		/* latched: first failure since attach/CLEAR_ERROR */
	u64 guest_flushes;
	u64 failed_flushes;	/* guest flushes not covered by a good host flush */
	u64 host_flushes;
	u64 host_flush_errors;
	u64 lat_min_ns;		/* U64_MAX until the first guest flush */
	u64 lat_max_ns;
	u64 lat_sum_ns;
};

struct kvmx_vm {
	struct kvm_page_track_notifier_node node;
	struct kvm *kvm;
	struct kvmx_file *kf;		/* the open file it belongs to */
	struct module *vm_owner;	/* the module of the VM's file_operations */
	struct list_head link;		/* in kf->vms */
	unsigned int nr_att;		/* attachments (tracked or not); kf->lock */
	spinlock_t lock;
	struct list_head tracked;	/* kvmx_att.vm_link; RCU readers */
};

struct kvmx_att {
	struct kref ref;
	struct rcu_head rcu;
	struct list_head vm_link;
	struct kvmx_vm *vm;		/* valid while the handle exists */
	u32 handle;
	u32 flags;			/* KVMX_FLUSH_*, KVMX_ATTACH_ERROR_NOTIFY */
	gfn_t gfn;
	bool tracked;			/* vm->lock */
	struct file *backing;		/* NULL unless KVMX_FLUSH_FDATASYNC */
	struct file *deep_flush;	/* NULL unless KVMX_FLUSH_DEEP */
	struct eventfd_ctx *error_ev;	/* ERROR_NOTIFY with an eventfd, else NULL */
	int error_signal;		/* ERROR_NOTIFY, else 0 */
	struct kvmx_flusher fl;
};

struct kvmx_file {
	struct file *file;		/* the open /dev/kvmx (no reference) */
	struct mutex lock;
	struct xarray handles;		/* handle -> struct kvmx_att */
	u32 next_handle;		/* for xa_alloc_cyclic */
	unsigned int nr_att;
	struct list_head vms;
};

/* Module-wide counters, shown in /sys/class/misc/kvmx/ (main.c). */
struct kvmx_counters {
	atomic_t attachments;		/* attachments that exist */
	atomic_t tracked;		/* of those, gfns still write-tracked */
	atomic_t vms;			/* registered notifiers */
	atomic64_t guest_flushes;
	atomic64_t failed_flushes;
	atomic64_t host_flushes;
	atomic64_t host_flush_errors;
	atomic64_t inline_flushes;	/* run in the notifier (fallback) */
	atomic64_t rejected;		/* ioctls that failed (bad or hostile arguments) */
};
extern struct kvmx_counters kvmx_counters;

/* attach.c */
long kvmx_attach(struct kvmx_file *kf, struct kvmx_fha_attach __user *uarg);
long kvmx_detach(struct kvmx_file *kf, u32 __user *uhandle);
long kvmx_stats(struct kvmx_file *kf, struct kvmx_fha_stats __user *uarg);
long kvmx_clear_error(struct kvmx_file *kf, u32 __user *uhandle);
void kvmx_file_release_all(struct kvmx_file *kf);
void kvmx_att_put(struct kvmx_att *att);

/* flush.c */
void kvmx_flusher_init(struct kvmx_flusher *fl);
void kvmx_guest_flush(struct kvmx_att *att, struct kvmx_file *kf);
void kvmx_flusher_read(struct kvmx_flusher *fl, struct kvmx_fha_stats *st);
void kvmx_flusher_clear_error(struct kvmx_flusher *fl);

#endif /* KVMX_INTERNAL_H */
