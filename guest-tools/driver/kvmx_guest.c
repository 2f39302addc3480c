// SPDX-License-Identifier: GPL-2.0-only
/*
 * kvmx_guest.ko: guest-requested memory protection and dirty tracking.
 *
 * The guest side of the kvmx-chan PCI device (docs/specs/kvmx-chan.md);
 * every structure is declared once in include/kvmx/kvmx-guest.h.
 *
 *  - /dev/kvmx (a misc device, registered when the device is bound) takes
 *    the KVMX_G_* ioctls.  A caller may name itself (pid 0 or its own tgid)
 *    or another process; for another process it passes an fd of
 *    /proc/<pid>/mem it opened (the kernel checked PTRACE_MODE_ATTACH then).
 *    The driver checks that the fd is a /proc/<pid>/mem file (same f_op as
 *    the /proc/self/mem it opened at load) whose mm (file->private_data,
 *    as fs/proc/base.c's __mem_open stores it) is the mm of that pid.
 *  - PROTECT / TRACK_START pin every page of the range (FOLL_WRITE |
 *    FOLL_LONGTERM, so the frames are private to the target and never
 *    move), coalesce their guest-physical addresses into extents in the
 *    order of the virtual pages, and send them to the device.
 *  - Protections and trackings belong to the target's mm, not to the file
 *    that created them.  They end on UNPROTECT / TRACK_STOP, when the
 *    target's mm goes away (mmu_notifier release: the device is told
 *    first, the pages are unpinned after), or when the device is removed
 *    (RESET first, then unpin).
 *  - Violation events come in by MSI or INTx; a threaded handler drains
 *    them (OP_EVENTS), maps each GPA back to the owner's address, sends
 *    SIGSEGV (SEGV_ACCERR) for action "signal", and appends a
 *    struct kvmx_event to a ring that read(2)/poll(2) on /dev/kvmx serve;
 *    every open file has its own cursor, starting at open.  LIST's
 *    `violations` counts the events received for an entry (when the
 *    device's queue overflows it drops events; the seq gap shows that).
 *  - Permissions and limits.  /dev/kvmx is mode 0666 (module parameter
 *    devmode): any process may protect or track its own memory, and
 *    another process's only with a /proc/<pid>/mem fd, i.e. with the
 *    ptrace attach permission.  UNPROTECT, TRACK_DIRTY and TRACK_STOP
 *    name their target the same way and find only that target's entries.
 *    Every entry records the euid of its owner (the target process) and of
 *    its creator when it is made.  LIST and read(2)/poll(2) show an entry
 *    or event only to a viewer with the owner's euid, or with
 *    CAP_SYS_ADMIN in the init namespace; the viewer is both the opener of
 *    the file and the caller (a descriptor passed to another process shows
 *    what both may see).  A reader's cursor moves past events it may not
 *    see.  Without CAP_SYS_ADMIN a euid may have at most
 *    KVMX_USER_MAX_ENTRIES live entries (ENOSPC), and may not use action
 *    kill-vm (EPERM: it would stop the whole VM).  Pinned pages are
 *    charged to the target's mm->locked_vm (__account_locked_vm, as vfio
 *    does, shared with mlock) against the target's RLIMIT_MEMLOCK (ENOMEM);
 *    callers with CAP_IPC_LOCK or CAP_SYS_ADMIN are not limited but still
 *    charged.  The charge is returned when the entry ends, whichever way.
 *    KVMX_MAX_PROTECTIONS stays one pool per guest for everybody.
 *  - Limitations: the byte limit is per target process, not per user (a
 *    user's total is bounded by KVMX_USER_MAX_ENTRIES entries of at most
 *    RLIMIT_MEMLOCK each); events are one ring per guest and the device
 *    rate-limits them per guest, so one user's violations can push
 *    another's events out of the rings (the seq gap shows it).
 *  - Only private anonymous memory is protected or tracked (EOPNOTSUPP
 *    otherwise: shared anonymous, memfd/tmpfs, SysV shm, hugetlb, files,
 *    special mappings), checked under the mmap_lock that the pinning
 *    holds: a protection acts on frames and must not reach a frame another
 *    process maps.  Ranges must be writable (FOLL_WRITE, else EFAULT).
 *    Pinning happens without kvmx_lock, so a slow fault (userfaultfd,
 *    FUSE) delays only its own request (a fatal signal ends it).
 *  - The device rate-limits PROTECT and TRACK_START per guest, and bounds
 *    the share of time TRACK_READ takes (EAGAIN): the driver then drops
 *    kvmx_lock, sleeps KVMX_THROTTLE_MS and tries again, until a signal
 *    (EINTR).
 *
 * Locking: kvmx_lock (a mutex) guards the device's request buffer, the
 * entry list and the bound device pointer; it is taken by ioctls, the IRQ
 * thread and the mmu_notifier release callback (which runs without
 * mmap_lock, from exit_mmap).  Order: kvmx_lock -> mmap_lock (the release
 * callback returns the locked_vm charge under kvmx_lock; PROTECT and
 * TRACK_START charge and pin under the target's mmap_lock before they take
 * kvmx_lock, and check everything again under it).  mmput() is never
 * called with kvmx_lock held (a last mmput runs exit_mmap, whose release
 * callback takes kvmx_lock).  The event ring has its own spinlock, taken
 * last.
 */
#define pr_fmt(fmt) "kvmx_guest: " fmt

#include <linux/bitmap.h>
#include <linux/capability.h>
#include <linux/cred.h>
#include <linux/delay.h>
#include <linux/dma-mapping.h>
#include <linux/err.h>
#include <linux/file.h>
#include <linux/hugetlb.h>
#include <linux/fs.h>
#include <linux/interrupt.h>
#include <linux/kref.h>
#include <linux/miscdevice.h>
#include <linux/mm.h>
#include <linux/mmu_notifier.h>
#include <linux/module.h>
#include <linux/mutex.h>
#include <linux/overflow.h>
#include <linux/pci.h>
#include <linux/pid.h>
#include <linux/poll.h>
#include <linux/sched/mm.h>
#include <linux/sched/signal.h>
#include <linux/sched/task.h>
#include <linux/slab.h>
#include <linux/spinlock.h>
#include <linux/uaccess.h>
#include <linux/uidgid.h>
#include <linux/wait.h>
#include <linux/workqueue.h>

#include <kvmx/kvmx-guest.h>

#define KVMX_RING_EVENTS  1024u                 /* per device, power of 2 */
#define KVMX_EVBUF_SIZE   PAGE_SIZE             /* one OP_EVENTS batch */
#define KVMX_EVENT_ROUNDS 64                    /* batches per interrupt */
#define KVMX_READ_BATCH   64u                   /* events per read(2) */
#define KVMX_REQ_HDR      sizeof(struct kvmx_chan_req)
#define KVMX_REQ_CAP      (KVMX_REQ_HDR + \
			   KVMX_MAX_EXTENTS * sizeof(struct kvmx_chan_extent))
#define KVMX_STATUS_PENDING 1                   /* never a device status */
#define KVMX_THROTTLE_MS  20                    /* retry after the device's
						   EAGAIN (rate limit) */

/* Live entries one euid may create without CAP_SYS_ADMIN. */
#define KVMX_USER_MAX_ENTRIES (KVMX_MAX_PROTECTIONS / 4)

static ushort devmode = 0666;
module_param(devmode, ushort, 0444);
MODULE_PARM_DESC(devmode, "mode of /dev/kvmx (default 0666: requests are "
		 "checked per target process, LIST and events are filtered "
		 "by euid, and unprivileged users are limited)");

