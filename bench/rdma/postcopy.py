#!/usr/bin/python3
"""Post-copy fault cost in QEMU: RDMA READ (postcopy-rdma) against the TCP
return path, vanilla and with postcopy-preempt, side by side in one run
(issue 15, item 5).

The two soft-RoCE guests of tests/integration/test_rdma_postcopy.py (A and
B, Debian 6.12 under TCG, rdma_rxe on NICs wired to each other), each
running the patched QEMU with the freestanding test guest (L2, 128 MiB,
TCG).  Per variant and repetition, fresh guests: L2 fills --mib MiB on A,
A's QEMU migrates it to B over TCP between the rxe NICs with
postcopy-blocktime on B, switching to post-copy at once (precopy 2 MiB/s,
post-copy stream --stream bytes/s), and L2 on B reads the region back,
checking every word.  Measured on B: the wall time of L2's read, QEMU's
post-copy blocktime, the faults (RDMA READs, and page requests A
answered), and blocktime per fault.

  rdma         postcopy-rdma: faults served by RDMA READ
  tcp          stock post-copy: page requests over the return path, pages
               on the main stream behind what is queued there
  tcp-preempt  postcopy-preempt: requested pages on a channel of their own

Writes results/postcopy-<stamp>.{json,txt,png}.  Usage:
bench/rdma/postcopy.py [--mib N] [--reps N] [--stream BYTES_PER_S]
"""
import argparse
import os
import re
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, 'tests', 'lib'))
sys.path.insert(0, os.path.join(ROOT, 'tests', 'integration'))
sys.path.insert(0, os.path.dirname(HERE))
import benchlib  # noqa: E402
import kvmxtest  # noqa: E402
import kvmxvm  # noqa: E402
from test_flush_hint_nested import L1_HELPERS  # noqa: E402
from test_rdma_postcopy import L2, number, section  # noqa: E402
from test_rdma_transport import COMMON, rdma_pair  # noqa: E402

VARIANTS = {
    'rdma': ['postcopy-rdma'],
    'tcp': [],
    'tcp-preempt': ['postcopy-preempt'],
}
REGION = 0x2000000

GUEST_A = COMMON + L1_HELPERS + L2 + r'''
__CAPS__
waitfor /tmp/ser.log "kvmx-testguest ready" 600
echo "fill __REGION__ __BYTES__ 7" >&3
waitfor /tmp/ser.log "ok fill" 900
echo "A-FILLED"
read ack
mon "migrate_set_parameter max-bandwidth 2M" "(qemu)" 60
mon "migrate_set_parameter max-postcopy-bandwidth __STREAM__" "(qemu)" 60
mon "migrate -d tcp:10.77.0.2:4444" "(qemu)" 60
mon "migrate_start_postcopy" "(qemu)" 60
until_mig "Migration status: completed" 1800 && echo "A-COMPLETED"
echo "A-INFO-BEGIN"; tr -d '\r' < /tmp/mon.log; echo "A-INFO-END"
quit_l2
'''

GUEST_B = COMMON + L1_HELPERS + L2.replace('__INCOMING__',
                                           '-incoming defer') + r'''
__CAPS__
mon "migrate_set_capability postcopy-blocktime on" "(qemu)" 60
mon "migrate_incoming tcp:10.77.0.2:4444" "(qemu)" 60
echo "B-LISTENING"
until_mig "Migration status: postcopy-active" 900
__WAIT_RDMA__
t0=$(cut -d' ' -f1 /proc/uptime)
echo "check __REGION__ __BYTES__ 7" >&3
waitfor /tmp/ser.log "ok check" 1800
t1=$(cut -d' ' -f1 /proc/uptime)
sleep 1  # the rest of the line
echo "B-CHECK $(grep 'ok check' /tmp/ser.log | tr -d '\r') t0=$t0 t1=$t1"
until_mig "Migration status: completed" 1800 && echo "B-COMPLETED"
echo "B-INFO-BEGIN"; tr -d '\r' < /tmp/mon.log; echo "B-INFO-END"
quit_l2
'''


def script(text, variant, mib, stream):
    # L2 turns postcopy-rdma on; the TCP variants turn it off again.
    caps = '\n'.join(
        [f'mon "migrate_set_capability postcopy-rdma off" "(qemu)" 60'] +
        [f'mon "migrate_set_capability {c} on" "(qemu)" 60'
         for c in VARIANTS[variant]])
    wait = ('until_mig "postcopy rdma: active" 600' if variant == 'rdma'
            else ':')
    return (text.replace('__CAPS__', caps).replace('__WAIT_RDMA__', wait)
            .replace('__EXTRA_CAPS__', '')
            .replace('__REGION__', hex(REGION))
            .replace('__BYTES__', hex(mib << 20))
            .replace('__STREAM__', str(stream)))


def count(info, label):
    """A counter of 'info migrate' (absent: QEMU printed none, so 0)."""
    return number(info, label) or 0


