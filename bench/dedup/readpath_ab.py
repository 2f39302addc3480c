#!/usr/bin/python3
"""Compare builds of the read-path benchmark (bench/dedup/readpath.py
--design paired): each group is a list of result JSONs made with one QEMU
binary, run alternating with the other groups' binaries in one session.

For each workload, the rounds' on/off ratios of every run of a group are
pooled; the report gives the pooled median with a bootstrap 90% interval
of the median, and each run's own median.  A single run's median moves
by +-10% here (see docs/benchmarks.md); pooling alternated runs is what
makes builds comparable.

Usage: bench/dedup/readpath_ab.py \\
           before=results/readpath-A.json,results/readpath-C.json \\
           after=results/readpath-B.json,results/readpath-D.json
Writes results/readpath-ab-<stamp>.{json,txt,png}.
"""
import argparse
import json
import os
import random
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import benchlib  # noqa: E402

WORKLOADS = ('seq-1m', 'seq-4k', 'rand-4k')


def boot_ci(xs, n=2000, seed=1):
    rnd = random.Random(seed)
    meds = sorted(statistics.median(rnd.choices(xs, k=len(xs)))
                  for _ in range(n))
    return meds[int(0.05 * n)], meds[int(0.95 * n)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('groups', nargs='+', metavar='LABEL=JSON[,JSON...]')
    a = ap.parse_args()
    res = benchlib.new_results(groups={})
    for g in a.groups:
        label, _, files = g.partition('=')
        if not files:
            sys.exit(f'{g}: want LABEL=JSON[,JSON...]')
        grp = {'files': files.split(','), 'workloads': {}}
        for w in WORKLOADS:
            pooled, per_run = [], []
            for f in grp['files']:
                s = json.load(open(f))['summary'][w]
                pooled += s['paired_ratios']
                per_run.append(s['paired_ratio'])
            lo, hi = boot_ci(pooled)
            grp['workloads'][w] = {
                'rounds': len(pooled), 'median': statistics.median(pooled),
                'ci90': [lo, hi], 'per_run': per_run, 'pooled': pooled}
        res['groups'][label] = grp
    benchlib.save(res, HERE, report, plot, name='readpath-ab')


def report(res):
    lines = ['tracked/untracked throughput, median of the pooled rounds '
             '(bootstrap 90% interval); per run medians']
    for label, grp in res['groups'].items():
        lines.append(f'{label}: {", ".join(grp["files"])}')
        for w, v in grp['workloads'].items():
            lines.append(
                f'  {w:8s} {v["median"]:.3f} ({v["ci90"][0]:.3f}-'
                f'{v["ci90"][1]:.3f}), {v["rounds"]} rounds; runs '
                + ' '.join(f'{x:.3f}' for x in v['per_run']))
    return '\n'.join(lines)


def plot(res, path):
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        print('no matplotlib: no plot')
        return
    labels = list(res['groups'])
    fig, axes = plt.subplots(1, len(WORKLOADS), figsize=(11, 3.6))
    for ax, w in zip(axes, WORKLOADS):
        data = [res['groups'][g]['workloads'][w]['pooled'] for g in labels]
        ax.boxplot(data, labels=labels, showfliers=False)
        for i, d in enumerate(data):
            rnd = random.Random(i)
            ax.scatter([i + 1 + rnd.uniform(-0.15, 0.15) for _ in d], d,
                       s=6, alpha=0.4)
        ax.axhline(1.0, color='grey', lw=0.8)
        ax.axhline(0.98, color='red', lw=0.8, ls='--')
        ax.set_title(f'{w}: tracked / untracked')
    axes[0].set_ylabel('per-round ratio (goal: >= 0.98, dashed)')
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == '__main__':
    main()