/* An event and the euid of its entry's owner (INVALID_UID: no entry). */
struct kvmx_ev_slot {
	struct kvmx_event ev;
	kuid_t owner;
};

struct kvmx_dev {
	struct kref kref;               /* probe + one per open file */
	struct pci_dev *pdev;
	void __iomem *bar;
	struct miscdevice misc;
	int irq;
	bool msi;
	bool dead;                      /* removed; under kvmx_lock + ev_lock */

	/* Under kvmx_lock. */
	struct kvmx_chan_req *req;      /* header + extents, DMA coherent */
	dma_addr_t req_dma;
	size_t req_size;
	unsigned int max_extents;
	struct kvmx_chan_event *evbuf;  /* OP_EVENTS output */
	dma_addr_t evbuf_dma;

	/* Event ring: ev_head events were ever appended; slot = seq % size. */
	spinlock_t ev_lock;
	u64 ev_head;
	struct kvmx_ev_slot *ev_ring;
	wait_queue_head_t ev_wait;
};

/* One protection or tracking. */
struct kvmx_entry {
	struct list_head node;
	u64 id;
	u32 kind;                       /* KVMX_KIND_* */
	u32 access, action;             /* protections only */
	u64 addr, len;
	u64 violations;
	kuid_t owner_euid;              /* the target's euid at creation */
	kuid_t creator_euid;            /* the caller's euid at creation */
	unsigned long charged;          /* pages in the mm's locked_vm */
	struct pid *pid;                /* the owner's thread group */
	struct mm_struct *mm;           /* identity; kept alive by mn */
	struct mmu_notifier *mn;        /* one mmu_notifier_get() reference */
	struct page **pages;            /* pinned; NULL once unpinned */
	unsigned long npages;
	struct kvmx_chan_extent *ext;   /* as sent to the device */
	unsigned int next;
};

struct kvmx_file {
	struct kvmx_dev *dev;
	struct mutex read_lock;         /* one read(2) at a time per file */
	u64 pos;                        /* next event for this file */
	kuid_t euid;                    /* the opener's */
	bool admin;                     /* the opener had CAP_SYS_ADMIN */
};

/* Who looks at LIST or the events: the opener and the caller together. */
struct kvmx_viewer {
	kuid_t euid;                    /* INVALID_UID: they differ */
	bool all;                       /* both have CAP_SYS_ADMIN */
};

/* The target of a request: an mm with an mm_users reference, its tgid,
 * the task (for its RLIMIT_MEMLOCK) and its euid. */
struct kvmx_target {
	struct mm_struct *mm;
	struct pid *pid;
	struct task_struct *task;
	kuid_t euid;
};

static DEFINE_MUTEX(kvmx_lock);
static struct kvmx_dev *kvmx_cur;       /* the bound device, or NULL */
static LIST_HEAD(kvmx_entries);
static unsigned int kvmx_nentries;
static u64 kvmx_last_id;
/* Entries released by an mmu_notifier release: their notifier reference
 * is dropped by kvmx_put_work (not from inside the release callback). */
static LIST_HEAD(kvmx_zombies);
static void kvmx_put_workfn(struct work_struct *work);
static DECLARE_WORK(kvmx_put_work, kvmx_put_workfn);
static unsigned long kvmx_bound;        /* bit 0: a device is bound */
/* f_op of /proc/<pid>/mem files, from /proc/self/mem opened at load. */
static const struct file_operations *kvmx_proc_mem_fops;

static const struct file_operations kvmx_fops;
static const struct mmu_notifier_ops kvmx_mn_ops;

/* ---- device requests (kvmx_lock held) ---------------------------------- */

static struct kvmx_chan_req *kvmx_req_init(struct kvmx_dev *d, u32 op, u64 id)
{
	struct kvmx_chan_req *r = d->req;

	memset(r, 0, KVMX_REQ_HDR);
	r->op = op;
	r->id = id;
	return r;
}

/* Send the request in d->req with `next` extents; returns 0 or -errno. */
static int kvmx_submit(struct kvmx_dev *d, unsigned int next)
{
	struct kvmx_chan_req *r = d->req;
	u32 len = KVMX_REQ_HDR + next * sizeof(struct kvmx_chan_extent);
	u32 reg;
	s32 st;

	lockdep_assert_held(&kvmx_lock);
	if (d->dead)
		return -ENODEV;
	r->len = len;
	r->count = next;
	r->status = KVMX_STATUS_PENDING;
	/* iowrite32 orders the buffer writes before the doorbell. */
	iowrite32(lower_32_bits(d->req_dma), d->bar + KVMX_CHAN_REG_REQ_LO);
	iowrite32(upper_32_bits(d->req_dma), d->bar + KVMX_CHAN_REG_REQ_HI);
	iowrite32(len, d->bar + KVMX_CHAN_REG_DOORBELL);
	/* Done when the write returns; the read flushes a posted write. */
	reg = ioread32(d->bar + KVMX_CHAN_REG_STATUS);
	dma_rmb();
	st = READ_ONCE(r->status);
	if (st == KVMX_STATUS_PENDING)  /* the device did not touch the header */
		st = (s32)reg;
	if (st > 0 || st < -MAX_ERRNO)
		st = -EIO;
	return st;
}

static int kvmx_reset(struct kvmx_dev *d)
{
	kvmx_req_init(d, KVMX_CHAN_OP_RESET, 0);
	return kvmx_submit(d, 0);
}

/* ---- entries ------------------------------------------------------------- */

static void kvmx_unpin(struct kvmx_entry *e)
{
	if (e->pages) {
		unpin_user_pages(e->pages, e->npages);
		kvfree(e->pages);
		e->pages = NULL;
	}
}

/*
 * Charge e's pages to mm->locked_vm (mm_users held, no kvmx_lock): within
 * the target's RLIMIT_MEMLOCK, or beyond it for a caller with CAP_IPC_LOCK
 * or CAP_SYS_ADMIN (asked only when the limit is hit).
 */
static int kvmx_charge(struct kvmx_entry *e, struct kvmx_target *t)
{
	int ret;

	if (mmap_write_lock_killable(t->mm))
		return -EINTR;
	ret = __account_locked_vm(t->mm, e->npages, true, t->task, false);
	if (ret == -ENOMEM && (capable(CAP_IPC_LOCK) || capable(CAP_SYS_ADMIN)))
		ret = __account_locked_vm(t->mm, e->npages, true, t->task, true);
	mmap_write_unlock(t->mm);
	if (!ret)
		e->charged = e->npages;
	return ret;
}

/* Return the charge.  mm is e's, alive: mm_users held by the caller, or
 * the release callback runs for it (exit_mmap, no mmap_lock held). */
static void kvmx_uncharge(struct kvmx_entry *e, struct mm_struct *mm)
{
	if (!e->charged)
		return;
	mmap_write_lock(mm);
	__account_locked_vm(mm, e->charged, false, current, false);
	mmap_write_unlock(mm);
	e->charged = 0;
}

/* After the device dropped it (or never had it) and it is unpinned. */
static void kvmx_entry_free(struct kvmx_entry *e)
{
	if (e->pages) {
		/* The device may still protect these frames: never free them. */
		pr_err("leaking %lu pinned pages of entry %llu\n", e->npages, e->id);
		e->pages = NULL;
	}
	if (e->charged)
		pr_err("entry %llu freed with %lu pages charged\n", e->id, e->charged);
	put_pid(e->pid);
	kvfree(e->ext);
	kfree(e);
}

