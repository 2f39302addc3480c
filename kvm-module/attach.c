// SPDX-License-Identifier: GPL-2.0-only
/*
 * kvmx.ko: attaching flush hint pages to a VM, the page-track notifier,
 * detaching and the per-attachment statistics.
 *
 * KVM's page-track API (CONFIG_KVM_EXTERNAL_WRITE_TRACKING, Linux 6.7+):
 *
 *   kvm_page_track_register_notifier(kvm, node)
 *       only from the process that owns the VM (kvm->mm == current->mm,
 *       else -ESRCH); turns on write tracking for the VM and takes its own
 *       reference on the kvm.  Must come before the first add_gfn.
 *   kvm_write_track_add_gfn(kvm, gfn) / kvm_write_track_remove_gfn()
 *       -EINVAL if no memslot holds gfn.  Tracking is a count per gfn in
 *       the memslot's metadata (it dies with the memslot); removing more
 *       than was added WARNs, so every remove must pair with an add made
 *       in the *same* memslot.
 *   node->track_write(gpa, new, bytes, node)
 *       after KVM emulated a guest write to a tracked gfn (of any tracker:
 *       KVM's own shadow-paging trackers included, so filter by gpa).
 *   node->track_remove_region(gfn, npages, node)
 *       a memslot was deleted (kvm_arch_commit_memory_region, KVM_MR_DELETE,
 *       under kvm->slots_lock, after the slot left the active memslots and
 *       just before its metadata, tracking counts included, is freed).  The
 *       range says nothing of the address space: it may be an SMM (as 1)
 *       slot while our gfn's as-0 slot stays.  Moving a memslot is refused
 *       (-EINVAL) while any external notifier is registered on the VM.
 *   kvm_page_track_unregister_notifier(kvm, node)
 *       unlinks the node and synchronize_srcu()s: no callback of it runs
 *       afterwards; drops the reference taken at register.
 */
#include <linux/eventfd.h>
#include <linux/file.h>
#include <linux/fs.h>
#include <linux/magic.h>
#include <linux/module.h>
#include <linux/rculist.h>
#include <linux/signal.h>
#include <linux/slab.h>
#include <linux/uaccess.h>

#include "kvmx.h"

/* ---- the notifier ------------------------------------------------------ */

/*
 * A guest wrote to a write-tracked gfn of this VM and KVM has emulated the
 * write.  If the gfn is one of ours, have it flushed before the vCPU runs
 * guest code again (flush.c: the flush itself runs after KVM drops
 * kvm->srcu, from a task_work of this thread).
 *
 * Why this may sleep (Linux 6.12, arch/x86/kvm): the only callers are
 * emulator_write_phys() and emulator_cmpxchg_emulated() (x86.c), i.e. the
 * instruction emulator, entered from the vCPU's own KVM_RUN ioctl after a
 * write-protection page fault (kvm_mmu_page_fault() -> x86_emulate_
 * instruction()).  By then vcpu_enter_guest() has re-enabled interrupts
 * and preemption after the VM exit; what the thread holds is the vCPU
 * mutex, kvm->srcu (read) and the notifier list's track_srcu (read), and
 * SRCU read-side sections may block.  No spinlock (mmu_lock included) is
 * held across the call.  It sleeps only to allocate, and, in the fallback
 * of kvmx_guest_flush(), to flush; a memslot update waits for that in
 * synchronize_srcu(&kvm->srcu), which is why the flush normally runs
 * later.
 */
static void kvmx_track_write(gpa_t gpa, const u8 *new, int bytes,
			     struct kvm_page_track_notifier_node *node)
{
	struct kvmx_vm *vm = container_of(node, struct kvmx_vm, node);
	gfn_t gfn = gpa_to_gfn(gpa);
	struct kvmx_att *att, *hit = NULL;

