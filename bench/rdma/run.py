#!/usr/bin/python3
"""One-sided RDMA READ against a TCP request/reply for 4 KiB page fetch
(issue 15), side by side in one run, on soft-RoCE.

The host has no RDMA device, so this boots the two Debian 6.12 TCG guests
of tests/integration/test_rdma_transport.py (A exports memory, B reads
it; an rdma_rxe device on each virtio-net NIC, the NICs wired to each
other) and runs `kvmx-rdma-bench fetch` on B against A's serve:

  latency   --samples fetches of a random page, one at a time, alternating
            RDMA READ and a TCP request/reply on the same link (p50, p99);
            the TCP reply path is what post-copy's preempt channel does: a
            dedicated socket with nothing queued in front of the page
  bulk      every page of the --mib region once, --depth in flight
            (READs, or pipelined TCP requests)
  source    CPU time of A's serving process and of A's whole machine
            (/proc/stat) per page fetched, and how many page requests A's
            process answered during the READ phase (must be 0)
  register  what pinning costs on A (Exporter::expose, per GiB) for touched
            and untouched anonymous memory, memfd and a file mapping
  stale     the staleness probes of docs/design/rdma.md

Writes results/<stamp>.{json,txt,png}.  Usage: bench/rdma/run.py
[--mib N] [--samples N].  Needs scripts/build and scripts/mkguest --nested.
"""
import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, 'tests', 'lib'))
sys.path.insert(0, os.path.join(ROOT, 'tests', 'integration'))
sys.path.insert(0, os.path.dirname(HERE))
import benchlib  # noqa: E402
import kvmxtest  # noqa: E402
import test_rdma_transport as pair  # noqa: E402


def ratio(a, b):
    return a / b if b else float('nan')


def report(res):
    f, reg = res['fetch'], res.get('register') or {}
    lines = [f"RDMA page fetch, {f['device']} (soft-RoCE) between two TCG "
             f"guests; {f['samples']} latency samples, {f['region_mib']} MiB "
             f"bulk at depth {f['depth']}",
             f"machine: {res['machine']['cpu']}, {res['machine']['cores']} "
             f"cores; command: {res['command']}", '',
             f"{'':38} {'RDMA READ':>12} {'TCP':>12} {'READ/TCP':>9}"]

    def row(name, a, b, fmt='{:12.0f}'):
        lines.append(f'{name:38} {fmt.format(a)} {fmt.format(b)} '
                     f'{ratio(a, b):9.3f}')
    row('4 KiB fetch p50 (us)', f['rdma_read_us']['p50'], f['tcp_us']['p50'])
    row('4 KiB fetch p99 (us)', f['rdma_read_us']['p99'], f['tcp_us']['p99'])
    row('bulk (pages/s)', f['bulk_rdma_pages_per_s'],
        f['bulk_tcp_pages_per_s'])
    row('source process CPU per page (ns)',
        f['server_cpu_ns_per_page_rdma'], f['server_cpu_ns_per_page_tcp'])
    row('source machine CPU per page (ns)',
        f['server_machine_cpu_ns_per_page_rdma'],
        f['server_machine_cpu_ns_per_page_tcp'])
    row('page requests the source answered', f['server_pages_served_rdma'],
        f['server_pages_served_tcp'])
    lines.append(f"pages with wrong content: {f['bad_pages']}")
    lines.append('')
    lines.append('registration on A (ms per GiB; RSS growth KiB):')
    for k, v in sorted(reg.items()):
        if isinstance(v, dict):
            if 'ms_per_gib' in v:
                lines.append(f"  {k:40} {v['ms_per_gib']:10.0f} "
                             f"{v.get('rss_growth_kib', 0):10}")
            else:
                lines.append(f'  {k:40} {v}')
    lines.append('')
    lines.append('staleness probes (source writes after registration):')
    for k, v in sorted(f['stale'].items()):
        lines.append(f"  {k:40} {'STALE (old bytes)' if v['stale'] else 'fresh'}")
    return '\n'.join(lines)


def plot(res, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    f = res['fetch']
    fig, ax = plt.subplots(1, 3, figsize=(12, 3.6))
    names = ['RDMA READ', 'TCP']
    p50 = [f['rdma_read_us']['p50'], f['tcp_us']['p50']]
    p99 = [f['rdma_read_us']['p99'], f['tcp_us']['p99']]
    x = range(2)
    ax[0].bar([i - 0.2 for i in x], p50, 0.4, label='p50')
    ax[0].bar([i + 0.2 for i in x], p99, 0.4, label='p99')
    ax[0].set_xticks(list(x), names)
    ax[0].set_ylabel('µs')
    ax[0].set_title('4 KiB fetch latency')
    ax[0].legend()
    ax[1].bar(names, [f['bulk_rdma_pages_per_s'], f['bulk_tcp_pages_per_s']])
    ax[1].set_title(f"bulk, {f['depth']} in flight (pages/s)")
    ax[2].bar([i - 0.2 for i in x], [f['server_cpu_ns_per_page_rdma'],
                                     f['server_cpu_ns_per_page_tcp']],
              0.4, label='source process')
    ax[2].bar([i + 0.2 for i in x],
              [f['server_machine_cpu_ns_per_page_rdma'],
               f['server_machine_cpu_ns_per_page_tcp']],
              0.4, label='source machine (rxe in softirq)')
    ax[2].set_xticks(list(x), names)
    ax[2].set_title('source CPU per page (ns)')
    ax[2].legend(fontsize=7)
    fig.suptitle('soft-RoCE under TCG: ratios only')
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--mib', type=int, default=64,
                    help='MiB A exports, all fetched in the bulk phase')
    ap.add_argument('--samples', type=int, default=2000,
                    help='latency samples of each kind')
    a = ap.parse_args()
    if not 1 <= a.mib <= 512 or not 10 <= a.samples <= 100000:
        ap.error('--mib 1..512, --samples 10..100000')
    work = kvmxtest.workdir('bench-rdma-')
    t0 = time.monotonic()
    ra, rb, ta, tb = pair.run_pair(work, mib=a.mib, samples=a.samples)
    fetch = pair.parse_json(tb, 'RDMA-FETCH-JSON')
    if ra != 0 or rb != 0 or fetch is None:
        print(f'the guests failed (A {ra}, B {rb}); consoles in {work}',
              file=sys.stderr)
        return 1
    res = benchlib.new_results(fetch=fetch,
                               register=pair.parse_json(ta, 'SERVE-REGISTER'),
                               wall_s=round(time.monotonic() - t0))
    benchlib.save(res, HERE, report, plot)
    return 0 if fetch['bad_pages'] == 0 else 2


if __name__ == '__main__':
    sys.exit(main())
