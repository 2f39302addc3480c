#!/usr/bin/python3
"""Disk-backed page dedup: migration and snapshots beside stock QEMU, in
one run (issue 13, item 7).

The Debian 6.12 test guest (--mem, default 1 GiB) under TCG, with a
virtio-blk disk: an ext4 image of --mib MiB of random files
(tests/lib/dedupdisk.py) that source and destination open from one file
(shared storage on one host; cache.direct=on, aio=threads).  A "heavy"
guest mounts the disk read-only and reads every file into its page cache,
a "light" one boots without reading anything.  One source VM per QEMU
and guest kind boots once; every migration goes from it to a fresh
destination (-incoming, paused), which is killed afterwards, and the
source is continued (`cont`) for the next cell.  Cells of one repetition
run interleaved, stock and kvmx, so that the shared machine's load hits
both alike.

Link: --cap netns (default): the two QEMUs in two network namespaces,
TCP over a veth pair capped with tc tbf at --mbit (tests/lib/netns.py),
QEMU's own max-bandwidth out of the way; bytes on the wire are the
source veth's tx_bytes (TCP/IP headers included).  --cap qemu: a unix
socket and max-bandwidth = --mbit; bytes are QEMU's ram.transferred.

  stock-precopy     Debian's QEMU 10.0, precopy, default capabilities
  stock-multifd     the same with multifd (2 channels; zero-page
                    detection in the multifd threads, its default)
  kvmx-dedup        the patched QEMU, disk-dedup and return-path on
  kvmx-dedup-multifd  the same with multifd (2 channels): references on
                    the main channel, pages in full on the others
  kvmx-off          the patched QEMU with tracking on and the capability
                    off: what the series costs a migration that does not
                    use it
  kvmx-dedup-hostcache  kvmx-dedup with the destination's image in the
                    host page cache (cache.direct=off there): its reads
                    of referenced blocks cost no disk I/O
  kvmx-dedup-iouring  kvmx-dedup with the destination's image on
                    aio=io_uring instead of the thread pool (not in the
                    default cells)
  stock-file        `stop`, migrate to file:PATH (plain file: format),
  kvmx-dedup-file   `cont`; the file's size (no return path)
  light/...         stock-precopy, kvmx-off, kvmx-dedup of the light guest
  dropped/...       the same, of a guest that read the files and then
                    dropped its page cache (--dropped)

Per cell: median of --repeat runs of bytes, total-time (QEMU's, from the
source), downtime, and each as a ratio to stock-precopy; the disk-dedup
counters of both sides.  Then the issue's goals, met or not.  Writes
results/<stamp>.{json,txt,png}.

Usage: bench/dedup/migrate.py [--mib 512] [--mem 1G] [--mbit 1000]
       [--repeat 3] [--cap netns|qemu] [--cells a,b,...] [--no-light]
       [--only-light] [--dropped]
       bench/dedup/migrate.py --report results/STAMP.json
"""
import argparse
import os
import shutil
import statistics
import subprocess
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
import netns  # noqa: E402
from migwork import set_caps, wait_status  # noqa: E402

MIB = 1 << 20
DONE = ('completed', 'failed', 'cancelled')
UNLIMITED = 10 << 30            # max-bandwidth when the link caps the rate

DEDUP = {'disk-dedup': True, 'return-path': True}
# cell -> (qemu, kind, capabilities on, parameters, how the destination
# opens the image: dedupdisk.image_args' direct and aio)
CELLS = {
    'stock-precopy': ('stock', 'live', {}, {}, {}),
    'kvmx-dedup': ('kvmx', 'live', DEDUP, {}, {}),
    'kvmx-dedup-multifd': ('kvmx', 'live', dict(DEDUP, multifd=True),
                           {'multifd-channels': 2}, {}),
    'stock-multifd': ('stock', 'live', {'multifd': True},
                      {'multifd-channels': 2}, {}),
    'kvmx-off': ('kvmx', 'live', {}, {}, {}),
    'kvmx-dedup-hostcache': ('kvmx', 'live', DEDUP, {}, {'direct': False}),
    'kvmx-dedup-iouring': ('kvmx', 'live', DEDUP, {}, {'aio': 'io_uring'}),
    # The destination is --dst-single-reads: a build whose destination reads
    # each reference alone (the series without 07-disk-dedup patch 6).
    'kvmx-dedup-single': ('kvmx', 'live', DEDUP, {},
                          {'dst_qemu': 'single'}),
    'stock-file': ('stock', 'file', {}, {}, {}),
    'kvmx-dedup-file': ('kvmx', 'file', {'disk-dedup': True}, {}, {}),
}
LIGHT_CELLS = ('stock-precopy', 'kvmx-dedup', 'kvmx-off')