	rcu_read_lock();
	list_for_each_entry_rcu(att, &vm->tracked, vm_link) {
		if (att->gfn == gfn && kref_get_unless_zero(&att->ref)) {
			hit = att;
			break;
		}
	}
	rcu_read_unlock();
	if (!hit)
		return;

	kvmx_guest_flush(hit, vm->kf);
	kvmx_att_put(hit);
}

/*
 * A memslot [gfn, gfn + npages) was deleted.  If it was the (address space
 * 0) slot of an attachment, KVM frees the tracking count with it: the
 * attachment is no longer tracked and must not be "removed" later (that
 * would decrement a count in whatever memslot is there by then).  It stays
 * attached (handle and counters remain valid) until detached.  If the gfn
 * still has its as-0 slot, the deleted one was in another address space
 * (SMM) and our tracking is intact.
 *
 * Called with kvm->slots_lock held (so memslots cannot change under us),
 * inside the track_srcu read section: takes only vm->lock.
 */
static void kvmx_track_remove_region(gfn_t gfn, unsigned long npages,
				     struct kvm_page_track_notifier_node *node)
{
	struct kvmx_vm *vm = container_of(node, struct kvmx_vm, node);
	struct kvmx_att *att, *tmp;
	int idx;

	idx = srcu_read_lock(&vm->kvm->srcu);
	spin_lock(&vm->lock);
	list_for_each_entry_safe(att, tmp, &vm->tracked, vm_link) {
		if (att->gfn < gfn || att->gfn - gfn >= npages)
			continue;
		if (kvm_is_visible_memslot(gfn_to_memslot(vm->kvm, att->gfn)))
			continue;	/* not our slot that went */
		list_del_rcu(&att->vm_link);
		att->tracked = false;
		atomic_dec(&kvmx_counters.tracked);
	}
	spin_unlock(&vm->lock);
	srcu_read_unlock(&vm->kvm->srcu, idx);
}

/* ---- attachments ------------------------------------------------------- */

static void kvmx_att_free(struct kref *ref)
{
	struct kvmx_att *att = container_of(ref, struct kvmx_att, ref);

	if (att->backing)
		fput(att->backing);
	if (att->deep_flush)
		fput(att->deep_flush);
	if (att->error_ev)
		eventfd_ctx_put(att->error_ev);
	atomic_dec(&kvmx_counters.attachments);
	/* The notifier may still be walking past it under rcu_read_lock(). */
	kfree_rcu(att, rcu);
}

void kvmx_att_put(struct kvmx_att *att)
{
	kref_put(&att->ref, kvmx_att_free);
}

/*
 * The user's struct, whatever its size (copy_struct_from_user(): see the
 * header): at least the version-0 size, at most a page (a bound on what
 * we read), fields we do not know 0.
 */
static int kvmx_copy_sized(void *dst, size_t ksize, const void __user *usrc,
			   size_t min_size)
{
	u32 usize;

	if (get_user(usize, (const u32 __user *)usrc))
		return -EFAULT;
	if (usize < min_size)
		return -EINVAL;
	if (usize > PAGE_SIZE)
		return -E2BIG;
	return copy_struct_from_user(dst, ksize, usrc, usize);
}

/* Checks of struct kvmx_fha_attach that need no lookups. */
static int kvmx_attach_args_ok(const struct kvmx_fha_attach *a)
{
	int i;

	if (a->pad || a->pad2)
		return -EINVAL;
	for (i = 0; i < ARRAY_SIZE(a->reserved); i++)
		if (a->reserved[i])
			return -EINVAL;
	/* Something to flush, and no flag we do not know. */
	if (!(a->flags & KVMX_FLUSH_ALL) || (a->flags & ~KVMX_ATTACH_FLAGS))
		return -EINVAL;
	if (a->flags & KVMX_ATTACH_ERROR_NOTIFY) {
		/* A signal that reaches the thread and can be handled. */
		if (a->error_signal <= 0 || !valid_signal(a->error_signal) ||
		    a->error_signal == SIGKILL || a->error_signal == SIGSTOP)
			return -EINVAL;
		if (a->error_eventfd < -1)
			return -EBADF;
	} else if (a->error_eventfd || a->error_signal) {
		return -EINVAL;		/* was reserved: must be 0 */
	}
	if (a->gpa & ~PAGE_MASK)
		return -EINVAL;
	/* An fd is given exactly when its flag asks for it. */
	if (!(a->flags & KVMX_FLUSH_FDATASYNC) && a->backing_fd != -1)
		return -EINVAL;
	if (!(a->flags & KVMX_FLUSH_DEEP) && a->deep_flush_fd != -1)
		return -EINVAL;
	return 0;
}

