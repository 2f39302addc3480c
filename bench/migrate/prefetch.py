#!/usr/bin/python3
"""Post-copy prefetch, side by side in one run (issue 12, item 6).

Two patched QEMUs under TCG, in two network namespaces joined by a veth
pair capped with tc tbf at --mbit (both directions), a Debian 6.12 guest
with 1 GiB of RAM and a 256 MiB file-backed, flush-hinted NVDIMM.  For
each workload W1-W4 (tests/lib/migwork.py; kvmx-memwalk over a 256 MiB
buffer) and each variant, one migration that switches to post-copy at
once; the guest starts its walk when it runs on the destination.

  off           post-copy as QEMU 10.0 does it (vanilla)
  off-preempt   QEMU 10.0 with postcopy-preempt
  pattern       postcopy-prefetch, mode pattern
  page-table    postcopy-prefetch, mode page-table
  both          postcopy-prefetch, mode both
  both-preempt  both, with postcopy-preempt

"off" is the patched QEMU with the capability off: Debian's QEMU 10.0
aborts migrations under TCG (the bug qemu-patches/00-fixes fixes), and
with the capability off the series does not change how DRAM post-copies.

Per run: faults that waited on the network (the source's postcopy-requests:
one per fault on a page that was not there, predicted or not) as a share
of the pages the workload touched; the destination's vCPU blocktime; the
workload's walk time; total migration time, bytes, and total time over
bytes / link rate; prefetch hits, late hits, waste.  Then the issue's
goals, met or not.  Writes results/<stamp>.{json,txt,png}.

Usage: bench/migrate/prefetch.py [--mbit 400] [--mib 256]
       [--mem 1G] [--workloads W1,W2,W3,W4] [--variants off,...]
       [--repeat N]
       bench/migrate/prefetch.py --report results/STAMP.json
           (recompute a run's summary, goals and plot)
"""
import argparse
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, 'tests', 'lib'))
sys.path.insert(0, os.path.dirname(HERE))
import benchlib  # noqa: E402
import kvmxtest  # noqa: E402
import kvmxvm  # noqa: E402
import migwork  # noqa: E402
import netns  # noqa: E402

VARIANTS = {
    'off': {},
    'off-preempt': {'preempt': True},
    'pattern': {'prefetch': 'pattern'},
    'page-table': {'prefetch': 'page-table'},
    'both': {'prefetch': 'both'},
    'both-preempt': {'prefetch': 'both', 'preempt': True},
}


def med(runs, key):
    vals = [r[key] for r in runs if key in r]
    return statistics.median(vals) if vals else None


def derive(r, mbit):
    pages = r.get('pages') or 1
    p = r.get('prefetch') or {}
    # Faults that waited on the network: one page request each, whether
    # the page had been predicted (a late hit) or not.  Remote faults: the
    # ones nothing had asked for yet (for the variants without prefetch,
    # all of them).
    r['fault_share'] = r['requests'] / pages
    r['remote'] = p.get('remote-faults', r['requests']) if p else \
        r['requests']
    r['remote_share'] = r['remote'] / pages
    link_bytes_per_s = mbit * 1e6 / 8
    r['time_over_wire'] = (r['total_ms'] / 1000) / (r['bytes'] /
                                                     link_bytes_per_s)
    asked = p.get('pages-prefetched', 0)
    r['waste_share'] = p.get('pages-wasted', 0) / asked if asked else None
    r['late_share'] = p.get('late-hits', 0) / asked if asked else None
    return r


def summarize(res):
    """Medians per (workload, variant)."""
    out = {}
    for r in res['runs']:
        out.setdefault((r['workload'], r['variant']), []).append(r)
    table = {}
    for (wl, v), runs in out.items():
        table[f'{wl}/{v}'] = {
            k: med(runs, k) for k in ('fault_share', 'requests', 'remote',
                                      'remote_share',
                                      'blocktime_ms', 'walk_ms', 'total_ms',
                                      'bytes', 'time_over_wire',
                                      'waste_share', 'late_share')}
        table[f'{wl}/{v}']['ok'] = all(
            r['status'] == 'completed' and r.get('bad') == 0 for r in runs)
    return table


def goals(t):
    """The issue's goals, each (text, value, met) where the runs allow."""
    g = []

    def get(wl, v, k):
        return (t.get(f'{wl}/{v}') or {}).get(k)

    def fewer(wl, v, base, want, what):
        for key, name in (('remote', 'remote (unpredicted)'),
                          ('requests', 'network-waiting (incl. late hits)')):
            a, b = get(wl, v, key), get(wl, base, 'requests')
            if a is None or b is None or not b:
                continue
            red = 1 - a / b
            g.append((f'{wl} {v}: {what} {want:.0%} fewer {name} faults '
                      f'than {base}', f'{red:.0%} fewer ({a:.0f} vs '
                      f'{b:.0f})', red >= want))

    fewer('W2', 'page-table', 'off', 0.85, 'at least')
    fewer('W1', 'pattern', 'off', 0.70, 'at least')
    fewer('W3', 'pattern', 'off', 0.70, 'at least')
    for k, v in t.items():
        if v.get('waste_share') is not None and '/off' not in k:
            g.append((f'{k}: at most 15% of prefetched pages unused',
                      f"{v['waste_share']:.1%}", v['waste_share'] <= 0.15))
    for wl in ('W2', 'W3'):
        a = get(wl, 'both-preempt', 'blocktime_ms')
        b = get(wl, 'off-preempt', 'blocktime_ms')
        if a is not None and b:
            g.append((f'{wl}: blocktime at least 3x lower than stock preempt',
                      f'{b / max(a, 1):.2f}x ({a:.0f} vs {b:.0f} ms)',
                      b >= 3 * a))
    for v in ('both', 'both-preempt'):
        a, b = get('W4', v, 'walk_ms'), get('W4', 'off', 'walk_ms')
        if a is not None and b:
            g.append((f'W4 {v}: workload time within 5% of stock',
                      f'{a / b:.2f}x ({a:.0f} vs {b:.0f} ms)',
                      a <= 1.05 * b))
    worst = max((v['time_over_wire'] for v in t.values()
                 if v.get('time_over_wire')), default=None)
    if worst:
        g.append(('total migration time within 1.1x of bytes / link rate',
                  f'worst {worst:.2f}x', worst <= 1.1))
    return g