/* Tell the device to drop e, then unpin.  If the device refuses, the pages
 * stay pinned for good: freeing a frame the host still protects would
 * corrupt whoever gets it next. */
static int kvmx_entry_stop(struct kvmx_dev *d, struct kvmx_entry *e)
{
	int st;

	lockdep_assert_held(&kvmx_lock);
	kvmx_req_init(d, e->kind == KVMX_KIND_PROTECT ? KVMX_CHAN_OP_UNPROTECT :
		      KVMX_CHAN_OP_TRACK_STOP, e->id);
	st = kvmx_submit(d, 0);
	if (st == -ENOENT) {
		pr_warn("device did not know entry %llu\n", e->id);
		st = 0;
	}
	return st;
}

static struct kvmx_entry *kvmx_find(struct mm_struct *mm, u32 kind,
				    u64 addr, u64 len)
{
	struct kvmx_entry *e;

	list_for_each_entry(e, &kvmx_entries, node)
		if (e->mm == mm && e->kind == kind && e->addr == addr &&
		    e->len == len)
			return e;
	return NULL;
}

static bool kvmx_overlaps(struct mm_struct *mm, u32 kind, u64 addr, u64 len)
{
	struct kvmx_entry *e;

	list_for_each_entry(e, &kvmx_entries, node)
		if (e->mm == mm && e->kind == kind &&
		    addr < e->addr + e->len && e->addr < addr + len)
			return true;
	return false;
}

/* Live entries created by euid (kvmx_lock held). */
static unsigned int kvmx_user_entries(kuid_t euid)
{
	struct kvmx_entry *e;
	unsigned int n = 0;

	list_for_each_entry(e, &kvmx_entries, node)
		n += uid_eq(e->creator_euid, euid);
	return n;
}

/* The opener of kf and the caller, as one viewer. */
static void kvmx_viewer_get(const struct kvmx_file *kf, struct kvmx_viewer *v)
{
	v->euid = uid_eq(current_euid(), kf->euid) ? kf->euid : INVALID_UID;
	v->all = kf->admin && capable(CAP_SYS_ADMIN);
}

/* May v see an entry (or event) whose owner had euid owner? */
static bool kvmx_sees(const struct kvmx_viewer *v, kuid_t owner)
{
	return v->all || (uid_valid(owner) && uid_eq(owner, v->euid));
}

/*
 * Is [addr, addr + len) all private anonymous memory of mm (mmap_lock
 * held)?  A protection acts on frames, so it must never reach a frame that
 * another process maps too: shared anonymous memory, memfd, SysV shm,
 * tmpfs and other files are shared by design, hugetlbfs pages are shared
 * or reserved pool pages, special mappings belong to the kernel.  Private
 * anonymous pages are the target's own once FOLL_WRITE has broken COW,
 * KSM and zero-page sharing, and a fork copies pinned ones.  Holes are
 * EFAULT (as the pinning would say), anything else EOPNOTSUPP.
 */
static int kvmx_check_vmas(struct mm_struct *mm, u64 addr, u64 len)
{
	struct vm_area_struct *vma;
	u64 end = addr + len;

	mmap_assert_locked(mm);
	while (addr < end) {
		vma = vma_lookup(mm, addr);
		if (!vma)
			return -EFAULT;
		if (!vma_is_anonymous(vma) || (vma->vm_flags & VM_SHARED) ||
		    is_vm_hugetlb_page(vma) ||
		    (vma->vm_flags & (VM_IO | VM_PFNMAP | VM_MIXEDMAP)))
			return -EOPNOTSUPP;
		addr = vma->vm_end;
	}
	return 0;
}

/* Pin the range of e in mm (mm_users held by the caller). */
static int kvmx_pin(struct kvmx_entry *e, struct mm_struct *mm)
{
	unsigned long done = 0;
	long n;
	int ret = 0;

	e->pages = kvmalloc_array(e->npages, sizeof(*e->pages), GFP_KERNEL);
	if (!e->pages)
		return -ENOMEM;
	if (mmap_read_lock_killable(mm)) {
		ret = -EINTR;
		goto fail;
	}
	/* Under the same mmap_lock as the pinning: no mapping can change in
	 * between (pin_user_pages_remote without `locked` never drops it). */
	ret = kvmx_check_vmas(mm, e->addr, e->len);
	while (!ret && done < e->npages) {
		/* FOLL_WRITE: break COW and zero-page sharing, so the frames
		 * are the target's own; FOLL_LONGTERM: keep them where they
		 * are (no ZONE_MOVABLE/CMA frames). */
		n = pin_user_pages_remote(mm, e->addr + (done << PAGE_SHIFT),
					  e->npages - done,
					  FOLL_WRITE | FOLL_LONGTERM,
					  e->pages + done, NULL);
		if (n <= 0) {
			ret = n ? (int)n : -EFAULT;
			break;
		}
		done += n;
		if (fatal_signal_pending(current)) {
			ret = -EINTR;
			break;
		}
	}
	mmap_read_unlock(mm);
	if (!ret)
		return 0;
fail:
	unpin_user_pages(e->pages, done);
	kvfree(e->pages);
	e->pages = NULL;
	return ret;
}

/* Coalesce the pinned frames into extents in d->req; keeps a copy in e. */
static int kvmx_build_extents(struct kvmx_dev *d, struct kvmx_entry *e)
{
	struct kvmx_chan_extent *x = (struct kvmx_chan_extent *)(d->req + 1);
	unsigned int n = 0;
	unsigned long i;

	for (i = 0; i < e->npages; i++) {
		u64 gpa = page_to_phys(e->pages[i]);

		if (n && x[n - 1].gpa + x[n - 1].len == gpa) {
			x[n - 1].len += PAGE_SIZE;
			continue;
		}
		if (n == d->max_extents)
			return -E2BIG;
		x[n].gpa = gpa;
		x[n].len = PAGE_SIZE;
		n++;
	}
	e->ext = kvmalloc_array(n, sizeof(*x), GFP_KERNEL);
	if (!e->ext)
		return -ENOMEM;
	memcpy(e->ext, x, n * sizeof(*x));
	e->next = n;
	return 0;
}

/* The owner's address of gpa, if gpa lies in e. */
static bool kvmx_gpa_to_addr(const struct kvmx_entry *e, u64 gpa, u64 *addr)
{
	u64 off = 0;
	unsigned int i;

	for (i = 0; i < e->next; i++) {
		const struct kvmx_chan_extent *x = &e->ext[i];

		if (gpa >= x->gpa && gpa - x->gpa < x->len) {
			*addr = e->addr + off + (gpa - x->gpa);
			return true;
		}
		off += x->len;
	}
	return false;
}

/* ---- mmu notifier: the target's mm goes away ----------------------------- */

static void kvmx_mn_release(struct mmu_notifier *mn, struct mm_struct *mm)
{
	struct kvmx_entry *e, *tmp;
	bool queued = false;
	int st;

	/* From exit_mmap (no mmap_lock held), before the pages are freed. */
	mutex_lock(&kvmx_lock);
	list_for_each_entry_safe(e, tmp, &kvmx_entries, node) {
		if (e->mn != mn)
			continue;
		/* The device first, then unpin. */
		st = kvmx_entry_stop(kvmx_cur, e);
		if (st)
			pr_err("releasing entry %llu at exit failed: %d\n", e->id, st);
		else
			kvmx_unpin(e);
		/* kvmx_lock -> mmap_lock; exit_mmap holds no mmap_lock yet. */
		kvmx_uncharge(e, mm);
		list_move_tail(&e->node, &kvmx_zombies);
		kvmx_nentries--;
		queued = true;
	}
	if (queued)
		schedule_work(&kvmx_put_work);
	mutex_unlock(&kvmx_lock);
}