/*
 * The file an nd region's deep flush is requested through: the sysfs
 * attribute .../regionN/deep_flush (drivers/nvdimm/region_devs.c).  A
 * write to it flushes the region's write-pending queues and returns.  Any
 * other writable file could block a vCPU in KVM_RUN for ever (a full
 * pipe, a FIFO nobody reads, a FUSE file).
 */
static bool kvmx_is_deep_flush_attr(struct file *f)
{
	struct dentry *d = f->f_path.dentry, *parent;
	unsigned int n;
	bool ok;

	if (file_inode(f)->i_sb->s_magic != SYSFS_MAGIC ||
	    !S_ISREG(file_inode(f)->i_mode))
		return false;
	spin_lock(&d->d_lock);
	ok = !strcmp(d->d_name.name, "deep_flush");
	spin_unlock(&d->d_lock);
	if (!ok)
		return false;
	parent = dget_parent(d);
	spin_lock(&parent->d_lock);
	ok = sscanf(parent->d_name.name, "region%u", &n) == 1;
	spin_unlock(&parent->d_lock);
	dput(parent);
	return ok;
}

/* A new attachment holding its files; not yet tracked or visible. */
static struct kvmx_att *kvmx_att_new(const struct kvmx_fha_attach *a)
{
	struct kvmx_att *att;
	int r;

	att = kzalloc(sizeof(*att), GFP_KERNEL_ACCOUNT);
	if (!att)
		return ERR_PTR(-ENOMEM);
	kref_init(&att->ref);
	INIT_LIST_HEAD(&att->vm_link);
	kvmx_flusher_init(&att->fl);
	att->flags = a->flags;
	att->gfn = gpa_to_gfn(a->gpa);
	atomic_inc(&kvmx_counters.attachments);

	if (a->flags & KVMX_FLUSH_FDATASYNC) {
		r = -EBADF;
		att->backing = fget(a->backing_fd);
		if (!att->backing)
			goto fail;
		/*
		 * A character device (device DAX, /dev/zero, ...) has no page
		 * cache to write back: for device DAX the region's deep flush
		 * (KVMX_FLUSH_DEEP alone) is what makes it durable.
		 */
		r = -EOPNOTSUPP;
		if (S_ISCHR(file_inode(att->backing)->i_mode))
			goto fail;
		/* What vfs_fsync_range() would refuse anyway, refused now. */
		r = -EINVAL;
		if (!att->backing->f_op->fsync)
			goto fail;
	}
	if (a->flags & KVMX_FLUSH_DEEP) {
		r = -EBADF;
		att->deep_flush = fget(a->deep_flush_fd);
		if (!att->deep_flush)
			goto fail;
		if (!(att->deep_flush->f_mode & FMODE_WRITE))
			goto fail;	/* as write(2) on a read-only fd */
		r = -EINVAL;
		if (!kvmx_is_deep_flush_attr(att->deep_flush))
			goto fail;
		/* kernel_write() needs ->write_iter (sysfs files have it). */
		if (!att->deep_flush->f_op->write_iter)
			goto fail;
	}
	if ((a->flags & KVMX_ATTACH_ERROR_NOTIFY) && a->error_eventfd != -1) {
		/* EBADF: not an open fd; EINVAL: not an eventfd */
		att->error_ev = eventfd_ctx_fdget(a->error_eventfd);
		if (IS_ERR(att->error_ev)) {
			r = PTR_ERR(att->error_ev);
			att->error_ev = NULL;
			goto fail;
		}
	}
	if (a->flags & KVMX_ATTACH_ERROR_NOTIFY)
		att->error_signal = a->error_signal;
	return att;

fail:
	kvmx_att_put(att);
	return ERR_PTR(r);
}