HEAVY_SCRIPT = r'''
mount -o ro,noatime /dev/vda /mnt || echo "MOUNT-FAILED"
t=$(date +%s)
cat /mnt/d/* > /dev/null
echo "CACHED $(( $(date +%s) - t )) s, $(grep '^Cached' /proc/meminfo | tr -s ' ')"
echo READY
while true; do sleep 3600; done
'''
# Reads the files, then drops the page cache: the freed pages still hold
# the files' bytes (nothing zeroes them) and their records stay valid.
DROPPED_SCRIPT = HEAVY_SCRIPT.replace('cat /mnt/d/* > /dev/null\n', '''cat /mnt/d/* > /dev/null
sync; echo 3 > /proc/sys/vm/drop_caches
''')
LIGHT_SCRIPT = r'''
echo "CACHED 0 s, $(grep '^Cached' /proc/meminfo | tr -s ' ')"
echo READY
while true; do sleep 3600; done
'''


class Bench:
    def __init__(self, a, work, link):
        self.a = a
        self.work = work
        self.link = link
        self.qemu = {'stock': kvmxvm.stock_qemu(),
                     'kvmx': kvmxvm.patched_qemu(),
                     'single': a.dst_single_reads}
        self.port = 4600
        self.n = 0

    # -- VMs ----------------------------------------------------------------
    def prefix(self, side):
        if not self.link:
            return ()
        return self.link.src_exec if side == 'src' else self.link.dst_exec

    def args(self, which, img, opts=None):
        return dedupdisk.disk_args(img, tracked=(which == 'kvmx'),
                                   **(opts or {}))

    def boot(self, which, guest, img):
        name = f'{guest}-{which}'
        t0 = time.monotonic()
        vm = kvmxvm.start_guest(
            self.qemu[which],
            {'heavy': HEAVY_SCRIPT, 'light': LIGHT_SCRIPT,
             'dropped': DROPPED_SCRIPT}[guest],
            self.args(which, img), self.work, name, mem=self.a.mem,
            append_extra='kvmx.modules=virtio_blk,ext4',
            prefix=self.prefix('src'))
        m = vm.wait_console(r'CACHED (.*)\n', 900)
        vm.wait_console(r'READY\n', 30)
        info = {'vm': name, 'cached': m[1].strip(),
                'boot_s': round(time.monotonic() - t0, 1)}
        if 'MOUNT-FAILED' in vm.console_text():
            raise RuntimeError(f'{name}: the guest could not mount the disk')
        if which == 'kvmx':
            st = dedupdisk.tracking(vm)
            info['tracking'] = {k: st.get(k) for k in (
                'records', 'recorded', 'capacity', 'evicted', 'invalidated',
                'not-aligned', 'memory-used')}
        print(f'boot  {name}: {info}', flush=True)
        return vm, info

    # -- one migration --------------------------------------------------------
    def caps(self, which, cell_caps):
        caps = {'return-path': False, 'multifd': False, 'events': True}
        if which == 'kvmx':
            caps['disk-dedup'] = False
        caps.update(cell_caps)
        return caps

    def live(self, src, which, img, cell_caps, params, opts):
        self.n += 1
        self.port += 1
        opts = dict(opts)
        dst_qemu = self.qemu[opts.pop('dst_qemu', which)]
        dst = kvmxvm.start_guest(
            dst_qemu, None,
            self.args(which, img, opts) + ['-incoming', 'defer', '-S',
                                             '-name', 'dst,debug-threads=on'],
            self.work, f'dst{self.n}', mem=self.a.mem,
            prefix=self.prefix('dst'))
        try:
            caps = self.caps(which, cell_caps)
            if self.link:
                uri = f'tcp:{self.link.dst_ip}:{self.port}'
                bw = UNLIMITED
            else:
                uri = f'unix:{os.path.join(self.work, f"m{self.n}.sock")}'
                bw = self.a.mbit * 1000 * 1000 // 8
            set_caps(dst, caps)
            if 'multifd-channels' in params:
                dst.qmp.cmd('migrate-set-parameters', **{
                    'multifd-channels': params['multifd-channels']})
            dst.qmp.cmd('migrate-incoming', uri=uri)
            set_caps(src, caps)
            src.qmp.cmd('migrate-set-parameters', **dict(params,
                                                          **{'max-bandwidth':
                                                             bw}))
            tx0 = self.link.tx_bytes() if self.link else None
            t0 = time.monotonic()
            src.qmp.cmd('migrate', uri=uri)
            st, sinfo = wait_status(src, DONE, 600)
            wall = time.monotonic() - t0
            tx1 = self.link.tx_bytes() if self.link else None
            dinfo = {}
            if dst.returncode is None:
                _, dinfo = wait_status(dst, DONE, 60)
            r = self.record(st, sinfo, dinfo, wall)
            r['dst_cpu'] = cpu_times(dst)
            r['wire_bytes'] = (tx1 - tx0) if self.link else r['transferred']
            if st != 'completed':
                r['dst_stderr'] = dst.stderr_text().strip()[-600:]
        finally:
            dst.kill()
            dst.shutdown(timeout=5)
        self.resume(src)
        return r

    def to_file(self, src, which, cell_caps):
        self.n += 1
        path = os.path.join(self.work, f'snap{self.n}.mig')
        src.qmp.cmd('stop')
        set_caps(src, self.caps(which, cell_caps))
        src.qmp.cmd('migrate-set-parameters', **{'max-bandwidth': UNLIMITED})
        t0 = time.monotonic()
        src.qmp.cmd('migrate', uri=f'file:{path}')
        st, sinfo = wait_status(src, DONE, 600)
        wall = time.monotonic() - t0
        r = self.record(st, sinfo, {}, wall)
        r['file_bytes'] = os.path.getsize(path) if os.path.exists(path) else 0
        r['wire_bytes'] = r['file_bytes']
        if os.path.exists(path):
            os.unlink(path)
        self.resume(src)
        return r

    @staticmethod
    def record(st, sinfo, dinfo, wall):
        ram = sinfo.get('ram', {})
        r = {'status': st, 'error': sinfo.get('error-desc', ''),
             'total_ms': sinfo.get('total-time', 0),
             'downtime_ms': sinfo.get('downtime', 0),
             'setup_ms': sinfo.get('setup-time', 0),
             'transferred': ram.get('transferred', 0),
             'normal_pages': ram.get('normal', 0),
             'zero_pages': ram.get('duplicate', 0),
             'dirty_sync': ram.get('dirty-sync-count', 0),
             'wall_s': round(wall, 2)}
        s = sinfo.get('disk-dedup') or {}
        d = dinfo.get('disk-dedup') or {}
        if s or d:
            r['dedup'] = {k: s.get(k) for k in (
                'pages-as-reference', 'bytes-saved', 'images-refused',
                'refused-reason')}
            r['dedup'].update({k: d.get(k) for k in (
                'references-resolved', 'mismatches', 'read-errors',
                'read-time-ms', 'disk-reads')})
        return r

    @staticmethod
    def resume(src):
        """The source runs again for the next cell (its images are
        reactivated by `cont` after a completed migration)."""
        st = src.qmp.cmd('query-status')['status']
        if st != 'running':
            src.qmp.cmd('cont')
        deadline = time.monotonic() + 30
        while src.qmp.cmd('query-status')['status'] != 'running':
            if time.monotonic() > deadline:
                raise RuntimeError(f'{src.name} does not run again after '
                                   f'the migration ({st})')
            time.sleep(0.1)
        time.sleep(1.0)

    def cell(self, src, which, img, name):
        _, kind, caps, params, opts = CELLS[name]
        if kind == 'live':
            return self.live(src, which, img, caps, params, opts)
        return self.to_file(src, which, caps)

    def group(self, guest, cells, imgs, res):
        """Boot the guest on each QEMU its cells need, run the cells
        interleaved --repeat times."""
        vms = {}
        try:
            for which in ('stock', 'kvmx'):
                if any(CELLS[c][0] == which for c in cells):
                    vm, info = self.boot(which, guest, imgs[which])
                    vms[which] = vm
                    res['boots'].append(info)
            for rep in range(self.a.repeat):
                for c in cells:
                    which = CELLS[c][0]
                    r = self.cell(vms[which], which, imgs[which], c)
                    r.update(cell=c if guest == 'heavy' else f'{guest}/{c}',
                             rep=rep, loadavg=os.getloadavg()[0])
                    res['runs'].append(r)
                    print(line(r), flush=True)
            for which, vm in vms.items():
                if which == 'kvmx':
                    st = dedupdisk.tracking(vm)
                    res['tracking_after'][guest] = {k: st.get(k) for k in (
                        'records', 'recorded', 'evicted', 'invalidated',
                        'stale-at-send')}
        finally:
            for vm in vms.values():
                vm.kill()
                vm.shutdown(timeout=5)