def report(res):
    t = res['summary']
    lines = [f"post-copy prefetch, {res['machine']['cpu']}, "
             f"{res['machine']['cores']} cores, kernel "
             f"{res['machine']['kernel']}",
             f"link: {res['link']}; guest {res.get('mem', '1G')} + 256 MiB "
             f"NVDIMM, "
             f"{res['mib']} MiB buffer; medians of {res['repeat']} run(s)",
             f"command: {res['command']}", '',
             f"{'run':<24}{'ok':>3}{'remote':>8}{'share':>8}"
             f"{'net waits':>10}{'share':>8}"
             f"{'blocktime':>11}{'walk':>8}{'total':>8}{'MiB':>6}"
             f"{'t/wire':>8}{'late':>7}{'waste':>7}"]
    for k, v in t.items():
        def pct(x):
            return f'{x:.0%}' if x is not None else '-'
        lines.append(
            f"{k:<24}{'y' if v['ok'] else 'N':>3}{v['remote']:>8.0f}"
            f"{v['remote_share']:>8.2%}{v['requests']:>10.0f}"
            f"{v['fault_share']:>8.2%}{v['blocktime_ms']:>9.0f}ms"
            f"{v['walk_ms'] or 0:>6.0f}ms{v['total_ms'] / 1000:>7.1f}s"
            f"{v['bytes'] / 2**20:>6.0f}{v['time_over_wire']:>8.2f}"
            f"{pct(v['late_share']):>7}{pct(v['waste_share']):>7}")
    lines += ['', 'goals (issue 12, item 6):']
    for text, value, met in res['goals']:
        lines.append(f"  [{'met' if met else 'NOT met'}] {text}: {value}")
    return '\n'.join(lines)


def plot(res, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    t = res['summary']
    wls = sorted({k.split('/')[0] for k in t})
    vs = [v for v in VARIANTS if any(k.endswith('/' + v) for k in t)]
    fig, axes = plt.subplots(1, 4, figsize=(19, 4.2))
    for ax, key, title, scale in (
            (axes[0], 'remote_share', 'remote (unpredicted) faults, '
             '% of pages touched', 100),
            (axes[1], 'fault_share', 'faults that waited on the network '
             '(incl. late hits), %', 100),
            (axes[2], 'blocktime_ms', 'vCPU blocktime after the switch (ms)',
             1),
            (axes[3], 'walk_ms', 'workload time during post-copy (ms)', 1)):
        w = 0.8 / max(len(vs), 1)
        for i, v in enumerate(vs):
            ys = [((t.get(f'{wl}/{v}') or {}).get(key) or 0) * scale
                  for wl in wls]
            ax.bar([j + i * w for j in range(len(wls))], ys, w, label=v)
        ax.set_xticks([j + 0.4 - w / 2 for j in range(len(wls))])
        ax.set_xticklabels(wls)
        ax.set_title(title, fontsize=9)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--mbit', type=int, default=400)
    ap.add_argument('--mib', type=int, default=256)
    ap.add_argument('--mem', default='1G', help='guest RAM')
    ap.add_argument('--workloads', default='W1,W2,W3,W4')
    ap.add_argument('--variants', default=','.join(VARIANTS))
    ap.add_argument('--repeat', type=int, default=1)
    ap.add_argument('--report', metavar='JSON',
                    help='recompute the summary, goals and plot of a '
                    'results file, without running anything')
    a = ap.parse_args()
    if a.report:
        import json
        res = json.load(open(a.report))
        for r in res['runs']:
            derive(r, res['mbit'])
        res['summary'] = summarize(res)
        res['goals'] = goals(res['summary'])
        benchlib.save(res, HERE, report, plot)
        return 0
    why = netns.CappedLink.unavailable()
    if why:
        print(f'prefetch bench: {why}', file=sys.stderr)
        return 77
    kvmxtest.require_guest_image()
    qemu = kvmxvm.patched_qemu()
    work = kvmxtest.workdir('bench-prefetch-')
    res = benchlib.new_results(mbit=a.mbit, mib=a.mib, mem=a.mem,
                               repeat=a.repeat,
                               runs=[])
    port = 4500
    with netns.CappedLink(mbit=a.mbit) as link:
        res['link'] = link.describe()
        for rep in range(a.repeat):
            for wl in a.workloads.split(','):
                for v in a.variants.split(','):
                    variant = dict(VARIANTS[v], name=v)
                    port += 1
                    r = migwork.run(qemu, work, link, wl, variant,
                                    mib=a.mib, mem=a.mem, nvdimm=True,
                                    port=port)
                    derive(r, a.mbit)
                    print(migwork.summary(r), flush=True)
                    res['runs'].append(r)
    res['summary'] = summarize(res)
    res['goals'] = goals(res['summary'])
    benchlib.save(res, HERE, report, plot)
    return 0


if __name__ == '__main__':
    sys.exit(main())
