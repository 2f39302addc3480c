// SPDX-License-Identifier: GPL-2.0-only
/*
 * kvmx.ko: the host flush behind a guest write to a flush hint page, with
 * group commit, the error policy, and the counters.
 *
 * Where it runs.  The notifier (kvmx_track_write(), attach.c) runs inside
 * KVM's kvm->srcu read section; a host flush there would make every
 * memslot update of the VM (synchronize_srcu) wait for the disk.  So the
 * notifier only numbers the guest flush and queues a task_work on the
 * vCPU thread; KVM runs it after dropping kvm->srcu and before the vCPU
 * enters the guest again (see the comment at the top of kvmx.h).  The
 * guest therefore still runs no instruction after its write until the
 * flush is done, and sleeping there holds nothing but the vCPU mutex.
 *
 * Group commit.  A guest write (a "guest flush") must not complete before
 * a host flush that *started after the write arrived* has finished: only
 * such a flush is sure to see every store the guest made before it.  Host
 * flushes of one attachment run one at a time (fl->run) and are numbered:
 * fl->started counts those begun, fl->done those finished, fl->last_ok is
 * the number of the last one that succeeded.  A guest flush that arrives
 * (in the notifier) when `started` is S needs flush number S + 1 or later:
 *
 *   1. target = started + 1                   (notifier, under fl->lock)
 *   2. take fl->run (task_work); whoever holds it is the only one
 *      flushing, so here started == done
 *   3. last_ok >= target: a flush that began after we arrived succeeded:
 *      done.  Else done >= target: every flush since we arrived failed:
 *      not done (fails with that flush's errno).  Else we run flush
 *      number started + 1 == target ourselves (we lead), unless the
 *      attachment is failed and stops on errors: then not done, and no
 *      host flush is tried (Linux reports a writeback error once per open
 *      file: a retry would "succeed" without the lost data).
 *
 * vCPUs that arrive while flush N runs all get target N + 1 and queue on
 * fl->run; the first of them runs N + 1, which covers every one of them,
 * and the others find done >= N + 1 and leave.  So k concurrent guest
 * flushes cost at most two host flushes, never fewer than correctness
 * needs.
 *
 * Errors.  A failed host flush latches its errno (fl->error) until
 * KVMX_FHA_CLEAR_ERROR, in every mode, and every guest flush it covered
 * counts as failed.  With KVMX_ATTACH_ERROR_NOTIFY a failed guest flush
 * also signals the attachment's eventfd and sends its signal to the vCPU
 * thread (current): the signal is pending when KVM next checks for work
 * before entering the guest, so KVM_RUN returns -EINTR instead.
 */
#include <linux/eventfd.h>
#include <linux/file.h>
#include <linux/fs.h>
#include <linux/ktime.h>
#include <linux/limits.h>
#include <linux/sched/signal.h>
#include <linux/slab.h>
#include <linux/task_work.h>

#include "kvmx.h"

void kvmx_flusher_init(struct kvmx_flusher *fl)
{
	mutex_init(&fl->run);
	spin_lock_init(&fl->lock);
	fl->lat_min_ns = U64_MAX;
}

/* One host flush, as the attachment's flags ask; 0 or a negative errno. */
static int kvmx_host_flush(struct kvmx_att *att)
{
	int r = 0;

	if (att->flags & KVMX_FLUSH_FDATASYNC) {
		r = vfs_fsync_range(att->backing, 0, LLONG_MAX, 1);
		if (r) {
			pr_warn_ratelimited("kvmx: fdatasync of the backing file failed for gfn 0x%llx: %d\n",
					    (unsigned long long)att->gfn, r);
			return r;
		}
	}
	if (att->flags & KVMX_FLUSH_DEEP) {
		loff_t pos = 0;
		ssize_t n = kernel_write(att->deep_flush, "1", 1, &pos);

		if (n != 1) {
			r = n < 0 ? (int)n : -EIO;
			pr_warn_ratelimited("kvmx: deep flush write failed for gfn 0x%llx: %d\n",
					    (unsigned long long)att->gfn, r);
		}
	}
	return r;
}

/*
 * Steps 2 and 3 above: returns 0 once a host flush numbered target or
 * later has succeeded, a negative errno when the guest flush is not done.
 * *killed is set when the thread was killed while waiting (nothing to
 * notify: it will never run guest code again).
 */
static int kvmx_cover(struct kvmx_att *att, u64 target, bool *killed)
{
	struct kvmx_flusher *fl = &att->fl;
	int r;

	*killed = false;
	if (mutex_lock_killable(&fl->run)) {
		*killed = true;
		return -EINTR;
	}
	/* done, last_ok and last_err change only under fl->run, held here. */
	if (fl->last_ok >= target) {
		r = 0;
	} else if (fl->done >= target) {
		r = fl->last_err;		/* every flush since we came failed */
	} else {
		spin_lock(&fl->lock);
		r = fl->error;
		if (r && (att->flags & KVMX_ATTACH_ERROR_NOTIFY)) {
			spin_unlock(&fl->lock);	/* failed: do not flush */
			goto out;
		}
		fl->started++;
		spin_unlock(&fl->lock);

		r = kvmx_host_flush(att);

		spin_lock(&fl->lock);
		fl->done = fl->started;
		fl->host_flushes++;
		if (r) {
			fl->last_err = r;
			fl->host_flush_errors++;
			if (!fl->error)
				fl->error = r;
		} else {
			fl->last_ok = fl->done;
		}
		spin_unlock(&fl->lock);
		atomic64_inc(&kvmx_counters.host_flushes);
		if (r)
			atomic64_inc(&kvmx_counters.host_flush_errors);
	}
out:
	mutex_unlock(&fl->run);
	return r;
}