def cpu_times(vm):
    """CPU seconds (user + system) of a QEMU's threads so far, summed
    by thread name: where the destination's time went."""
    out = {}
    tick = os.sysconf('SC_CLK_TCK')
    try:
        pid = vm.proc.pid
        for tid in os.listdir(f'/proc/{pid}/task'):
            with open(f'/proc/{pid}/task/{tid}/stat') as f:
                st = f.read()
            comm = st[st.index('(') + 1:st.rindex(')')]
            fields = st[st.rindex(')') + 2:].split()
            secs = (int(fields[11]) + int(fields[12])) / tick
            comm = 'worker' if comm.startswith('worker') else comm
            out[comm] = round(out.get(comm, 0) + secs, 2)
    except (OSError, ValueError, AttributeError):
        pass
    return out


def line(r):
    s = (f"run   {r['cell']:<24} #{r['rep']} {r['status']}: "
         f"{r['wire_bytes'] / MIB:7.1f} MiB (QEMU {r['transferred'] / MIB:.1f}"
         f"), total {r['total_ms']} ms, downtime {r['downtime_ms']} ms, "
         f"{r['normal_pages']} full / {r['zero_pages']} zero pages, "
         f"load {r['loadavg']:.1f}")
    if r.get('dedup'):
        d = r['dedup']
        s += (f"; refs {d.get('pages-as-reference')}, resolved "
              f"{d.get('references-resolved')}, mismatches "
              f"{d.get('mismatches')}, read errors {d.get('read-errors')}, "
              f"read time {d.get('read-time-ms')} ms in "
              f"{d.get('disk-reads')} reads, refused "
              f"{d.get('images-refused')}")
    if r.get('dst_cpu'):
        s += '; destination CPU s: ' + ', '.join(
            f'{k} {v}' for k, v in sorted(r['dst_cpu'].items(),
                                          key=lambda kv: -kv[1])[:5])
    if r['error']:
        s += f"; error: {r['error']}"
    return s


