#!/usr/bin/python3
"""Post-copy with prefetch (issue 12, items 2 and 5): two patched QEMUs
under TCG in two network namespaces, over TCP on a veth pair capped at
400 Mbit/s, a Debian 6.12 guest with a file-backed, flush-hinted NVDIMM.
The guest runs a workload while post-copy fetches its memory, and checks
its data on the destination:

 W1  sequential scan of a 256 MiB buffer          (pattern predictor)
 W2  the same in guest-virtual order, its pages
     scattered in guest-physical memory           (page-table predictor)
 W3  strided scan                                 (both)
 W4  uniform random access                        (both)
 W5  records appended and fsynced to a file on the DAX-mounted NVDIMM
     during the migration: every record is there afterwards

Each run must complete with the guest's data intact and the prefetch
accounting consistent: predictions were made and served faults, nothing
is held after post-copy, and hits plus waste never exceed what was asked
for.  The speed of it all is bench/migrate's business
(docs/benchmarks.md), not this test's.
"""
import os
import sys
import traceback

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'lib'))
import kvmxtest  # noqa: E402
import kvmxvm  # noqa: E402
import migwork  # noqa: E402
import netns  # noqa: E402

check = kvmxtest.Checks()

RUNS = [
    ('W1', {'name': 'pattern', 'prefetch': 'pattern'}),
    ('W2', {'name': 'page-table', 'prefetch': 'page-table'}),
    ('W3', {'name': 'both', 'prefetch': 'both'}),
    ('W4', {'name': 'both-preempt', 'prefetch': 'both', 'preempt': True}),
    ('W5', {'name': 'both', 'prefetch': 'both'}),
]


def main():
    kvmxtest.require_guest_image()
    why = netns.CappedLink.unavailable()
    if why:
        print(f'SKIP: {why}')
        return 77
    qemu = kvmxvm.patched_qemu()
    work = kvmxtest.workdir('prefetch-')
    with netns.CappedLink(mbit=400) as link:
        print(f'link: {link.describe()}')
        for i, (wl, variant) in enumerate(RUNS):
            name = f"{wl} {variant['name']}"
            try:
                r = migwork.run(qemu, work, link, wl, variant, mib=256,
                                nvdimm=True, port=4444 + i)
            except Exception as e:      # noqa: BLE001 (QEMU died, ...)
                # Reported (kvmxvm printed both QEMUs' last words); the
                # other runs still go.
                traceback.print_exc()
                check(False, f'{name}: the run raised '
                      f'{type(e).__name__}: {e}')
                continue
            print(migwork.summary(r), flush=True)
            check(r['status'] == 'completed' and r['dst_running'],
                  f"{name}: post-copy completed, the guest runs on the "
                  f"destination ({r['status']} {r['error']})")
            if wl == 'W5':
                check(r['w5_wrote'] > 200 and
                      r['w5_have'] == r['w5_wrote'] and
                      r['w5_last'] == r['w5_wrote'] - 1,
                      f"{name}: every fsynced record is on the NVDIMM "
                      f"({r['w5_have']} of {r['w5_wrote']}, last "
                      f"{r['w5_last']})")
            else:
                check(r['bad'] == 0 and r['guest_rc'] == 0 and
                      r['walked'] == r['pages'],
                      f"{name}: the guest read all {r['pages']} pages back "
                      f"intact ({r['bad']} bad)")
            p = r['prefetch']
            check(bool(p), f'{name}: the destination reports prefetch')
            if not p:
                continue
            asked = p['pages-prefetched']
            used = p['hits'] + p['late-hits']
            check(p['cache-bytes'] == 0 and
                  used + p['pages-wasted'] <= asked,
                  f'{name}: nothing held after post-copy; hits and waste '
                  f'within the {asked} pages asked for ({used} used, '
                  f"{p['pages-wasted']} wasted)")
            if wl == 'W1':
                check(p['pattern-pages'] > 0 and used > 0,
                      f"{name}: the pattern predictor served faults "
                      f"({p['pattern-pages']} asked, {used} used)")
            if wl == 'W2':
                check(p['page-table-entries'] >= r['pages'] and
                      r['pt_pages_sent'] > 0,
                      f"{name}: the source sent page tables first "
                      f"({r['pt_pages_sent']}) and the destination indexed "
                      f"the buffer's entries ({p['page-table-entries']} for "
                      f"{r['pages']} pages)")
                check(p['page-table-pages'] > 0 and used > 0,
                      f"{name}: the page-table predictor served faults "
                      f"({p['page-table-pages']} asked, {used} used)")
    return check.finish(work)


if __name__ == '__main__':
    sys.exit(main())