static struct mmu_notifier *kvmx_mn_alloc(struct mm_struct *mm)
{
	struct mmu_notifier *mn = kzalloc(sizeof(*mn), GFP_KERNEL);

	return mn ? mn : ERR_PTR(-ENOMEM);
}

static void kvmx_mn_free(struct mmu_notifier *mn)
{
	kfree(mn);
}

static const struct mmu_notifier_ops kvmx_mn_ops = {
	.release = kvmx_mn_release,
	.alloc_notifier = kvmx_mn_alloc,
	.free_notifier = kvmx_mn_free,
};

static void kvmx_put_workfn(struct work_struct *work)
{
	struct kvmx_entry *e, *tmp;
	LIST_HEAD(list);

	mutex_lock(&kvmx_lock);
	list_splice_init(&kvmx_zombies, &list);
	mutex_unlock(&kvmx_lock);
	list_for_each_entry_safe(e, tmp, &list, node) {
		list_del(&e->node);
		mmu_notifier_put(e->mn);
		kvmx_entry_free(e);
	}
}

/* ---- the target process ------------------------------------------------- */

static void kvmx_target_put(struct kvmx_target *t)
{
	/* Never under kvmx_lock: a last mmput runs exit_mmap -> release. */
	if (t->mm)
		mmput(t->mm);
	put_pid(t->pid);
	if (t->task)
		put_task_struct(t->task);
	t->mm = NULL;
	t->pid = NULL;
	t->task = NULL;
}

/* mem_fd must be a /proc/<pid>/mem file whose mm is task's. */
static int kvmx_check_mem_fd(struct task_struct *task, int mem_fd,
			     struct mm_struct **mmp)
{
	struct mm_struct *mm;
	struct file *f;
	int ret = 0;

	if (mem_fd < 0)
		return -EPERM;
	f = fget(mem_fd);
	if (!f)
		return -EBADF;
	if (!kvmx_proc_mem_fops || f->f_op != kvmx_proc_mem_fops) {
		ret = -EPERM;
		goto out;
	}
	mm = get_task_mm(task);
	/* __mem_open (fs/proc/base.c) keeps the mm it checked in private_data. */
	if (!mm || mm != READ_ONCE(f->private_data)) {
		if (mm)
			mmput(mm);
		ret = -EPERM;
		goto out;
	}
	*mmp = mm;
out:
	fput(f);
	return ret;
}

static int kvmx_target_get(s32 pid, s32 mem_fd, struct kvmx_target *t)
{
	struct task_struct *task;
	struct pid *p;
	int ret;

	t->mm = NULL;
	t->pid = NULL;
	t->task = NULL;
	if (pid < 0)
		return -EINVAL;
	if (pid == 0 || pid == task_tgid_vnr(current)) {
		/* The caller itself: no further check. */
		t->mm = get_task_mm(current);
		if (!t->mm)
			return -ESRCH;
		t->pid = get_task_pid(current, PIDTYPE_TGID);
		t->task = get_task_struct(current);
		t->euid = task_euid(current);
		return 0;
	}
	/* Another process: only through its /proc/<pid>/mem, which the
	 * kernel let the caller open with PTRACE_MODE_ATTACH. */
	p = find_get_pid(pid);
	task = p ? get_pid_task(p, PIDTYPE_PID) : NULL;
	put_pid(p);
	if (!task)
		return -ESRCH;
	t->task = task;
	ret = kvmx_check_mem_fd(task, mem_fd, &t->mm);
	if (!ret) {
		t->pid = get_task_pid(task, PIDTYPE_TGID);
		t->euid = task_euid(task);
		if (!t->pid)            /* exiting */
			ret = -ESRCH;
	}
	if (ret)
		kvmx_target_put(t);
	return ret;
}

/* ---- ioctls -------------------------------------------------------------- */

static int kvmx_check_range(u64 addr, u64 len)
{
	u64 end;

	if (!len || !PAGE_ALIGNED(addr) || !PAGE_ALIGNED(len) ||
	    len > KVMX_MAX_RANGE_BYTES)
		return -EINVAL;
	if (check_add_overflow(addr, len, &end))
		return -EINVAL;
	if (end > TASK_SIZE_MAX)
		return -EFAULT;
	return 0;
}

/* The file's device, if it is still the bound one (kvmx_lock held). */
static struct kvmx_dev *kvmx_live(struct kvmx_file *kf)
{
	lockdep_assert_held(&kvmx_lock);
	return kf->dev == kvmx_cur && !kf->dev->dead ? kf->dev : NULL;
}

/* May an entry like that be added now?  kvmx_lock held.  *admin caches
 * capable(CAP_SYS_ADMIN), asked only when the per-user limit is hit. */
static int kvmx_may_add(struct kvmx_file *kf, struct mm_struct *mm, u32 kind,
			u64 addr, u64 len, kuid_t creator, int *admin)
{
	lockdep_assert_held(&kvmx_lock);
	if (!kvmx_live(kf))
		return -ENODEV;
	if (kvmx_overlaps(mm, kind, addr, len))
		return -EEXIST;
	if (kvmx_nentries >= KVMX_MAX_PROTECTIONS)
		return -ENOSPC;
	if (kvmx_user_entries(creator) >= KVMX_USER_MAX_ENTRIES) {
		if (*admin < 0)
			*admin = capable(CAP_SYS_ADMIN);
		if (!*admin)
			return -ENOSPC;
	}
	return 0;
}

/* PROTECT / TRACK_START: returns 0 and the new id, or -errno. */
static int kvmx_add(struct kvmx_file *kf, struct kvmx_target *t, u32 kind,
		    u64 addr, u64 len, u32 access, u32 action, u64 *idp)
{
	kuid_t creator = current_euid();
	struct mmu_notifier *mn;
	struct kvmx_chan_req *r;
	struct kvmx_entry *e;
	struct kvmx_dev *d;
	int admin = -1;
	int ret;

	e = kzalloc(sizeof(*e), GFP_KERNEL);
	if (!e)
		return -ENOMEM;
	e->kind = kind;
	e->access = access;
	e->action = action;
	e->addr = addr;
	e->len = len;
	e->npages = len >> PAGE_SHIFT;
	e->owner_euid = t->euid;
	e->creator_euid = creator;
	e->mm = t->mm;
	/* Takes the target's mmap_lock for writing: before kvmx_lock. */
	mn = mmu_notifier_get(&kvmx_mn_ops, t->mm);
	if (IS_ERR(mn)) {
		kfree(e);
		return PTR_ERR(mn);
	}
	e->mn = mn;

	/* Fail early, before charging and pinning. */
	mutex_lock(&kvmx_lock);
	ret = kvmx_may_add(kf, t->mm, kind, addr, len, creator, &admin);
	mutex_unlock(&kvmx_lock);
	if (ret)
		goto free;
	/* Without kvmx_lock: a slow fault delays no other request. */
	ret = kvmx_charge(e, t);
	if (ret)
		goto free;
	ret = kvmx_pin(e, t->mm);
	if (ret)
		goto free;

retry:
	mutex_lock(&kvmx_lock);
	/* Again: others may have added entries meanwhile. */
	ret = kvmx_may_add(kf, t->mm, kind, addr, len, creator, &admin);
	if (ret)
		goto unlock;
	d = kvmx_live(kf);
	r = kvmx_req_init(d, kind == KVMX_KIND_PROTECT ? KVMX_CHAN_OP_PROTECT :
			  KVMX_CHAN_OP_TRACK_START, 0);
	ret = kvmx_build_extents(d, e);
	if (ret)
		goto unlock;
	e->id = ++kvmx_last_id;
	r->id = e->id;
	r->access = access;
	r->action = action;
	r->pid = pid_nr(t->pid);
	r->vaddr = addr;
	ret = kvmx_submit(d, e->next);
	if (ret == -EAGAIN) {
		/* The device rate-limits changes of the guest's memory map
		 * (per guest): wait for a token without kvmx_lock. */
		mutex_unlock(&kvmx_lock);
		kvfree(e->ext);
		e->ext = NULL;
		if (msleep_interruptible(KVMX_THROTTLE_MS) ||
		    signal_pending(current)) {
			ret = -EINTR;
			goto free;
		}
		goto retry;
	}
	if (ret)
		goto unlock;
	e->pid = get_pid(t->pid);
	list_add_tail(&e->node, &kvmx_entries);
	kvmx_nentries++;
	*idp = e->id;
	mutex_unlock(&kvmx_lock);
	return 0;

unlock:
	mutex_unlock(&kvmx_lock);
free:
	kvmx_unpin(e);          /* the device never had it */
	kvmx_uncharge(e, t->mm);
	mmu_notifier_put(mn);
	kvmx_entry_free(e);
	return ret;
}