# -- summary, goals, report, plot ----------------------------------------------
def summarize(res):
    by = {}
    for r in res['runs']:
        by.setdefault(r['cell'], []).append(r)
    t = {}
    for c, runs in by.items():
        ok = [r for r in runs if r['status'] == 'completed']
        row = {'n': len(runs), 'ok': len(ok)}
        for k in ('wire_bytes', 'transferred', 'total_ms', 'downtime_ms',
                  'normal_pages', 'zero_pages'):
            vals = [r[k] for r in ok]
            row[k] = statistics.median(vals) if vals else None
            row[k + '_range'] = [min(vals), max(vals)] if vals else None
        refs = [r['dedup']['pages-as-reference'] for r in ok
                if r.get('dedup') and
                r['dedup'].get('pages-as-reference') is not None]
        row['refs'] = statistics.median(refs) if refs else None
        reads = [r['dedup']['disk-reads'] for r in ok
                 if r.get('dedup') and
                 r['dedup'].get('disk-reads') is not None]
        row['disk_reads'] = statistics.median(reads) if reads else None
        t[c] = row
    for prefix in ('', 'light/', 'dropped/'):
        base = t.get(prefix + 'stock-precopy')
        for c, row in t.items():
            if not c.startswith(prefix) or (not prefix and '/' in c):
                continue
            ref = t.get('stock-file') if c.endswith('-file') else base
            for k in ('wire_bytes', 'total_ms'):
                if ref and ref.get(k) and row.get(k) is not None:
                    row[k + '_ratio'] = row[k] / ref[k]
    return t


