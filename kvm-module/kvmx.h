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
 *   kvmx_vm.lock (spin)     vm->tracked and att->tracked.
 * The notifier callbacks take only kvmx_vm.lock, kvm->srcu (read) and the
 * flusher's locks, never kvmx_file.lock or kvm->slots_lock:
 * kvm_page_track_unregister_notifier(), called with kvmx_file.lock held,
 * waits (synchronize_srcu) for callbacks in progress, and a memslot change
 * holding slots_lock waits for vCPUs in a flush (they hold kvm->srcu).
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
	u64 guest_flushes;
	u64 host_flushes;
	u64 host_flush_errors;
	u64 lat_min_ns;		/* U64_MAX until the first guest flush */
	u64 lat_max_ns;
	u64 lat_sum_ns;
};

struct kvmx_vm {
	struct kvm_page_track_notifier_node node;
	struct kvm *kvm;
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
	u32 flags;			/* KVMX_FLUSH_* */
	gfn_t gfn;
	bool tracked;			/* vm->lock */
	struct file *backing;		/* NULL unless KVMX_FLUSH_FDATASYNC */
	struct file *deep_flush;	/* NULL unless KVMX_FLUSH_DEEP */
	struct kvmx_flusher fl;
};

struct kvmx_file {
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
	atomic64_t host_flushes;
	atomic64_t host_flush_errors;
};
extern struct kvmx_counters kvmx_counters;

/* attach.c */
long kvmx_attach(struct kvmx_file *kf, struct kvmx_fha_attach __user *uarg);
long kvmx_detach(struct kvmx_file *kf, u32 __user *uhandle);
long kvmx_stats(struct kvmx_file *kf, struct kvmx_fha_stats __user *uarg);
void kvmx_file_release_all(struct kvmx_file *kf);
void kvmx_att_put(struct kvmx_att *att);

/* flush.c */
void kvmx_flusher_init(struct kvmx_flusher *fl);
void kvmx_guest_flush(struct kvmx_att *att);
void kvmx_flusher_read(struct kvmx_flusher *fl, struct kvmx_fha_stats *st);

#endif /* KVMX_INTERNAL_H */