/* ---- per-(file, VM) notifier ------------------------------------------- */

static struct kvmx_vm *kvmx_vm_find(struct kvmx_file *kf, struct kvm *kvm)
{
	struct kvmx_vm *vm;

	list_for_each_entry(vm, &kf->vms, link)
		if (vm->kvm == kvm)
			return vm;
	return NULL;
}

/* Find or make this file's notifier for the VM of vm_file (kf->lock). */
static struct kvmx_vm *kvmx_vm_get(struct kvmx_file *kf, struct file *vm_file)
{
	struct kvm *kvm = vm_file->private_data;
	struct kvmx_vm *vm;
	int r;

	vm = kvmx_vm_find(kf, kvm);
	if (vm)
		return vm;

	vm = kzalloc(sizeof(*vm), GFP_KERNEL_ACCOUNT);
	if (!vm)
		return ERR_PTR(-ENOMEM);
	spin_lock_init(&vm->lock);
	INIT_LIST_HEAD(&vm->tracked);
	vm->kvm = kvm;
	vm->kf = kf;
	vm->node.track_write = kvmx_track_write;
	vm->node.track_remove_region = kvmx_track_remove_region;

	r = kvm_page_track_register_notifier(kvm, &vm->node);
	if (r) {
		kfree(vm);
		return ERR_PTR(r);
	}
	/*
	 * Our own references, held until the notifier is gone: the VM, and
	 * the vendor module (kvm_amd/kvm_intel) its file belongs to.  Once
	 * the user closes the VM fd, ours may be the last reference, and the
	 * VM's destruction calls into that module.  __module_get is safe: the
	 * open vm_file pins the module right now.
	 */
	kvm_get_kvm(kvm);
	vm->vm_owner = vm_file->f_op->owner;
	__module_get(vm->vm_owner);
	list_add(&vm->link, &kf->vms);
	atomic_inc(&kvmx_counters.vms);
	return vm;
}

/* Drop a notifier that has no attachments left (kf->lock held). */
static void kvmx_vm_release_if_unused(struct kvmx_vm *vm)
{
	if (vm->nr_att)
		return;
	/* Waits for callbacks in progress: they do not take kf->lock. */
	kvm_page_track_unregister_notifier(vm->kvm, &vm->node);
	WARN_ON_ONCE(!list_empty(&vm->tracked));
	list_del(&vm->link);
	atomic_dec(&kvmx_counters.vms);
	kvm_put_kvm(vm->kvm);		/* may destroy the VM: before module_put */
	module_put(vm->vm_owner);
	kfree(vm);
}

/*
 * Write-track att->gfn and make it visible to the notifier.
 *
 * Under kvm->slots_lock, which every memslot change holds from start to
 * end, track_remove_region included: the memslot we check is the one the
 * add lands in, and if it is deleted later, the attachment is on the list
 * by the time the callback looks.  (kvm->srcu would not do: a new memslot
 * is published before the writer waits for SRCU readers.)  Not called with
 * kvm->srcu held: memslot writers wait for SRCU readers with slots_lock
 * held.
 */