def goals(t):
    g = []

    def ratio(c, k):
        return (t.get(c) or {}).get(k + '_ratio')

    b = ratio('kvmx-dedup', 'wire_bytes')
    if b is not None:
        g.append(('bytes on the wire at most 25% of stock precopy',
                  f'{b:.2%}', b <= 0.25))
    x = ratio('kvmx-dedup', 'total_ms')
    if x:
        g.append(('total migration time at least 2x shorter than stock '
                  'precopy', f'{1 / x:.2f}x shorter ({x:.2f} of stock)',
                  x <= 0.5))
    for c, how in (('kvmx-dedup-multifd', 'with multifd'),
                   ('kvmx-dedup-iouring', "with the destination's image "
                    'on io_uring')):
        x = ratio(c, 'total_ms')
        if x:
            g.append((f'the same, {how}',
                      f'{1 / x:.2f}x shorter ({x:.2f} of stock)', x <= 0.5))
            b = ratio(c, 'wire_bytes')
            if b is not None:
                g.append((f'bytes at most 25% of stock, {how}', f'{b:.2%}',
                          b <= 0.25))
    f = ratio('kvmx-dedup-file', 'wire_bytes')
    if f is not None:
        g.append(('snapshot file at most 30% of stock', f'{f:.2%}',
                  f <= 0.30))
    for c in ('light/kvmx-dedup', 'light/kvmx-off'):
        for k, what in (('wire_bytes', 'bytes'), ('total_ms', 'time')):
            v = ratio(c, k)
            if v is not None:
                g.append((f'little page cache, {c.split("/")[1]}: {what} '
                          f'within 2% of stock precopy', f'{v:.3f}x',
                          v <= 1.02))
    for k, what in (('wire_bytes', 'bytes'), ('total_ms', 'time')):
        a = (t.get('light/kvmx-dedup') or {}).get(k)
        o = (t.get('light/kvmx-off') or {}).get(k)
        if a and o:
            g.append((f'little page cache: dedup {what} within 2% of kvmx '
                      f'without dedup', f'{a / o:.3f}x', a / o <= 1.02))
    return g


def report(res):
    t = res['summary']
    m = res['machine']
    lines = [f"disk-backed dedup, migration and snapshot; {m['cpu']}, "
             f"{m['cores']} cores, kernel {m['kernel']}, "
             f"hw virt {'yes' if m['hw_virt'] else 'no'} (guests under TCG)",
             f"load average {res.get('load_start')} at start, "
             f"{res.get('load_end')} at end (each run's own is in the "
             f"JSON)",
             f"link: {res['link']}; guest {res['mem']}, {res['mib']} MiB of "
             f"random files on virtio-blk ({res['image']}); medians of "
             f"{res['repeat']} run(s)",
             f"stock: {res['qemu']['stock']}; kvmx: {res['qemu']['kvmx']}",
             f"date {res['date']} UTC; command: {res['command']}", '',
             f"{'cell':<26}{'ok':>4}{'wire MiB':>10}{'ratio':>8}"
             f"{'total s':>9}{'ratio':>8}{'downtime':>10}{'refs':>9}"
             f"{'reads':>9}"]
    for c, v in t.items():
        def f(x, fmt):
            if x is None:
                return '-'.rjust(int(fmt.split('.')[0]))
            return format(x, fmt)
        lines.append(
            f"{c:<26}{v['ok']}/{v['n']:<2}"
            f"{f(v['wire_bytes'] and v['wire_bytes'] / MIB, '10.1f')}"
            f"{f(v.get('wire_bytes_ratio'), '8.3f')}"
            f"{f(v['total_ms'] and v['total_ms'] / 1000, '9.2f')}"
            f"{f(v.get('total_ms_ratio'), '8.3f')}"
            f"{f(v['downtime_ms'], '8.0f')}ms"
            f"{f(v['refs'], '9.0f')}"
            f"{f(v.get('disk_reads'), '9.0f')}")
    lines += ['', '(ratios: to stock-precopy of the same guest; the -file '
              'cells to stock-file; wire = veth tx bytes, or the file size)',
              '', 'goals (issue 13, item 7):']
    for text, value, met in res['goals']:
        lines.append(f"  [{'met' if met else 'NOT met'}] {text}: {value}")
    fails = [r for r in res['runs'] if r['status'] != 'completed']
    if fails:
        lines += ['', 'failed runs:']
        for r in fails:
            lines.append(f"  {r['cell']} #{r['rep']}: {r['status']}: "
                         f"{r['error']} {r.get('dst_stderr', '')}")
    return '\n'.join(lines)