/* UNPROTECT / TRACK_STOP.  t passed kvmx_target_get (the caller itself, or
 * a /proc/<pid>/mem fd of the target): only t's own entries are found. */
static int kvmx_del(struct kvmx_file *kf, struct kvmx_target *t, u32 kind,
		    u64 addr, u64 len)
{
	struct kvmx_entry *e;
	struct kvmx_dev *d;
	int ret;

	mutex_lock(&kvmx_lock);
	d = kvmx_live(kf);
	if (!d) {
		mutex_unlock(&kvmx_lock);
		return -ENODEV;
	}
	e = kvmx_find(t->mm, kind, addr, len);
	if (!e) {
		mutex_unlock(&kvmx_lock);
		return -ENOENT;
	}
	ret = kvmx_entry_stop(d, e);
	if (ret) {
		/* Still protected at the host: keep it pinned and listed. */
		mutex_unlock(&kvmx_lock);
		pr_err("device refused to drop entry %llu: %d\n", e->id, ret);
		return ret;
	}
	list_del(&e->node);
	kvmx_nentries--;
	mutex_unlock(&kvmx_lock);
	kvmx_unpin(e);
	kvmx_uncharge(e, t->mm);        /* t->mm == e->mm, mm_users held */
	mmu_notifier_put(e->mn);
	kvmx_entry_free(e);
	return 0;
}

static long kvmx_ioc_protect(struct kvmx_file *kf, struct kvmx_protect __user *up)
{
	struct kvmx_target t;
	struct kvmx_protect p;
	u64 id = 0;
	int ret;

	if (copy_from_user(&p, up, sizeof(p)))
		return -EFAULT;
	if (p.size != sizeof(p) || p.flags)
		return -EINVAL;
	if (p.access != KVMX_ACCESS_RO && p.access != KVMX_ACCESS_NONE)
		return -EINVAL;
	if (p.action < KVMX_ACTION_DENY || p.action > KVMX_ACTION_KILL_VM)
		return -EINVAL;
	ret = kvmx_check_range(p.addr, p.len);
	if (ret)
		return ret;
	/* A violation would stop every process of the guest. */
	if (p.action == KVMX_ACTION_KILL_VM && !capable(CAP_SYS_ADMIN))
		return -EPERM;
	ret = kvmx_target_get(p.pid, p.mem_fd, &t);
	if (ret)
		return ret;
	ret = kvmx_add(kf, &t, KVMX_KIND_PROTECT, p.addr, p.len, p.access,
		       p.action, &id);
	if (!ret && put_user(id, &up->id)) {
		/* The caller cannot learn the id: undo. */
		kvmx_del(kf, &t, KVMX_KIND_PROTECT, p.addr, p.len);
		ret = -EFAULT;
	}
	kvmx_target_put(&t);
	return ret;
}

static long kvmx_ioc_range(struct kvmx_file *kf, unsigned int cmd,
			   struct kvmx_range __user *up)
{
	struct kvmx_target t;
	struct kvmx_range r;
	u64 id;
	int ret;

	if (copy_from_user(&r, up, sizeof(r)))
		return -EFAULT;
	if (r.size != sizeof(r) || r.flags)
		return -EINVAL;
	ret = kvmx_check_range(r.addr, r.len);
	if (ret)
		return ret;
	ret = kvmx_target_get(r.pid, r.mem_fd, &t);
	if (ret)
		return ret;
	switch (cmd) {
	case KVMX_G_UNPROTECT:
		ret = kvmx_del(kf, &t, KVMX_KIND_PROTECT, r.addr, r.len);
		break;
	case KVMX_G_TRACK_START:
		ret = kvmx_add(kf, &t, KVMX_KIND_TRACK, r.addr, r.len, 0, 0, &id);
		break;
	case KVMX_G_TRACK_STOP:
		ret = kvmx_del(kf, &t, KVMX_KIND_TRACK, r.addr, r.len);
		break;
	default:
		ret = -ENOTTY;
	}
	kvmx_target_put(&t);
	return ret;
}

static long kvmx_ioc_track_dirty(struct kvmx_file *kf,
				 struct kvmx_range __user *up)
{
	struct kvmx_chan_req *req;
	struct kvmx_target t;
	struct kvmx_entry *e;
	struct kvmx_range r;
	struct kvmx_dev *d;
	unsigned long npages, *bits = NULL;
	size_t need;
	dma_addr_t dma;
	void *buf;
	int ret;

	if (copy_from_user(&r, up, sizeof(r)))
		return -EFAULT;
	if (r.size != sizeof(r) || r.flags)
		return -EINVAL;
	ret = kvmx_check_range(r.addr, r.len);
	if (ret)
		return ret;
	npages = r.len >> PAGE_SHIFT;
	need = DIV_ROUND_UP(npages, 8);
	if (r.bitmap_len < need)
		return -EINVAL;
	if (!r.bitmap)
		return -EFAULT;
	ret = kvmx_target_get(r.pid, r.mem_fd, &t);
	if (ret)
		return ret;
	bits = kvzalloc(BITS_TO_LONGS(npages) * sizeof(long), GFP_KERNEL);
	if (!bits) {
		ret = -ENOMEM;
		goto out;
	}

retry:
	mutex_lock(&kvmx_lock);
	d = kvmx_live(kf);
	e = d ? kvmx_find(t.mm, KVMX_KIND_TRACK, r.addr, r.len) : NULL;
	if (!e) {
		ret = d ? -ENOENT : -ENODEV;
		goto unlock;
	}
	buf = dma_alloc_coherent(&d->pdev->dev, need, &dma, GFP_KERNEL);
	if (!buf) {
		ret = -ENOMEM;
		goto unlock;
	}
	req = kvmx_req_init(d, KVMX_CHAN_OP_TRACK_READ, e->id);
	req->pid = pid_nr(e->pid);
	req->vaddr = e->addr;
	req->out_gpa = dma;
	req->out_len = need;
	ret = kvmx_submit(d, 0);
	if (!ret)
		memcpy(bits, buf, need);
	dma_free_coherent(&d->pdev->dev, need, buf, dma);
unlock:
	mutex_unlock(&kvmx_lock);
	if (ret == -EAGAIN) {
		/* The device bounds the time reads take (per guest). */
		if (msleep_interruptible(KVMX_THROTTLE_MS) ||
		    signal_pending(current)) {
			ret = -EINTR;
			goto out;
		}
		goto retry;
	}
	if (ret)
		goto out;