/* Count a finished guest flush; tell the user (ERROR_NOTIFY) if not done. */
static void kvmx_guest_flush_end(struct kvmx_att *att, ktime_t t0, int r, bool killed)
{
	struct kvmx_flusher *fl = &att->fl;
	u64 ns = ktime_to_ns(ktime_sub(ktime_get(), t0));

	spin_lock(&fl->lock);
	fl->guest_flushes++;
	if (r)
		fl->failed_flushes++;
	fl->lat_sum_ns += ns;
	if (ns < fl->lat_min_ns)
		fl->lat_min_ns = ns;
	if (ns > fl->lat_max_ns)
		fl->lat_max_ns = ns;
	spin_unlock(&fl->lock);
	atomic64_inc(&kvmx_counters.guest_flushes);
	if (!r)
		return;
	atomic64_inc(&kvmx_counters.failed_flushes);
	if (!(att->flags & KVMX_ATTACH_ERROR_NOTIFY) || killed)
		return;
	if (att->error_ev)
		eventfd_signal(att->error_ev);
	/*
	 * To this thread only (PIDTYPE_PID): the vCPU that wrote.  Pending
	 * and not blocked (KVM_RUN's signal mask), it makes KVM leave with
	 * -EINTR before the next guest entry.
	 */
	send_sig_info(att->error_signal, SEND_SIG_PRIV, current);
}

/* A guest flush waiting for the vCPU thread to leave kvm->srcu. */
struct kvmx_deferred {
	struct callback_head cb;
	struct kvmx_att *att;		/* a reference */
	struct file *kvmx_file;		/* a reference: pins the module */
	u64 target;
	ktime_t t0;
};

static void kvmx_deferred_run(struct callback_head *cb)
{
	struct kvmx_deferred *d = container_of(cb, struct kvmx_deferred, cb);
	bool killed;
	int r;

	r = kvmx_cover(d->att, d->target, &killed);
	kvmx_guest_flush_end(d->att, d->t0, r, killed);
	kvmx_att_put(d->att);
	/*
	 * May be the last reference: fput() defers the release (and the
	 * module reference the file holds) to a later task_work or to a
	 * workqueue, never runs it before we return.
	 */
	fput(d->kvmx_file);
	kfree(d);
}

/*
 * Called from the page-track notifier, in the context of the vCPU whose
 * write was emulated, with kvm->srcu held.  Numbers the guest flush and
 * has the vCPU thread do it before it runs guest code again.
 */
void kvmx_guest_flush(struct kvmx_att *att, struct kvmx_file *kf)
{
	struct kvmx_flusher *fl = &att->fl;
	struct kvmx_deferred *d;
	ktime_t t0 = ktime_get();
	bool killed;
	u64 target;
	int r;

	spin_lock(&fl->lock);
	target = fl->started + 1;
	spin_unlock(&fl->lock);

	/*
	 * At most one per emulated write of a tracked page, freed before the
	 * vCPU enters the guest again (KVM emulates at most 1024 iterations
	 * of a REP string instruction before it re-enters).
	 */
	d = kmalloc(sizeof(*d), GFP_KERNEL_ACCOUNT);
	if (d) {
		/* NULL once the file is being released (its count is 0) */
		d->kvmx_file = get_file_active(&kf->file);
		if (d->kvmx_file) {
			kref_get(&att->ref);
			d->att = att;
			d->target = target;
			d->t0 = t0;
			init_task_work(&d->cb, kvmx_deferred_run);
			if (task_work_add(current, &d->cb, TWA_RESUME) == 0)
				return;
			/* the thread is exiting */
			kvmx_att_put(att);
			fput(d->kvmx_file);
		}
		kfree(d);
	}
	/* Fallback: flush here, inside kvm->srcu. */
	atomic64_inc(&kvmx_counters.inline_flushes);
	r = kvmx_cover(att, target, &killed);
	kvmx_guest_flush_end(att, t0, r, killed);
}

void kvmx_flusher_read(struct kvmx_flusher *fl, struct kvmx_fha_stats *st)
{
	spin_lock(&fl->lock);
	st->guest_flushes = fl->guest_flushes;
	st->host_flushes = fl->host_flushes;
	st->host_flush_errors = fl->host_flush_errors;
	st->latency_min_ns = fl->guest_flushes ? fl->lat_min_ns : 0;
	st->latency_max_ns = fl->lat_max_ns;
	st->latency_avg_ns = fl->guest_flushes ?
		div64_u64(fl->lat_sum_ns, fl->guest_flushes) : 0;
	st->error = fl->error;
	st->failed_flushes = fl->failed_flushes;
	spin_unlock(&fl->lock);
}

/*
 * KVMX_FHA_CLEAR_ERROR.  Only the latch: a flush running now that fails
 * latches again, and a guest flush covered only by failed host flushes
 * stays not done (it is not known to be older than the user's own flush).
 */
void kvmx_flusher_clear_error(struct kvmx_flusher *fl)
{
	spin_lock(&fl->lock);
	fl->error = 0;
	spin_unlock(&fl->lock);
}