def plot(res, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    t = res['summary']
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
    live = [c for c in ('stock-precopy', 'stock-multifd', 'kvmx-off',
                        'kvmx-dedup-single', 'kvmx-dedup',
                        'kvmx-dedup-multifd', 'kvmx-dedup-hostcache',
                        'kvmx-dedup-iouring')
            if c in t]
    ax = axes[0]
    w = 0.38
    for i, (k, lab) in enumerate((('wire_bytes', 'bytes on the wire'),
                                  ('total_ms', 'total migration time'))):
        ys = [t[c].get(k + '_ratio') or 0 for c in live]
        bars = ax.bar([j + i * w for j in range(len(live))], ys, w, label=lab)
        ax.bar_label(bars, fmt='%.3f', fontsize=7)
    ax.axhline(0.25, color='C0', ls=':', lw=1)
    ax.axhline(0.5, color='C1', ls=':', lw=1)
    ax.set_xticks([j + w / 2 for j in range(len(live))])
    ax.set_xticklabels([c.replace('-hostcache', '\n(host cache)')
                        .replace('-single', '\n(1 read/ref)')
                        .replace('-iouring', '\n(io_uring)')
                        for c in live], fontsize=7)
    ax.set_title(f"page-cache-heavy guest ({res['mib']} MiB read), ratio to "
                 f"stock precopy\n(dotted: goals 0.25 bytes, 0.5 time)",
                 fontsize=9)
    ax.legend(fontsize=7)
    ax = axes[1]
    files = [c for c in ('stock-file', 'kvmx-dedup-file') if c in t]
    ys = [(t[c]['wire_bytes'] or 0) / MIB for c in files]
    bars = ax.bar(files, ys, color=['C2', 'C3'][:len(files)])
    ax.bar_label(bars, fmt='%.0f MiB', fontsize=8)
    if 'stock-file' in t and t['stock-file']['wire_bytes']:
        ax.axhline(0.3 * t['stock-file']['wire_bytes'] / MIB, color='k',
                   ls=':', lw=1)
    ax.set_title('snapshot (migrate to file) size\n(dotted: goal, 30% of '
                 'stock)', fontsize=9)
    if not files:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.text(0.5, 0.5, 'not run in this invocation', ha='center',
                transform=ax.transAxes, fontsize=9)
    ax = axes[2]
    light = [c for c in ('light/stock-precopy', 'light/kvmx-off',
                         'light/kvmx-dedup') if c in t]
    for i, (k, lab) in enumerate((('wire_bytes', 'bytes'),
                                  ('total_ms', 'total time'))):
        ys = [t[c].get(k + '_ratio') or 0 for c in light]
        bars = ax.bar([j + i * w for j in range(len(light))], ys, w,
                      label=lab)
        ax.bar_label(bars, fmt='%.3f', fontsize=7)
    ax.axhline(1.02, color='k', ls=':', lw=1)
    ax.set_ylim(0.8, max([1.1] + [t[c].get('total_ms_ratio') or 0
                                  for c in light]) * 1.05)
    ax.set_xticks([j + w / 2 for j in range(len(light))])
    ax.set_xticklabels([c.split('/')[1] for c in light], fontsize=8)
    ax.set_title('guest with little page cache, ratio to stock precopy\n'
                 '(dotted: 1.02)', fontsize=9)
    if light:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, 'not run in this invocation (--no-light)',
                ha='center', va='center', transform=ax.transAxes,
                fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def qemu_version(q):
    try:
        out = subprocess.run([q, '--version'], capture_output=True,
                             text=True, timeout=20).stdout
        return f"{q} ({out.splitlines()[0]})"
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return q


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--mib', type=int, default=512,
                    help='MiB of files (the light guest reads none; with '
                    '--only-light the image stays small if you pass 64)')
    ap.add_argument('--mem', default='1G')
    ap.add_argument('--mbit', type=int, default=1000)
    ap.add_argument('--repeat', type=int, default=3)
    ap.add_argument('--cap', choices=('netns', 'qemu'), default='netns')
    ap.add_argument('--cells', default=','.join(
        c for c in CELLS
        if c not in ('kvmx-dedup-iouring', 'kvmx-dedup-single')))
    ap.add_argument('--dst-single-reads', metavar='QEMU',
                    help="cell kvmx-dedup-single's destination: a patched "
                    'QEMU built without 07-disk-dedup patch 6, which reads '
                    'each reference alone')
    ap.add_argument('--no-light', action='store_true')
    ap.add_argument('--dropped', action='store_true',
                    help='also a guest that reads the files and then drops '
                    'its page cache (drop_caches)')
    ap.add_argument('--only-light', action='store_true',
                    help='the little-cache guest only (e.g. with a larger '
                    '--repeat, to resolve a 2%% difference)')
    ap.add_argument('--report', metavar='JSON')
    a = ap.parse_args()
    if a.report:
        import json
        res = json.load(open(a.report))
        res['summary'] = summarize(res)
        res['goals'] = goals(res['summary'])
        benchlib.save(res, HERE, report, plot, name='migrate')
        return 0
    if 'kvmx-dedup-single' in a.cells.split(',') and not a.dst_single_reads:
        ap.error('cell kvmx-dedup-single needs --dst-single-reads QEMU')
    kvmxtest.require_guest_image()
    b_qemu = kvmxvm.patched_qemu()
    lacks = dedupdisk.dedup_support(b_qemu)
    if lacks:
        kvmxvm.skip(f'{b_qemu}: {lacks}')
    for tool in ('mkfs.ext4',):
        if not shutil.which(tool):
            kvmxvm.skip(f'{tool} not found (e2fsprogs; scripts/setup)')
    if a.cap == 'netns':
        why = netns.CappedLink.unavailable()
        if why:
            print(f'dedup bench: {why}; use --cap qemu', file=sys.stderr)
            return 77
    cells = a.cells.split(',')
    work = kvmxtest.workdir('bench-dedup-')
    res = benchlib.new_results(mib=a.mib, mem=a.mem, mbit=a.mbit,
                               repeat=a.repeat, cap=a.cap, runs=[], boots=[],
                               tracking_after={},
                               load_start=round(os.getloadavg()[0], 2),
                               qemu={'stock': qemu_version(
                                   kvmxvm.stock_qemu()),
                                   'kvmx': qemu_version(b_qemu)})
    img, nfiles, secs = dedupdisk.build_image(work, a.mib)
    res['image'] = (f'ext4, {nfiles} files, raw '
                    f'{os.path.getsize(img) // MIB} MiB')
    print(f'image {res["image"]}, built in {secs:.1f} s', flush=True)
    imgs = {'kvmx': img, 'stock': os.path.join(work, 'disk-stock.raw')}
    shutil.copyfile(img, imgs['stock'])
    link = None
    try:
        if a.cap == 'netns':
            link = netns.CappedLink(mbit=a.mbit).__enter__()
            res['link'] = link.describe()
        else:
            res['link'] = (f'unix socket, QEMU max-bandwidth {a.mbit} '
                           f'Mbit/s')
        bench = Bench(a, work, link)
        if not a.only_light:
            bench.group('heavy', cells, imgs, res)
        if not a.no_light:
            bench.group('light', [c for c in LIGHT_CELLS if c in CELLS],
                        imgs, res)
        if a.dropped:
            bench.group('dropped', [c for c in LIGHT_CELLS if c in CELLS],
                        imgs, res)
    finally:
        if link:
            link.__exit__(None, None, None)
    res['load_end'] = round(os.getloadavg()[0], 2)
    res['summary'] = summarize(res)
    res['goals'] = goals(res['summary'])
    benchlib.save(res, HERE, report, plot, name='migrate')
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