	/* Bits past the last page are not the caller's business. */
	if (npages % 8)
		((u8 *)bits)[need - 1] &= (1u << (npages % 8)) - 1;
	r.dirty = bitmap_weight(bits, npages);
	if (copy_to_user(u64_to_user_ptr(r.bitmap), bits, need) ||
	    put_user(r.dirty, &up->dirty))
		ret = -EFAULT;
out:
	kvfree(bits);
	kvmx_target_put(&t);
	return ret;
}

static long kvmx_ioc_list(struct kvmx_file *kf, struct kvmx_list __user *up)
{
	struct kvmx_prot_info *info = NULL;
	struct kvmx_viewer v;
	struct kvmx_entry *e;
	struct kvmx_list l;
	u32 total = 0, n = 0, cap;
	long ret = 0;

	if (copy_from_user(&l, up, sizeof(l)))
		return -EFAULT;
	if (l.size != sizeof(l) || l.flags || l.pid < 0)
		return -EINVAL;
	cap = min_t(u32, l.count, KVMX_MAX_PROTECTIONS);
	if (cap) {
		info = kvcalloc(cap, sizeof(*info), GFP_KERNEL);
		if (!info)
			return -ENOMEM;
	}
	kvmx_viewer_get(kf, &v);
	mutex_lock(&kvmx_lock);
	if (!kvmx_live(kf)) {
		mutex_unlock(&kvmx_lock);
		kvfree(info);
		return -ENODEV;
	}
	list_for_each_entry(e, &kvmx_entries, node) {
		pid_t vpid = pid_vnr(e->pid);

		if (!kvmx_sees(&v, e->owner_euid))
			continue;       /* not counted either */
		if (l.pid && vpid != l.pid)
			continue;
		total++;
		if (n == cap)
			continue;
		info[n].id = e->id;
		info[n].addr = e->addr;
		info[n].len = e->len;
		info[n].pid = vpid;
		info[n].kind = e->kind;
		info[n].access = e->access;
		info[n].action = e->action;
		info[n].violations = e->violations;
		n++;
	}
	mutex_unlock(&kvmx_lock);
	if (n && copy_to_user(u64_to_user_ptr(l.entries), info,
			      n * sizeof(*info)))
		ret = -EFAULT;
	else if (put_user(total, &up->count))
		ret = -EFAULT;
	kvfree(info);
	return ret;
}

static long kvmx_ioctl(struct file *f, unsigned int cmd, unsigned long arg)
{
	struct kvmx_file *kf = f->private_data;
	void __user *up = (void __user *)arg;

	switch (cmd) {
	case KVMX_G_API_VERSION:
		return KVMX_GUEST_API_VERSION;
	case KVMX_G_PROTECT:
		return kvmx_ioc_protect(kf, up);
	case KVMX_G_UNPROTECT:
	case KVMX_G_TRACK_START:
	case KVMX_G_TRACK_STOP:
		return kvmx_ioc_range(kf, cmd, up);
	case KVMX_G_TRACK_DIRTY:
		return kvmx_ioc_track_dirty(kf, up);
	case KVMX_G_LIST:
		return kvmx_ioc_list(kf, up);
	default:
		return -ENOTTY;
	}
}

/* ---- events -------------------------------------------------------------- */

static void kvmx_send_segv(struct kvmx_entry *e, u64 addr)
{
	struct kernel_siginfo info;
	struct task_struct *task;

	task = get_pid_task(e->pid, PIDTYPE_TGID);
	if (!task)
		return;
	/* Not after an exec: the new program is not the owner. */
	if (READ_ONCE(task->mm) == e->mm) {
		clear_siginfo(&info);
		info.si_signo = SIGSEGV;
		info.si_errno = 0;
		info.si_code = SEGV_ACCERR;
		info.si_addr = (void __user *)(uintptr_t)addr;
		send_sig_info(SIGSEGV, &info, task);
	}
	put_task_struct(task);
}

static void kvmx_handle_event(struct kvmx_dev *d,
			      const struct kvmx_chan_event *ce)
{
	struct kvmx_event ev = {
		.seq = ce->seq,
		.id = ce->id,
		.gpa = ce->gpa,
		.access = ce->access,
		.action = ce->action,
		.len = ce->len,
		.time_ns = ce->time_ns,
	};
	kuid_t owner = INVALID_UID;     /* no entry: CAP_SYS_ADMIN only */
	struct kvmx_entry *e;
	u64 addr;

	list_for_each_entry(e, &kvmx_entries, node) {
		if (e->id != ce->id)
			continue;
		e->violations++;
		owner = e->owner_euid;
		ev.pid = pid_nr(e->pid);
		if (kvmx_gpa_to_addr(e, ce->gpa, &addr)) {
			ev.addr = addr;
			/* Before the event is visible: a reader that saw
			 * the event can rely on the signal being pending. */
			if (ce->action == KVMX_ACTION_SIGNAL)
				kvmx_send_segv(e, addr);
		}
		break;
	}
	spin_lock(&d->ev_lock);
	d->ev_ring[d->ev_head % KVMX_RING_EVENTS].ev = ev;
	d->ev_ring[d->ev_head % KVMX_RING_EVENTS].owner = owner;
	d->ev_head++;
	spin_unlock(&d->ev_lock);
}

static void kvmx_drain_events(struct kvmx_dev *d)
{
	const u32 max = KVMX_EVBUF_SIZE / sizeof(struct kvmx_chan_event);
	struct kvmx_chan_req *r;
	bool any = false;
	u32 n, i;
	int round, st;

	mutex_lock(&kvmx_lock);
	for (round = 0; round < KVMX_EVENT_ROUNDS && !d->dead; round++) {
		r = kvmx_req_init(d, KVMX_CHAN_OP_EVENTS, 0);
		r->out_gpa = d->evbuf_dma;
		r->out_len = KVMX_EVBUF_SIZE;
		st = kvmx_submit(d, 0);
		if (st) {
			pr_warn_ratelimited("EVENTS request failed: %d\n", st);
			break;
		}
		n = min(READ_ONCE(r->count), max);
		if (!n)
			break;
		for (i = 0; i < n; i++)
			kvmx_handle_event(d, &d->evbuf[i]);
		any = true;
	}
	mutex_unlock(&kvmx_lock);
	if (any)
		wake_up_interruptible_all(&d->ev_wait);
}

static irqreturn_t kvmx_irq(int irq, void *data)
{
	struct kvmx_dev *d = data;
	u32 isr = ioread32(d->bar + KVMX_CHAN_REG_ISR);    /* read clears */

	if (isr == ~0u)                 /* the device is gone */
		return IRQ_NONE;
	if (!d->msi && !(isr & KVMX_CHAN_ISR_EVENTS))
		return IRQ_NONE;        /* INTx: someone else's */
	return IRQ_WAKE_THREAD;
}

static irqreturn_t kvmx_irq_thread(int irq, void *data)
{
	kvmx_drain_events(data);
	return IRQ_HANDLED;
}

