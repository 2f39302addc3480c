#!/usr/bin/python3
"""Disk-dedup tracking on the guest's read path (issue 13, item 2): guest
disk-read throughput with tracking on vs off.

The patched QEMU under TCG, the Debian 6.12 test guest (1 GiB), a
virtio-blk disk on a raw image of --mib MiB of random data whose pages
the host has just read (host page cache hot: cache.direct=off).  Two
configurations of the same QEMU and the same disk:

  off   -device virtio-blk-pci,drive=d0 (no kvmx-disk-dedup object)
  on    -object kvmx-disk-dedup,id=dd0 and ...,disk-dedup=dd0: every
        aligned 4 KiB block a read brings into guest RAM is recorded

Each configuration boots --boots times, alternating (off, on, on, off, ...),
and in each boot the guest runs --rounds rounds of three workloads:

  seq-1m   dd if=/dev/vda of=/dev/null bs=1M iflag=direct (the whole disk,
           8 times: one pass takes ~0.3 s here)
  seq-4k   dd ... bs=4k iflag=direct over the first 64 MiB (16384 reads,
           one at a time: the per-request path)
  rand-4k  a loop of --rand single 4 KiB O_DIRECT reads at random offsets
           (one busybox dd each: process start-up dominates under TCG)

--design paired instead boots --boots guests that each have both disks
(the image and a copy, serial "on" tracked, "off" not) and alternate the
workloads between them round by round (order swapped every round; seq-1m
4 passes, seq-4k 8192 reads): the boot-to-boot spread drops out, and the
ratio is the median of each round's on/off.  It cannot see a cost the
object puts on the whole VM rather than on its tracked disk; the
separate design can.

Throughput per run from the guest's /proc/uptime around each workload
(10 ms; busybox dd here prints no rate), rand-4k as reads per second;
medians over all rounds of all boots; the ratio on/off (goal: at most 2%
slower).  query-kvmx-disk-dedup
before and after each "on" boot's workloads shows the reads were
recorded.  Writes results/readpath-<stamp>.{json,txt,png}.

Usage: bench/dedup/readpath.py [--mib 256] [--boots 3] [--rounds 3]
       [--rand 1000] [--design separate|paired]
       bench/dedup/readpath.py --report results/readpath-STAMP.json
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
sys.path.insert(0, os.path.dirname(HERE))
import benchlib  # noqa: E402
import dedupdisk  # noqa: E402
import kvmxtest  # noqa: E402
import kvmxvm  # noqa: E402

MIB = 1 << 20
WORKLOADS = ('seq-1m', 'seq-4k', 'rand-4k')
SEQ_PASSES = 8          # seq-1m reads the disk this many times per round
TRACK_KEYS = ('records', 'recorded', 'evicted', 'invalidated', 'raced',
              'not-aligned', 'dropped', 'memory-used', 'capacity')


def guest_script(mib, rounds, nrand):
    blocks = mib * MIB // 4096
    return f'''
echo READY
read go
# busybox dd here prints no time: the guest's /proc/uptime (10 ms) around
# each workload, which lasts seconds
up() {{ cut -d' ' -f1 /proc/uptime; }}
for r in $(seq 1 {rounds}); do
  t0=$(up)
  for p in $(seq 1 {SEQ_PASSES}); do dd if=/dev/vda of=/dev/null bs=1M iflag=direct 2>/dev/null; done
  t1=$(up)
  echo "RUN seq-1m $r {SEQ_PASSES * mib * MIB} bytes, $t0 $t1"
  t0=$(up); dd if=/dev/vda of=/dev/null bs=4096 count=16384 iflag=direct 2>/dev/null; t1=$(up)
  echo "RUN seq-4k $r {16384 * 4096} bytes, $t0 $t1"
  offs=$(shuf -i 0-{blocks - 1} -n {nrand})
  t0=$(cut -d' ' -f1 /proc/uptime)
  for o in $offs; do dd if=/dev/vda of=/dev/null bs=4096 count=1 skip=$o iflag=direct 2>/dev/null; done
  t1=$(cut -d' ' -f1 /proc/uptime)
  echo "RUN rand-4k $r {nrand} reads, $t0 $t1"
done
echo WORK-DONE
'''


def paired_script(mib, rounds, nrand, cached=False):
    """One guest, two disks with the same contents: the tracked one (serial
    "on") and an untracked one ("off"), the workloads alternating between
    them round by round (the order swapped every round)."""
    blocks = mib * MIB // 4096
    # --cached: buffered reads through the guest's page cache (dropped
    # before each pass), so every pass fills new pages, as a guest's file
    # reads do; the tracking table then holds a record per page read.
    SEQ_CMD = ('sync; echo 3 > /proc/sys/vm/drop_caches; '
               'dd if=$dev of=/dev/null bs=1M 2>/dev/null' if cached else
               'dd if=$dev of=/dev/null bs=1M iflag=direct 2>/dev/null')
    return f'''
echo READY
read go
up() {{ cut -d' ' -f1 /proc/uptime; }}
for d in /sys/block/vd*; do
  case "$(cat $d/serial)" in on) ON=/dev/${{d##*/}} ;; off) OFF=/dev/${{d##*/}} ;; esac
done
echo "DEVICES on=$ON off=$OFF"
for r in $(seq 1 {rounds}); do
  if [ $((r % 2)) = 1 ]; then order="on off"; else order="off on"; fi
  for m in $order; do
    if [ $m = on ]; then dev=$ON; else dev=$OFF; fi
    t0=$(up)
    for p in $(seq 1 {SEQ_PASSES // 2}); do {SEQ_CMD}; done
    t1=$(up)
    echo "RUN seq-1m $r {SEQ_PASSES // 2 * mib * MIB} bytes, $t0 $t1 $m"
    t0=$(up); dd if=$dev of=/dev/null bs=4096 count=8192 iflag=direct 2>/dev/null; t1=$(up)
    echo "RUN seq-4k $r {8192 * 4096} bytes, $t0 $t1 $m"
    offs=$(shuf -i 0-{blocks - 1} -n {nrand})
    t0=$(up)
    for o in $offs; do dd if=$dev of=/dev/null bs=4096 count=1 skip=$o iflag=direct 2>/dev/null; done
    t1=$(up)
    echo "RUN rand-4k $r {nrand} reads, $t0 $t1 $m"
  done
done
echo WORK-DONE
'''


DD_RE = re.compile(r'RUN (seq-1m|seq-4k) (\d+) (\d+) bytes, ([\d.]+) '
                   r'([\d.]+)( on| off)?')
RAND_RE = re.compile(r'RUN rand-4k (\d+) (\d+) reads, ([\d.]+) ([\d.]+)'
                     r'( on| off)?')


def parse(text):
    out = []
    for m in DD_RE.finditer(text):
        secs = float(m[5]) - float(m[4])
        out.append({'workload': m[1], 'round': int(m[2]),
                    'bytes': int(m[3]), 'secs': secs,
                    'mb_s': int(m[3]) / secs / 1e6 if secs else None})
        if m[6]:
            out[-1]['mode'] = m[6].strip()
    for m in RAND_RE.finditer(text):
        secs = float(m[4]) - float(m[3])
        out.append({'workload': 'rand-4k', 'round': int(m[1]),
                    'reads': int(m[2]), 'secs': secs,
                    'iops': int(m[2]) / secs if secs else None})
        if m[5]:
            out[-1]['mode'] = m[5].strip()
    return out


def thread_cpu(pid):
    """CPU seconds (user + system) per thread name of a process, and, under
    'NAME wait', the seconds its threads were runnable but waited for a
    CPU (schedstat's run_delay)."""
    tick = os.sysconf('SC_CLK_TCK')
    out = {}
    for tid in os.listdir(f'/proc/{pid}/task'):
        try:
            with open(f'/proc/{pid}/task/{tid}/stat') as f:
                st = f.read()
            with open(f'/proc/{pid}/task/{tid}/schedstat') as f:
                run_delay_ns = int(f.read().split()[1])
        except (OSError, IndexError, ValueError):
            continue            # the thread ended meanwhile
        name = st[st.index('(') + 1:st.rindex(')')]
        fields = st[st.rindex(')') + 2:].split()
        # utime and stime are fields 14 and 15 of stat(5); 12, 13 here.
        out[name] = out.get(name, 0) + (int(fields[11]) +
                                        int(fields[12])) / tick
        out[f'{name} wait'] = out.get(f'{name} wait', 0) + run_delay_ns / 1e9
    return out


def cpu_delta(before, after):
    return {k: round(after.get(k, 0) - before.get(k, 0), 2)
            for k in sorted(set(before) | set(after))
            if after.get(k, 0) - before.get(k, 0) > 0}


def one_boot(qemu, work, img, mode, n, a):
    name = f'{mode}{n}'
    if mode == 'paired':
        img2 = img + '.copy'
        args = (dedupdisk.disk_args(img, tracked=True, direct=False)
                + dedupdisk.disk_args(img2, tracked=False, node='d1',
                                      dev_id='vd1', direct=False))
        args[args.index('virtio-blk-pci,drive=d0,id=vd0,disk-dedup=dd0')] \
            += ',serial=on'
        args[args.index('virtio-blk-pci,drive=d1,id=vd1')] += ',serial=off'
        script = paired_script(a.mib, a.rounds, a.rand, a.cached)
    else:
        args = dedupdisk.disk_args(img, tracked=(mode == 'on'), direct=False)
        script = guest_script(a.mib, a.rounds, a.rand)
    # Thread names in /proc (QEMU names its threads only when asked).
    args = args + ['-name', f'{name},debug-threads=on']
    t0 = time.monotonic()
    with kvmxvm.start_guest(qemu, script,
                            args, work, name, mem=a.mem,
                            append_extra='kvmx.modules=virtio_blk') as vm:
        vm.wait_console(r'READY\n', 600)
        boot = {'boot': name, 'mode': mode, 'boot_s':
                round(time.monotonic() - t0, 1),
                'loadavg_start': os.getloadavg()[0]}
        if mode in ('on', 'paired'):
            st = dedupdisk.tracking(vm)
            boot['tracking_before'] = {k: st.get(k) for k in TRACK_KEYS}
        mark = len(vm.console_text())
        cpu0 = thread_cpu(vm.proc.pid)
        vm.send_serial('go\n')
        vm.wait_console(r'WORK-DONE\n', 1800, start=mark)
        # QEMU's threads' CPU time over the workloads, by thread name
        # (the tracker is "kvmx-dedup"), and the time they waited for a
        # CPU ("... wait").
        boot['thread_cpu_s'] = cpu_delta(cpu0, thread_cpu(vm.proc.pid))
        if mode in ('on', 'paired'):
            st = dedupdisk.tracking(vm)
            boot['tracking_after'] = {k: st.get(k) for k in TRACK_KEYS}
        boot['loadavg_end'] = os.getloadavg()[0]
        text = vm.console_text()[mark:]
        boot['raw'] = [ln.strip() for ln in text.splitlines()
                       if ln.startswith(('RUN', 'DEVICES'))]
        runs = parse(text)
        for r in runs:
            r.setdefault('mode', mode)
            r.update(boot=name, paired=(mode == 'paired'))
        return boot, runs


def summarize(res):
    t = {}
    for wl in WORKLOADS:
        key = 'iops' if wl == 'rand-4k' else 'mb_s'
        row = {'unit': 'reads/s' if wl == 'rand-4k' else 'MB/s'}
        for mode in ('off', 'on'):
            vals = [r[key] for r in res['runs']
                    if r['workload'] == wl and r['mode'] == mode and
                    r.get(key)]
            row[mode] = statistics.median(vals) if vals else None
            row[mode + '_n'] = len(vals)
            row[mode + '_range'] = [min(vals), max(vals)] if vals else None
            # Median of each boot's median: boot-to-boot spread.
            per_boot = {}
            for r in res['runs']:
                if r['workload'] == wl and r['mode'] == mode and r.get(key):
                    per_boot.setdefault(r['boot'], []).append(r[key])
            row[mode + '_boots'] = [statistics.median(v)
                                    for v in per_boot.values()]
        if row['off'] and row['on']:
            row['ratio'] = row['on'] / row['off']
        # Paired design: on/off of the same round of the same boot.
        pairs = {}
        for r in res['runs']:
            if r['workload'] == wl and r.get('paired') and r.get(key):
                pairs.setdefault((r['boot'], r['round']), {})[r['mode']] = \
                    r[key]
        pr = [p['on'] / p['off'] for p in pairs.values()
              if p.get('on') and p.get('off')]
        if pr:
            row['paired_ratio'] = statistics.median(pr)
            row['paired_ratios'] = pr
        t[wl] = row
    return t


def goals(t):
    g = []
    for wl, row in t.items():
        ratio = row.get('paired_ratio') or row.get('ratio')
        if ratio:
            slower = 1 - ratio
            g.append((f'{wl}: tracking on at most 2% slower than off',
                      f"on/off {ratio:.3f} ("
                      + (f'{slower:.1%} slower' if slower >= 0 else
                         f'{-slower:.1%} faster') + ')'
                      + (' (median of paired rounds)'
                         if row.get('paired_ratio') else ''),
                      slower <= 0.02))
    return g


def report(res):
    t = res['summary']
    m = res['machine']
    lines = [f"disk-dedup tracking on the guest read path; {m['cpu']}, "
             f"{m['cores']} cores, kernel {m['kernel']}, hw virt "
             f"{'yes' if m['hw_virt'] else 'no'} (guest under TCG)",
             f"load average {res.get('load_start')} at start, "
             f"{res.get('load_end')} at end (each run's own is in the "
             f"JSON)",
             f"qemu {res['qemu']}; guest {res['mem']}; disk: raw image of "
             f"{res['mib']} MiB random data, virtio-blk, cache.direct=off, "
             f"host page cache hot"
             + ("; seq-1m buffered through the guest's page cache (dropped "
                "before each pass)" if res.get('cached') else ''),
             (f"{res['boots']} boot(s), each with both disks (tracked and "
              f"not, same contents), the workloads alternating between them,"
              f" {res['rounds']} rounds; rand-4k: {res['rand']} reads per "
              f"round" if res.get('design') == 'paired' else
              f"{res['boots']} boots per mode (alternating), {res['rounds']} "
              f"rounds each; rand-4k: {res['rand']} reads per round"),
             f"date {res['date']} UTC; command: {res['command']}", '',
             f"{'workload':<10}{'unit':>9}{'off':>10}{'on':>10}"
             f"{'on/off':>8}{'paired':>8}   per-boot medians off | on"]
    for wl, r in t.items():
        def f(x):
            return f'{x:10.1f}' if x is not None else '         -'
        lines.append(
            f"{wl:<10}{r['unit']:>9}{f(r['off'])}{f(r['on'])}"
            f"{r.get('ratio', 0):8.3f}"
            + (f"{r['paired_ratio']:8.3f}" if r.get('paired_ratio') else
               '       -') + '   '
            + ' '.join(f'{x:.1f}' for x in r['off_boots']) + ' | '
            + ' '.join(f'{x:.1f}' for x in r['on_boots']))
    lines += ['', 'query-kvmx-disk-dedup of each "on" boot, before -> after '
              'the workloads:']
    for b in res['boot_info']:
        if b['mode'] in ('on', 'paired'):
            bf, af = b['tracking_before'], b['tracking_after']
            lines.append(
                f"  {b['boot']}: recorded {bf.get('recorded')} -> "
                f"{af.get('recorded')}, records {bf.get('records')} -> "
                f"{af.get('records')}, evicted {af.get('evicted')}, "
                f"not-aligned {af.get('not-aligned')}, raced "
                f"{af.get('raced')}, dropped {af.get('dropped', 'n/a')}, "
                f"memory {af.get('memory-used')}")
            cpu = b.get('thread_cpu_s')
            if cpu:
                pages = (af.get('recorded') or 0) - (bf.get('recorded') or 0)
                dd = cpu.get('kvmx-dedup', 0)
                lines.append(
                    f"    CPU s by thread over the workloads: "
                    + ', '.join(f'{k} {v}' for k, v in cpu.items())
                    + (f"; kvmx-dedup {dd / pages * 1e9:.0f} ns per page "
                       f"recorded" if pages else ''))
    lines += ['', 'goals (issue 13, item 2):']
    for text, value, met in res['goals']:
        lines.append(f"  [{'met' if met else 'NOT met'}] {text}: {value}")
    return '\n'.join(lines)


def plot(res, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    t = res['summary']
    fig, axes = plt.subplots(1, len(t), figsize=(12, 3.8))
    for ax, (wl, r) in zip(axes, t.items()):
        for i, mode in enumerate(('off', 'on')):
            vals = [x[('iops' if wl == 'rand-4k' else 'mb_s')]
                    for x in res['runs']
                    if x['workload'] == wl and x['mode'] == mode]
            ax.scatter([i] * len(vals), vals, s=12, alpha=0.6,
                       color=f'C{i}')
            if r[mode]:
                ax.hlines(r[mode], i - 0.25, i + 0.25, color=f'C{i}')
        ax.set_xticks([0, 1])
        ax.set_xticklabels(['tracking off', 'tracking on'])
        ax.set_xlim(-0.6, 1.6)
        ax.set_title(f"{wl} ({r['unit']}), on/off {r.get('ratio', 0):.3f}"
                     + (f", paired rounds {r['paired_ratio']:.3f}"
                        if r.get('paired_ratio') else ''), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--mib', type=int, default=256)
    ap.add_argument('--mem', default='1G')
    ap.add_argument('--boots', type=int, default=3)
    ap.add_argument('--rounds', type=int, default=3)
    ap.add_argument('--rand', type=int, default=1000)
    ap.add_argument('--design', choices=('separate', 'paired'),
                    default='separate',
                    help='separate: on and off in alternating boots; '
                    'paired: each boot has both disks, the workloads '
                    'alternate between them round by round')
    ap.add_argument('--cached', action='store_true',
                    help='paired design: seq-1m reads through the guest '
                    'page cache (dropped before each pass) instead of '
                    'O_DIRECT')
    ap.add_argument('--report', metavar='JSON')
    a = ap.parse_args()
    if a.report:
        import json
        res = json.load(open(a.report))
        res['summary'] = summarize(res)
        res['goals'] = goals(res['summary'])
        benchlib.save(res, HERE, report, plot, name='readpath')
        return 0
    if a.design == 'paired' and a.rounds == 3:
        a.rounds = 8
    kvmxtest.require_guest_image()
    qemu = kvmxvm.patched_qemu()
    lacks = dedupdisk.dedup_support(qemu)
    if lacks:
        kvmxvm.skip(f'{qemu}: {lacks}')
    work = kvmxtest.workdir('bench-readpath-')
    img = os.path.join(work, 'disk.raw')
    with open(img, 'wb') as f:
        for _ in range(a.mib):
            f.write(os.urandom(MIB))
    if a.design == 'paired':
        import shutil
        shutil.copyfile(img, img + '.copy')
    res = benchlib.new_results(design=a.design, mib=a.mib, mem=a.mem,
                               boots=a.boots,
                               rounds=a.rounds, rand=a.rand, qemu=qemu,
                               cached=a.cached,
                               load_start=round(os.getloadavg()[0], 2),
                               runs=[], boot_info=[])
    order = []
    for i in range(a.boots):
        if a.design == 'paired':
            order.append('paired')
        else:
            order += ['off', 'on'] if i % 2 == 0 else ['on', 'off']
    for n, mode in enumerate(order):
        # Host page cache hot: read the image(s) before every boot.
        for path in (img, img + '.copy'):
            if os.path.exists(path):
                with open(path, 'rb') as f:
                    while f.read(16 * MIB):
                        pass
        boot, runs = one_boot(qemu, work, img, mode, n, a)
        res['boot_info'].append(boot)
        res['runs'] += runs
        print(f"boot {boot['boot']}: " + '; '.join(
            f"{r['workload']} {r['mode']} {r.get('mb_s') or r.get('iops'):.1f}"
            for r in runs) + (f"; tracking {boot.get('tracking_after')}"
                              if mode != 'off' else ''), flush=True)
    res['load_end'] = round(os.getloadavg()[0], 2)
    res['summary'] = summarize(res)
    res['goals'] = goals(res['summary'])
    benchlib.save(res, HERE, report, plot, name='readpath')
    import shutil
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
