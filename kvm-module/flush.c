// SPDX-License-Identifier: GPL-2.0-only
/*
 * kvmx.ko: the host flush behind a guest write to a flush hint page, with
 * group commit, and its counters.
 *
 * Group commit.  A guest write (a "guest flush") must not complete before
 * a host flush that *started after the write arrived* has finished: only
 * such a flush is sure to see every store the guest made before it.  Host
 * flushes of one attachment run one at a time (fl->run) and are numbered:
 * fl->started counts those begun, fl->done those finished.  A guest flush
 * that arrives when `started` is S needs flush number S + 1 (or later):
 *
 *   1. target = started + 1                   (under fl->lock)
 *   2. take fl->run; whoever holds it is the only one flushing, so here
 *      started == done
 *   3. if done >= target, a flush that began after we arrived has already
 *      finished: we are covered, nothing to do;
 *      else run flush number started + 1 == target ourselves (we lead).
 *
 * vCPUs that arrive while flush N runs all get target N + 1 and queue on
 * fl->run; the first of them runs N + 1, which covers every one of them,
 * and the others find done >= N + 1 and leave.  So k concurrent guest
 * flushes cost at most two host flushes, never fewer than correctness
 * needs.
 */
#include <linux/fs.h>
#include <linux/ktime.h>
#include <linux/limits.h>
#include <linux/sched/signal.h>

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
 * Called from the page-track notifier, in the context of the vCPU whose
 * write was emulated (see kvmx_track_write() in attach.c for why it may
 * sleep).  Returns once the write is covered by a finished host flush.
 */
void kvmx_guest_flush(struct kvmx_att *att)
{
	struct kvmx_flusher *fl = &att->fl;
	ktime_t t0 = ktime_get();
	u64 target, ns;
	int r;

	spin_lock(&fl->lock);
	target = fl->started + 1;
	spin_unlock(&fl->lock);

	/*
	 * Killable: a vCPU thread that is being killed stops waiting (its
	 * write then counts as a guest flush that no host flush covered).
	 */
	if (mutex_lock_killable(&fl->run) == 0) {
		/* fl->done only changes under fl->run, which we hold. */
		if (fl->done < target) {
			spin_lock(&fl->lock);
			fl->started++;
			spin_unlock(&fl->lock);

			r = kvmx_host_flush(att);

			spin_lock(&fl->lock);
			fl->done = fl->started;
			fl->host_flushes++;
			if (r)
				fl->host_flush_errors++;
			spin_unlock(&fl->lock);
			atomic64_inc(&kvmx_counters.host_flushes);
			if (r)
				atomic64_inc(&kvmx_counters.host_flush_errors);
		}
		mutex_unlock(&fl->run);
	}

	ns = ktime_to_ns(ktime_sub(ktime_get(), t0));
	spin_lock(&fl->lock);
	fl->guest_flushes++;
	fl->lat_sum_ns += ns;
	if (ns < fl->lat_min_ns)
		fl->lat_min_ns = ns;
	if (ns > fl->lat_max_ns)
		fl->lat_max_ns = ns;
	spin_unlock(&fl->lock);
	atomic64_inc(&kvmx_counters.guest_flushes);
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
	spin_unlock(&fl->lock);
}