/* ---- /dev/kvmx ------------------------------------------------------------ */

static void kvmx_dev_free(struct kref *kref)
{
	struct kvmx_dev *d = container_of(kref, struct kvmx_dev, kref);

	kvfree(d->ev_ring);
	kfree(d);
}

static int kvmx_open(struct inode *inode, struct file *f)
{
	/* misc_open set private_data and holds misc_mtx, so a concurrent
	 * remove has not dropped its reference yet. */
	struct kvmx_dev *d = container_of(f->private_data, struct kvmx_dev, misc);
	struct kvmx_file *kf;

	kf = kzalloc(sizeof(*kf), GFP_KERNEL);
	if (!kf)
		return -ENOMEM;
	kf->dev = d;
	kf->euid = current_euid();
	kf->admin = capable(CAP_SYS_ADMIN);
	mutex_init(&kf->read_lock);
	kref_get(&d->kref);
	spin_lock(&d->ev_lock);
	kf->pos = d->ev_head;           /* only events after open */
	spin_unlock(&d->ev_lock);
	f->private_data = kf;
	return stream_open(inode, f);
}

static int kvmx_release(struct inode *inode, struct file *f)
{
	struct kvmx_file *kf = f->private_data;

	kref_put(&kf->dev->kref, kvmx_dev_free);
	mutex_destroy(&kf->read_lock);
	kfree(kf);
	return 0;
}

/* The oldest event from pos still in the ring (ev_lock held). */
static u64 kvmx_ev_first(struct kvmx_dev *d, u64 pos)
{
	lockdep_assert_held(&d->ev_lock);
	if (d->ev_head - pos > KVMX_RING_EVENTS)        /* overrun: skip */
		pos = d->ev_head - KVMX_RING_EVENTS;
	return pos;
}

/* Is there an event for v after kf's cursor? */
static bool kvmx_ev_ready(struct kvmx_file *kf, const struct kvmx_viewer *v,
			  bool *dead)
{
	struct kvmx_dev *d = kf->dev;
	bool ready = false;
	u64 pos;

	spin_lock(&d->ev_lock);
	for (pos = kvmx_ev_first(d, READ_ONCE(kf->pos)); pos != d->ev_head; pos++)
		if (kvmx_sees(v, d->ev_ring[pos % KVMX_RING_EVENTS].owner)) {
			ready = true;
			break;
		}
	*dead = d->dead;
	spin_unlock(&d->ev_lock);
	return ready;
}

static ssize_t kvmx_read(struct file *f, char __user *buf, size_t count,
			 loff_t *ppos)
{
	struct kvmx_file *kf = f->private_data;
	struct kvmx_dev *d = kf->dev;
	struct kvmx_event *tmp;
	size_t want = count / sizeof(struct kvmx_event), n;
	struct kvmx_viewer v;
	u64 pos;
	bool dead;
	ssize_t ret;

	if (!want)
		return -EINVAL;
	want = min_t(size_t, want, KVMX_READ_BATCH);
	tmp = kmalloc_array(want, sizeof(*tmp), GFP_KERNEL);
	if (!tmp)
		return -ENOMEM;
	kvmx_viewer_get(kf, &v);
	if (mutex_lock_interruptible(&kf->read_lock)) {
		kfree(tmp);
		return -ERESTARTSYS;
	}
	for (;;) {
		/* Collect the events v may see; skip the others. */
		n = 0;
		spin_lock(&d->ev_lock);
		for (pos = kvmx_ev_first(d, kf->pos);
		     pos != d->ev_head && n < want; pos++) {
			const struct kvmx_ev_slot *sl =
				&d->ev_ring[pos % KVMX_RING_EVENTS];

			if (kvmx_sees(&v, sl->owner))
				tmp[n++] = sl->ev;
		}
		dead = d->dead;
		spin_unlock(&d->ev_lock);
		if (n)
			break;
		WRITE_ONCE(kf->pos, pos);       /* past the invisible ones */
		if (dead) {
			ret = 0;
			goto out;
		}
		if (f->f_flags & O_NONBLOCK) {
			ret = -EAGAIN;
			goto out;
		}
		if (wait_event_interruptible(d->ev_wait,
					     kvmx_ev_ready(kf, &v, &dead) || dead)) {
			ret = -ERESTARTSYS;
			goto out;
		}
	}
	if (copy_to_user(buf, tmp, n * sizeof(*tmp))) {
		ret = -EFAULT;
		goto out;
	}
	WRITE_ONCE(kf->pos, pos);
	ret = n * sizeof(*tmp);
out:
	mutex_unlock(&kf->read_lock);
	kfree(tmp);
	return ret;
}

static __poll_t kvmx_poll(struct file *f, poll_table *wait)
{
	struct kvmx_file *kf = f->private_data;
	struct kvmx_viewer v;
	__poll_t mask = 0;
	bool dead;

	poll_wait(f, &kf->dev->ev_wait, wait);
	kvmx_viewer_get(kf, &v);
	if (kvmx_ev_ready(kf, &v, &dead))
		mask |= EPOLLIN | EPOLLRDNORM;
	if (dead)
		mask |= EPOLLHUP | EPOLLERR;
	return mask;
}

static const struct file_operations kvmx_fops = {
	.owner = THIS_MODULE,
	.open = kvmx_open,
	.release = kvmx_release,
	.read = kvmx_read,
	.poll = kvmx_poll,
	.unlocked_ioctl = kvmx_ioctl,
	.compat_ioctl = compat_ptr_ioctl,
};

/* ---- PCI ------------------------------------------------------------------ */

static void kvmx_hw_free(struct kvmx_dev *d)
{
	struct pci_dev *pdev = d->pdev;

	if (d->irq > 0)
		free_irq(d->irq, d);
	pci_free_irq_vectors(pdev);
	if (d->evbuf)
		dma_free_coherent(&pdev->dev, KVMX_EVBUF_SIZE, d->evbuf,
				  d->evbuf_dma);
	if (d->req)
		dma_free_coherent(&pdev->dev, d->req_size, d->req, d->req_dma);
	d->evbuf = NULL;
	d->req = NULL;
	if (d->bar)
		pci_iounmap(pdev, d->bar);
	d->bar = NULL;
	pci_clear_master(pdev);
	pci_release_regions(pdev);
	pci_disable_device(pdev);
}