static int kvmx_track(struct kvmx_vm *vm, struct kvmx_att *att)
{
	struct kvm *kvm = vm->kvm;
	struct kvm_memory_slot *slot;
	struct kvmx_att *other;
	int r;

	mutex_lock(&kvm->slots_lock);
	slot = gfn_to_memslot(kvm, att->gfn);
	r = -EINVAL;
	/* Guest memory the user created: not KVM's internal slots. */
	if (!kvm_is_visible_memslot(slot))
		goto out;
	/*
	 * Writes to a read-only slot exit to user space as MMIO and are never
	 * emulated, so nothing would ever be flushed; guest_memfd memory is
	 * not written through the emulator either.
	 */
	if (slot->flags & (KVM_MEM_READONLY | KVM_MEM_GUEST_MEMFD))
		goto out;

	r = -EEXIST;
	spin_lock(&vm->lock);
	list_for_each_entry(other, &vm->tracked, vm_link)
		if (other->gfn == att->gfn)
			goto out_unlock;
	spin_unlock(&vm->lock);

	r = kvm_write_track_add_gfn(kvm, att->gfn);
	if (r)
		goto out;

	spin_lock(&vm->lock);
	list_add_tail_rcu(&att->vm_link, &vm->tracked);
	att->tracked = true;
	atomic_inc(&kvmx_counters.tracked);
	r = 0;
out_unlock:
	spin_unlock(&vm->lock);
out:
	mutex_unlock(&kvm->slots_lock);
	return r;
}

/*
 * Stop tracking att->gfn, unless the memslot deletion did it already.
 * Under kvm->slots_lock (see kvmx_track()): if att->tracked is still set,
 * the memslot the add went to is still there, so the remove pairs with it.
 */
static void kvmx_untrack(struct kvmx_att *att)
{
	struct kvm *kvm = att->vm->kvm;
	bool was_tracked;

	mutex_lock(&kvm->slots_lock);
	spin_lock(&att->vm->lock);
	was_tracked = att->tracked;
	if (was_tracked) {
		list_del_rcu(&att->vm_link);
		att->tracked = false;
		atomic_dec(&kvmx_counters.tracked);
	}
	spin_unlock(&att->vm->lock);
	if (was_tracked)
		WARN_ON_ONCE(kvm_write_track_remove_gfn(kvm, att->gfn));
	mutex_unlock(&kvm->slots_lock);
}

/* Undo an attachment that has a handle (kf->lock held). */
static void kvmx_detach_locked(struct kvmx_file *kf, struct kvmx_att *att)
{
	struct kvmx_vm *vm = att->vm;

	xa_erase(&kf->handles, att->handle);
	kvmx_untrack(att);
	kf->nr_att--;
	vm->nr_att--;
	kvmx_vm_release_if_unused(vm);
	att->vm = NULL;
	kvmx_att_put(att);	/* the handle's reference */
}

/* ---- ioctls ------------------------------------------------------------ */