def run_one(variant, mib, stream):
    work = kvmxtest.workdir(f'bench-rdma-postcopy-{variant}-')
    ga = script(GUEST_A, variant, mib, stream).replace(
        '__ADDR__', '10.77.0.1').replace('__PEER__', '10.77.0.2').replace(
        '__INCOMING__', '')
    gb = script(GUEST_B, variant, mib, stream).replace(
        '__ADDR__', '10.77.0.2').replace('__PEER__', '10.77.0.1')
    with rdma_pair(work, ga, gb, 2400) as (a, b):
        a.wait_console(r'A-FILLED\n', 1200)
        b.wait_console(r'B-LISTENING\n', 300)
        a.send_serial(b'go\n')
        rb = kvmxvm.wait_guest_exit(b, 2400)
        if rb != 0:
            raise RuntimeError(f'{variant}: the script on B failed ({rb}); '
                               f'consoles in {work}')
        ra = kvmxvm.wait_guest_exit(a, 900)
        ta, tb = a.console_text(), b.console_text()
    m = re.search(r'B-CHECK ok check n=(\d+) bad=(\d+) \S+ '
                  r't0=([\d.]+) t1=([\d.]+)', tb)
    ia, ib = section(ta, 'A'), section(tb, 'B')
    if ra or rb or not m or m[2] != '0' or 'B-COMPLETED' not in tb:
        raise RuntimeError(f'{variant}: the run failed (A {ra}, B {rb}, '
                           f'{m[0] if m else "no check"}); consoles in {work}')
    reads = count(ib, 'pages read')
    requests = count(ia, 'postcopy request count')
    blocktime = count(ib, 'postcopy blocktime')
    faults = reads + requests
    return {'variant': variant, 'read_s': float(m[4]) - float(m[3]),
            'pages': int(m[1]), 'rdma_reads': reads,
            'page_requests': requests, 'faults': faults,
            'blocktime_ms': blocktime,
            'blocktime_per_fault_ms': blocktime / faults if faults else None,
            'postcopy_kib': count(ia, 'postcopy ram'),
            'total_ms': count(ia, 'total time')}


def median(rows, key):
    vals = [r[key] for r in rows if r[key] is not None]
    return statistics.median(vals) if vals else None


def report(res):
    lines = [f"Post-copy faults in QEMU on soft-RoCE between two TCG guests "
             f"(L2 reads {res['mib']} MiB; post-copy stream "
             f"{res['stream']} B/s); median of {res['reps']}",
             f"machine: {res['machine']['cpu']}, {res['machine']['cores']} "
             f"cores; command: {res['command']}", '',
             f"{'variant':12} {'read s':>8} {'faults':>7} {'by READ':>8} "
             f"{'requests':>9} {'blocktime ms':>13} {'ms/fault':>9}"]
    s = res['summary']
    for v in VARIANTS:
        r = s[v]
        per = r['blocktime_per_fault_ms']
        lines.append(f"{v:12} {r['read_s']:8.2f} {r['faults']:7.0f} "
                     f"{r['rdma_reads']:8.0f} {r['page_requests']:9.0f} "
                     f"{r['blocktime_ms']:13.0f} "
                     f"{per if per is None else round(per, 3):>9}")
    base = s['tcp-preempt']
    for key, what in (('read_s', 'read time'),
                      ('blocktime_per_fault_ms', 'blocktime per fault')):
        if s['rdma'][key] and base[key]:
            lines.append(f"rdma / tcp-preempt, {what}: "
                         f"{s['rdma'][key] / base[key]:.2f}")
        if s['rdma'][key] and s['tcp'][key]:
            lines.append(f"rdma / tcp, {what}: "
                         f"{s['rdma'][key] / s['tcp'][key]:.2f}")
    return '\n'.join(lines)


def plot(res, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    s = res['summary']
    names = list(VARIANTS)
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.4))
    ax[0].bar(names, [s[v]['read_s'] for v in names])
    ax[0].set_title(f"L2 reads {res['mib']} MiB on B (s)")
    ax[1].bar(names, [s[v]['blocktime_per_fault_ms'] or 0 for v in names])
    ax[1].set_title('vCPU blocktime per fault (ms)')
    fig.suptitle('post-copy faults, soft-RoCE under TCG: ratios only')
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--mib', type=int, default=16, help='MiB L2 reads back')
    ap.add_argument('--reps', type=int, default=1)
    ap.add_argument('--stream', type=int, default=65536,
                    help='max-postcopy-bandwidth, bytes/s')
    a = ap.parse_args()
    if not 1 <= a.mib <= 64 or not 1 <= a.reps <= 10 or a.stream < 4096:
        ap.error('--mib 1..64, --reps 1..10, --stream >= 4096')
    rows = []
    for rep in range(a.reps):
        for v in VARIANTS:
            t0 = time.monotonic()
            r = run_one(v, a.mib, a.stream)
            rows.append(r)
            print(f'{v:12} rep {rep + 1}: {r} ({time.monotonic() - t0:.0f} s)',
                  flush=True)
    summary = {v: {k: median([r for r in rows if r['variant'] == v], k)
                   for k in ('read_s', 'faults', 'rdma_reads',
                             'page_requests', 'blocktime_ms',
                             'blocktime_per_fault_ms')}
               for v in VARIANTS}
    res = benchlib.new_results(mib=a.mib, reps=a.reps, stream=a.stream,
                               runs=rows, summary=summary)
    benchlib.save(res, HERE, report, plot, name='postcopy')
    return 0


if __name__ == '__main__':
    sys.exit(main())