static int kvmx_probe(struct pci_dev *pdev, const struct pci_device_id *id)
{
	struct kvmx_dev *d;
	u32 magic, version, max_req;
	int ret;

	if (test_and_set_bit(0, &kvmx_bound)) {
		pr_err("%s: only one kvmx-chan device is supported\n", pci_name(pdev));
		return -EBUSY;
	}
	d = kzalloc(sizeof(*d), GFP_KERNEL);
	if (!d) {
		ret = -ENOMEM;
		goto err_bound;
	}
	kref_init(&d->kref);
	d->pdev = pdev;
	spin_lock_init(&d->ev_lock);
	init_waitqueue_head(&d->ev_wait);
	d->ev_ring = kvcalloc(KVMX_RING_EVENTS, sizeof(*d->ev_ring), GFP_KERNEL);
	if (!d->ev_ring) {
		ret = -ENOMEM;
		goto err_free;
	}

	ret = pci_enable_device(pdev);
	if (ret)
		goto err_free;
	ret = pci_request_regions(pdev, "kvmx_guest");
	if (ret) {
		pci_disable_device(pdev);
		goto err_free;
	}
	if (!(pci_resource_flags(pdev, 0) & IORESOURCE_MEM) ||
	    pci_resource_len(pdev, 0) < KVMX_CHAN_REG_MAX_REQ + 4) {
		pr_err("%s: BAR0 is not a 4 KiB MMIO BAR\n", pci_name(pdev));
		ret = -ENODEV;
		goto err_hw;
	}
	d->bar = pci_iomap(pdev, 0, 0);
	if (!d->bar) {
		ret = -ENOMEM;
		goto err_hw;
	}
	magic = ioread32(d->bar + KVMX_CHAN_REG_MAGIC);
	version = ioread32(d->bar + KVMX_CHAN_REG_VERSION);
	max_req = ioread32(d->bar + KVMX_CHAN_REG_MAX_REQ);
	if (magic != KVMX_CHAN_MAGIC || version != KVMX_CHAN_VERSION) {
		pr_err("%s: magic %#x version %u, want %#x version %u\n",
		       pci_name(pdev), magic, version, KVMX_CHAN_MAGIC, KVMX_CHAN_VERSION);
		ret = -ENODEV;
		goto err_hw;
	}
	if (max_req < KVMX_REQ_HDR + sizeof(struct kvmx_chan_extent)) {
		pr_err("%s: MAX_REQ %u is too small\n", pci_name(pdev), max_req);
		ret = -ENODEV;
		goto err_hw;
	}
	d->req_size = min_t(size_t, max_req, KVMX_REQ_CAP);
	d->max_extents = (d->req_size - KVMX_REQ_HDR) /
			 sizeof(struct kvmx_chan_extent);
	ret = dma_set_mask_and_coherent(&pdev->dev, DMA_BIT_MASK(64));
	if (ret)
		goto err_hw;
	pci_set_master(pdev);
	d->req = dma_alloc_coherent(&pdev->dev, d->req_size, &d->req_dma,
				    GFP_KERNEL);
	d->evbuf = dma_alloc_coherent(&pdev->dev, KVMX_EVBUF_SIZE,
				      &d->evbuf_dma, GFP_KERNEL);
	if (!d->req || !d->evbuf) {
		ret = -ENOMEM;
		goto err_hw;
	}

	ret = pci_alloc_irq_vectors(pdev, 1, 1, PCI_IRQ_MSI | PCI_IRQ_INTX);
	if (ret < 0)
		goto err_hw;
	d->msi = pdev->msi_enabled;
	ret = pci_irq_vector(pdev, 0);
	if (ret < 0)
		goto err_hw;
	/* INTx: the primary handler reads (and so clears) ISR, which lowers
	 * the line, so no IRQF_ONESHOT is needed and sharing works. */
	ret = request_threaded_irq(ret, kvmx_irq, kvmx_irq_thread,
				   d->msi ? 0 : IRQF_SHARED, "kvmx_guest", d);
	if (ret)
		goto err_hw;
	d->irq = pci_irq_vector(pdev, 0);

	mutex_lock(&kvmx_lock);
	ret = kvmx_reset(d);
	if (!ret)
		kvmx_cur = d;
	mutex_unlock(&kvmx_lock);
	if (ret) {
		pr_err("%s: RESET failed: %d\n", pci_name(pdev), ret);
		ret = -EIO;
		goto err_hw;
	}
	pci_set_drvdata(pdev, d);

	d->misc.minor = MISC_DYNAMIC_MINOR;
	d->misc.name = KVMX_GUEST_DEVICE_NAME;
	d->misc.fops = &kvmx_fops;
	d->misc.mode = devmode;
	d->misc.parent = &pdev->dev;
	ret = misc_register(&d->misc);
	if (ret) {
		mutex_lock(&kvmx_lock);
		kvmx_cur = NULL;
		mutex_unlock(&kvmx_lock);
		goto err_hw;
	}
	pr_info("%s: kvmx-chan v%u, %s, requests up to %zu bytes (%u extents), /dev/%s mode %04o\n",
		pci_name(pdev), version, d->msi ? "MSI" : "INTx", d->req_size,
		d->max_extents, KVMX_GUEST_DEVICE_NAME, devmode);
	return 0;

err_hw:
	kvmx_hw_free(d);
err_free:
	kref_put(&d->kref, kvmx_dev_free);
err_bound:
	clear_bit(0, &kvmx_bound);
	return ret;
}

static void kvmx_remove(struct pci_dev *pdev)
{
	struct kvmx_dev *d = pci_get_drvdata(pdev);
	struct kvmx_entry *e, *tmp;
	LIST_HEAD(gone);
	int st;

	misc_deregister(&d->misc);      /* no new opens */

	mutex_lock(&kvmx_lock);
	st = kvmx_reset(d);             /* the device first */
	if (st)
		pr_err("RESET at remove failed: %d\n", st);
	spin_lock(&d->ev_lock);
	d->dead = true;
	spin_unlock(&d->ev_lock);
	list_for_each_entry_safe(e, tmp, &kvmx_entries, node) {
		if (!st)
			kvmx_unpin(e);  /* else kvmx_entry_free leaks them */
		list_move_tail(&e->node, &gone);
	}
	kvmx_nentries = 0;
	kvmx_cur = NULL;
	mutex_unlock(&kvmx_lock);
	wake_up_interruptible_all(&d->ev_wait);

	list_for_each_entry_safe(e, tmp, &gone, node) {
		list_del(&e->node);
		/* An mm without users is in exit_mmap: the charge goes with it.
		 * mmput here may run that exit_mmap: kvmx_lock is not held. */
		if (e->charged && mmget_not_zero(e->mm)) {
			kvmx_uncharge(e, e->mm);
			mmput(e->mm);
		}
		e->charged = 0;
		mmu_notifier_put(e->mn);
		kvmx_entry_free(e);
	}
	kvmx_hw_free(d);                /* free_irq waits for the thread */
	kref_put(&d->kref, kvmx_dev_free);
	clear_bit(0, &kvmx_bound);
}

static const struct pci_device_id kvmx_pci_ids[] = {
	{ PCI_DEVICE(KVMX_CHAN_VENDOR_ID, KVMX_CHAN_DEVICE_ID) },
	{ }
};
MODULE_DEVICE_TABLE(pci, kvmx_pci_ids);

static struct pci_driver kvmx_pci_driver = {
	.name = "kvmx_guest",
	.id_table = kvmx_pci_ids,
	.probe = kvmx_probe,
	.remove = kvmx_remove,
};

static int __init kvmx_init(void)
{
	struct file *f;
	int ret;

	/* Remember what a /proc/<pid>/mem file looks like. */
	f = filp_open("/proc/self/mem", O_RDONLY, 0);
	if (IS_ERR(f)) {
		pr_warn("cannot open /proc/self/mem (%ld): requests for other processes will fail with EPERM\n",
			PTR_ERR(f));
	} else {
		kvmx_proc_mem_fops = f->f_op;
		filp_close(f, NULL);
	}
	ret = pci_register_driver(&kvmx_pci_driver);
	if (ret)
		pr_err("pci_register_driver: %d\n", ret);
	return ret;
}

static void __exit kvmx_exit(void)
{
	pci_unregister_driver(&kvmx_pci_driver);  /* releases everything */
	flush_work(&kvmx_put_work);
	mmu_notifier_synchronize();     /* free_notifier is our code */
}

module_init(kvmx_init);
module_exit(kvmx_exit);

MODULE_DESCRIPTION("kvmx guest memory protection and dirty tracking (kvmx-chan)");
MODULE_AUTHOR("kvmx");
MODULE_LICENSE("GPL");