long kvmx_attach(struct kvmx_file *kf, struct kvmx_fha_attach __user *uarg)
{
	struct kvmx_fha_attach a;
	struct file *vm_file;
	struct kvmx_att *att;
	struct kvmx_vm *vm;
	struct kvm *kvm;
	u32 handle;
	long r;

	r = kvmx_copy_sized(&a, sizeof(a), uarg, KVMX_FHA_ATTACH_SIZE_VER0);
	if (r)
		return r;
	r = kvmx_attach_args_ok(&a);
	if (r)
		return r;

	vm_file = fget(a.vm_fd);
	if (!vm_file)
		return -EBADF;
	r = -EINVAL;
	if (!file_is_kvm(vm_file))	/* /dev/kvm, a vCPU, anything else */
		goto out_fput;
	kvm = vm_file->private_data;
	/* KVM's rule for page-track users: the VM's own process only. */
	r = -EPERM;
	if (kvm->mm != current->mm)
		goto out_fput;

	att = kvmx_att_new(&a);
	if (IS_ERR(att)) {
		r = PTR_ERR(att);
		goto out_fput;
	}

	mutex_lock(&kf->lock);
	r = -ENOSPC;
	if (kf->nr_att >= KVMX_MAX_ATTACH)
		goto out_unlock;
	if (atomic_read(&kvmx_counters.attachments) > KVMX_MAX_ATTACH_TOTAL)
		goto out_unlock;

	vm = kvmx_vm_get(kf, vm_file);
	if (IS_ERR(vm)) {
		r = PTR_ERR(vm);
		goto out_unlock;
	}
	r = xa_alloc_cyclic(&kf->handles, &handle, att, XA_LIMIT(1, INT_MAX),
			    &kf->next_handle, GFP_KERNEL_ACCOUNT);
	if (r < 0) {
		kvmx_vm_release_if_unused(vm);
		goto out_unlock;
	}
	att->handle = handle;
	att->vm = vm;
	vm->nr_att++;
	kf->nr_att++;

	r = kvmx_track(vm, att);
	if (r == 0 && put_user(handle, &uarg->handle))
		r = -EFAULT;
	if (r) {
		kvmx_detach_locked(kf, att);	/* drops our reference */
		att = NULL;
	}
out_unlock:
	mutex_unlock(&kf->lock);
	if (r && att)
		kvmx_att_put(att);
out_fput:
	fput(vm_file);
	return r;
}

long kvmx_detach(struct kvmx_file *kf, u32 __user *uhandle)
{
	struct kvmx_att *att;
	u32 handle;
	long r = 0;

	if (get_user(handle, uhandle))
		return -EFAULT;
	mutex_lock(&kf->lock);
	att = xa_load(&kf->handles, handle);
	if (att)
		kvmx_detach_locked(kf, att);
	else
		r = -ENOENT;
	mutex_unlock(&kf->lock);
	return r;
}

/*
 * Only size and handle are read (the rest is output): a size from the
 * version-0 size to a page; min(size, ours) bytes written, a larger
 * struct's tail zeroed.
 */
long kvmx_stats(struct kvmx_file *kf, struct kvmx_fha_stats __user *uarg)
{
	struct kvmx_fha_stats st;
	struct kvmx_att *att;
	u32 size, handle, n;

	if (get_user(size, &uarg->size) || get_user(handle, &uarg->handle))
		return -EFAULT;
	if (size < KVMX_FHA_STATS_SIZE_VER0)
		return -EINVAL;
	if (size > PAGE_SIZE)
		return -E2BIG;
	n = min_t(u32, size, sizeof(st));

	memset(&st, 0, sizeof(st));
	st.size = n;
	st.handle = handle;
	mutex_lock(&kf->lock);
	att = xa_load(&kf->handles, handle);
	if (att)
		kvmx_flusher_read(&att->fl, &st);
	mutex_unlock(&kf->lock);
	if (!att)
		return -ENOENT;
	if (copy_to_user(uarg, &st, n))
		return -EFAULT;
	if (size > n && clear_user((u8 __user *)uarg + n, size - n))
		return -EFAULT;
	return 0;
}

long kvmx_clear_error(struct kvmx_file *kf, u32 __user *uhandle)
{
	struct kvmx_att *att;
	u32 handle;
	long r = 0;

	if (get_user(handle, uhandle))
		return -EFAULT;
	mutex_lock(&kf->lock);
	att = xa_load(&kf->handles, handle);
	if (att)
		kvmx_flusher_clear_error(&att->fl);
	else
		r = -ENOENT;
	mutex_unlock(&kf->lock);
	return r;
}

/* Close of the file (or death of its last user): detach everything. */
void kvmx_file_release_all(struct kvmx_file *kf)
{
	struct kvmx_att *att;
	unsigned long index;

	mutex_lock(&kf->lock);
	xa_for_each(&kf->handles, index, att)
		kvmx_detach_locked(kf, att);
	WARN_ON_ONCE(!list_empty(&kf->vms) || kf->nr_att);
	mutex_unlock(&kf->lock);
}
