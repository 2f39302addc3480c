#!/usr/bin/python3
"""Virtblock purging benchmark (issue 14, item 8), side by side in one run.

    bench/purge/bench.py [--quick] [throughput] [faultback] [guest] [scale]

  throughput  purge-now of a 512 MiB file NVDIMM of random data against
              fio's sequential O_DIRECT write of the same amount to the same
              file system (io_uring, the same block size), alternated 3 times;
              2 MiB and 64 KiB blocks.  Goal: purge >= 90% of fio.
  faultback   one block brought back by a fault against fio's random
              O_DIRECT read of the same size at queue depth 1, two ways:
              what the faulting thread waited (QEMU's agent's times: its
              read of the fault to the wake) and hostd's own figure (its
              notice to MAP_BACK's reply).  Goal: p50 and p99 <= 1.5x.
  guest       the freestanding KVM guest sweeps a 32 MiB hot set of a 256
              MiB NVDIMM (the rest cold data) for 20 s: stock QEMU, the
              patched QEMU without purging, and with hostd purging by policy
              (min idle 3 s).  Goal: within 2%.  Also NVM bytes saved over
              time and refaults per minute.
  scale       a 64 GiB sparse NVDIMM with 10,000 isolated 64 KiB blocks of
              data, all purged: time, QEMU's VMAs, hostd's and QEMU's RSS,
              the table's size; then 100 purged blocks read back.

Writes results/<stamp>.{json,txt,png}.  Root, the patched QEMU
(scripts/build), fio (scripts/setup).  Absolute numbers on this machine's
emulated disk mean little; read the ratios.
"""
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, 'bench'))
sys.path.insert(0, os.path.join(ROOT, 'tests', 'lib'))
sys.path.insert(0, os.path.join(ROOT, 'tests', 'integration'))
import benchlib  # noqa: E402
import hostdctl  # noqa: E402
import kvmxvm  # noqa: E402

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


def scratch(name):
    d = os.path.join(str(kvmxvm.scratch_dir()), f'bench-purge-{name}')
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    return d


def fio(args):
    out = subprocess.run(['fio', '--output-format=json'] + args,
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out[out.index('{'):])['jobs'][0]


def fio_write_mibs(path, size, bs):
    """MiB/s of fio's sequential O_DIRECT write of a new file (fio
    preallocates it: unwritten extents), and of a second write over the
    same file (written extents, as a disk copy slot used before)."""
    args = ['--name=w', f'--filename={path}', '--rw=write', f'--bs={bs}',
            '--iodepth=8', '--ioengine=io_uring', '--direct=1',
            f'--size={size}', '--end_fsync=1']
    passes = [fio(args)['write']['bw_bytes'] / MiB for _ in range(2)]
    os.unlink(path)
    return passes


def fio_randread_us(path, size, bs, seconds):
    with open(path, 'wb') as f:
        for _ in range(size // MiB):
            f.write(os.urandom(MiB))
        os.fsync(f.fileno())
    j = fio(['--name=r', f'--filename={path}', '--rw=randread', f'--bs={bs}',
             '--iodepth=1', '--ioengine=io_uring', '--direct=1',
             f'--size={size}', '--time_based', f'--runtime={seconds}'])
    os.unlink(path)
    pct = j['read']['clat_ns']['percentile']
    return pct['50.000000'] / 1000, pct['99.000000'] / 1000


class Setup:
    """A qtest QEMU with a purge-agent NVDIMM of `size` random bytes, and
    hostd attached with purging enabled (block size `block`)."""

    def __init__(self, work, size, block, sparse_blocks=None, keep=(),
                 **policy):
        from purgeqemu import Qemu
        self.work, self.size, self.block = work, size, block
        self.img = os.path.join(work, 'pmem.img')
        with open(self.img, 'wb') as f:
            if sparse_blocks is None:
                for _ in range(size // MiB):
                    f.write(os.urandom(MiB))
            else:
                f.truncate(size)
                self.kept = {}
                for b in sparse_blocks:
                    f.seek(b * block)
                    data = os.urandom(block)
                    if b in keep:
                        self.kept[b] = data
                    f.write(data)
            os.fsync(f.fileno())  # an NVDIMM's contents are durable
        self.q = Qemu(kvmxvm.patched_qemu(), work, self.img, 0, size=size)
        self.hostd = hostdctl.Hostd(work)
        self.hostd.start()
        self.hostd.call('attach', vm='b', qmp=self.q.hostd_qmp)
        self.hostd.wait_vm('b', lambda v: v['state'] == 'attached', 60)
        extra = {}
        if sparse_blocks is not None:
            extra['disk_bytes'] = (len(sparse_blocks) + 64) * block
        r = self.hostd.call('purge-policy', vm='b', nvdimm='mem1',
                            block_size=block, policy=policy, **extra)
        if 'result' not in r:
            raise RuntimeError(f'purge-policy: {r}')

    def status(self):
        return self.hostd.call('purge-status', vm='b', nvdimm='mem1')[
            'result']['nvdimms'][0]

    def purge_all(self):
        r = self.hostd.call('purge-now', vm='b', nvdimm='mem1',
                            ignore_idle=True)
        if 'result' not in r:
            raise RuntimeError(f'purge-now: {r}')
        return r['result']

    def close(self):
        self.q.kill()
        self.hostd.stop()


def bench_throughput(res, quick):
    out = res.setdefault('throughput', {})
    size = 256 * MiB if quick else 512 * MiB
    for block in (2 * MiB, 64 * KiB):
        purge, fiow, phases = [], [], []
        purge2, fiow2 = [], []
        for rep in range(1 if quick else 3):
            work = scratch('throughput')
            s = Setup(work, size, block)
            try:
                r = s.purge_all()
                purge.append(r['bytes'] / MiB / r['seconds'])
                # where the purge's time went (hostd's per-stage sums)
                phases.append(s.status().get('purge-phases-us'))
                # Everything back, and purged again: the disk copies go
                # to slots written before (hostd does not punch a slot it
                # releases), as in a steady state.
                u = s.hostd.call('unpurge', vm='b', nvdimm='mem1')
                if 'result' not in u:
                    raise RuntimeError(f'unpurge: {u}')
                # A block brought back is purged again only once hostd
                # has committed it resident: in a batch, within 2 s.
                time.sleep(3)
                r = s.purge_all()
                if r['skipped']:
                    raise RuntimeError(f'second purge skipped blocks: {r}')
                purge2.append(r['bytes'] / MiB / r['seconds'])
            finally:
                s.close()
            f1, f2 = fio_write_mibs(os.path.join(work, 'fio.bin'), size,
                                    block)
            fiow.append(f1)
            fiow2.append(f2)
            shutil.rmtree(work, ignore_errors=True)
            print(f'  {block // KiB} KiB rep {rep}: purge {purge[-1]:.0f} '
                  f'MiB/s, fio {fiow[-1]:.0f} MiB/s; slots reused: purge '
                  f'{purge2[-1]:.0f}, fio over its file {fiow2[-1]:.0f}',
                  flush=True)
        if phases[-1]:
            print(f'  {block // KiB} KiB phases (us, last rep): '
                  f'{phases[-1]}', flush=True)
        out[str(block)] = {'purge_mibs': purge, 'fio_mibs': fiow,
                           'phases_us': phases,
                           'ratio': statistics.median(purge) /
                           statistics.median(fiow),
                           'reused_purge_mibs': purge2,
                           'reused_fio_mibs': fiow2,
                           'reused_ratio': statistics.median(purge2) /
                           statistics.median(fiow2)}


def bench_faultback(res, quick):
    out = res.setdefault('faultback', {})
    size = 128 * MiB if quick else 256 * MiB
    for block in (2 * MiB, 64 * KiB):
        work = scratch('faultback')
        s = Setup(work, size, block)
        try:
            s.purge_all()
            n = size // block
            order = list(range(n))
            random.shuffle(order)
            order = order[:min(n, 200 if block == 2 * MiB else 1000)]
            t0 = time.monotonic()
            for b in order:
                s.q.read_at(b * block + 4096, 8)
            wall = time.monotonic() - t0
            st = s.status()
            lat = st['fault-latency-us']
            wait = st.get('fault-wait-us') or {}
            ph = st['fault-phases-us']
        finally:
            s.close()
        p50, p99 = fio_randread_us(os.path.join(work, 'fio.bin'), size,
                                   block, 5 if quick else 10)
        shutil.rmtree(work, ignore_errors=True)
        out[str(block)] = {'faults': len(order), 'p50_us': lat['p50'],
                           'p99_us': lat['p99'],
                           'reader_mean_us': wall / len(order) * 1e6,
                           'fio_p50_us': p50, 'fio_p99_us': p99,
                           'ratio_p50': lat['p50'] / p50,
                           'ratio_p99': lat['p99'] / p99,
                           'phases_us': ph}
        if wait.get('samples'):
            out[str(block)].update({
                'wait_samples': wait['samples'],
                'wait_p50_us': wait['p50'], 'wait_p99_us': wait['p99'],
                'ratio_wait_p50': wait['p50'] / p50,
                'ratio_wait_p99': wait['p99'] / p99})
        print(f'  {block // KiB} KiB: fault-back p50 {lat["p50"]} p99 '
              f'{lat["p99"]} us (thread waited p50 {wait.get("p50")} p99 '
              f'{wait.get("p99")}); fio read p50 {p50:.0f} p99 {p99:.0f} us',
              flush=True)


def bench_sequential(res, quick):
    """A reader walks a purged NVDIMM block after block (a word of each,
    through QEMU's qtest: a fault per block without read-ahead): read-ahead
    on (the policy's default) against off, same run, same data."""
    out = res.setdefault('sequential', {})
    size = 128 * MiB if quick else 256 * MiB
    for block in (2 * MiB, 64 * KiB):
        row = {}
        for ra in ('on', 'off'):
            work = scratch('sequential')
            policy = {} if ra == 'on' else {'readahead': 0}
            s = Setup(work, size, block, **policy)
            try:
                s.purge_all()
                t0 = time.monotonic()
                for b in range(size // block):
                    s.q.read_at(b * block + 4096, 8)
                wall = time.monotonic() - t0
                st = s.status()
            finally:
                s.close()
            shutil.rmtree(work, ignore_errors=True)
            row[ra] = {'seconds': wall, 'mibs': size / MiB / wall,
                       'faults': st['faults'],
                       'fault_backs': st['fault-backs'],
                       'readahead': st['readahead']}
            print(f'  {block // KiB} KiB, read-ahead {ra}: {wall:.2f} s '
                  f'({size / MiB / wall:.0f} MiB/s), {st["faults"]} faults, '
                  f'{st["fault-backs"]} blocks back', flush=True)
        row['speedup'] = row['off']['seconds'] / row['on']['seconds']
        out[str(block)] = row


def sweep_rate(g, base, hot, seconds):
    """Sweeps of the hot set per second, over `seconds`."""
    n, t0 = 0, time.monotonic()
    while time.monotonic() - t0 < seconds:
        g.sweep_read(base, hot)
        n += 1
    return n / (time.monotonic() - t0)


def bench_guest(res, quick):
    from fsguest import FsGuest
    from test_flush_hint_kvm import guest_elf, kvm_unusable_reason
    reason = kvm_unusable_reason()
    if reason:
        res['guest'] = {'skipped': reason}
        return
    out = res.setdefault('guest', {})
    size, hot = 256 * MiB, 32 * MiB
    seconds = 8 if quick else 20
    patched = kvmxvm.patched_qemu()
    stock = kvmxvm.stock_qemu()
    reps = 1 if quick else 3
    rates = {'stock': [], 'patched': [], 'purging': []}
    runs = [(rep, label) for rep in range(reps)
            for label in ('stock', 'patched', 'purging')]
    for rep, label in runs:
        last = rep == reps - 1
        work = scratch(f'guest-{label}')
        img = os.path.join(work, 'pmem.img')
        with open(img, 'wb') as f:
            for _ in range(size // MiB):
                f.write(os.urandom(MiB))
        qemu = stock if label == 'stock' else patched
        agent = os.path.join(work, 'agent.sock')
        hqmp = os.path.join(work, 'hostd.qmp')
        backend = (f'memory-backend-file,id=m0,share=on,mem-path={img},'
                   f'size={size}')
        if label == 'purging':
            backend += f',purge-agent={agent}'
        args = ['-accel', 'kvm', '-machine', 'q35,nvdimm=on',
                '-cpu', kvmxvm.kvm_cpu_model_or_skip(qemu),
                '-m', '256M,slots=4,maxmem=4G', '-no-reboot',
                '-kernel', guest_elf(),
                '-device', 'isa-debug-exit,iobase=0xf4,iosize=0x04',
                '-object', backend, '-device', 'nvdimm,id=nv0,memdev=m0',
                '-qmp', f'unix:{hqmp},server=on,wait=off']
        hostd = None
        samples = []
        with kvmxvm.Vm(qemu, args, work, 'g') as vm:
            vm.start()
            g = FsGuest(vm.serial_stream(), timeout=120)
            g.wait_ready(60)
            base = next(d['data']['addr'] for d in
                        vm.qmp.cmd('query-memory-devices'))
            stop = threading.Event()
            if label == 'purging':
                hostd = hostdctl.Hostd(work)
                hostd.start()
                hostd.call('attach', vm='g', qmp=hqmp)
                hostd.wait_vm('g', lambda v: v['state'] == 'attached', 60)
                hostd.call('purge-policy', vm='g', nvdimm='m0',
                           probe_interval_ms=1000,
                           policy={'enabled': True, 'min-idle-ms': 3000,
                                   'high-watermark': 0, 'low-watermark': 0})

                def sampler():
                    t0 = time.monotonic()
                    while not stop.wait(1):
                        st = hostd.call('purge-status', vm='g',
                                        nvdimm='m0')['result']['nvdimms'][0]
                        samples.append({'t': time.monotonic() - t0,
                                        'saved': st['bytes-saved'],
                                        'faults': st['fault-backs'],
                                        'allocated': st['backend-allocated']})
                threading.Thread(target=sampler, daemon=True).start()
            sweep_rate(g, base, hot, 2)           # warm up
            rate = sweep_rate(g, base, hot, seconds)
            # The cold set is touched once per 10 s: refaults per minute.
            if label == 'purging' and last:
                for _ in range(3 if quick else 6):
                    g.sweep_read(base + hot, 4 * MiB)
                    time.sleep(10)
            stop.set()
            g.quit(0)
        if hostd:
            hostd.stop()
        shutil.rmtree(work, ignore_errors=True)
        rates[label].append(rate)
        if samples and last:
            out['samples'] = samples
        print(f'  rep {rep} {label}: {rate:.1f} sweeps/s of {hot // MiB} MiB',
              flush=True)
    for label, r in rates.items():
        out[label] = {'sweeps_per_s': statistics.median(r), 'runs': r}
    out['ratio_purging_vs_patched'] = (out['purging']['sweeps_per_s'] /
                                       out['patched']['sweeps_per_s'])
    out['ratio_patched_vs_stock'] = (out['patched']['sweeps_per_s'] /
                                     out['stock']['sweeps_per_s'])


def rss_kib(pid):
    for line in open(f'/proc/{pid}/status'):
        if line.startswith('VmRSS:'):
            return int(line.split()[1])
    return 0


def bench_scale(res, quick):
    size, block = 64 * GiB, 64 * KiB
    n = 2000 if quick else 10000
    stride = (size // block) // n
    blocks = [i * stride for i in range(n)]
    sample = random.sample(blocks, 100)
    work = scratch('scale')
    t0 = time.monotonic()
    s = Setup(work, size, block, sparse_blocks=blocks, keep=set(sample))
    setup_s = time.monotonic() - t0
    try:
        qpid = s.q.proc.pid
        vmas0 = sum(1 for _ in open(f'/proc/{qpid}/maps'))
        h0 = rss_kib(s.hostd.proc.pid)
        r = s.purge_all()
        vmas1 = sum(1 for _ in open(f'/proc/{qpid}/maps'))
        h1 = rss_kib(s.hostd.proc.pid)
        st = s.status()
        t1 = time.monotonic()
        ok = all(s.q.read_at(b * block, block) == s.kept[b] for b in sample)
        read_s = time.monotonic() - t1
        ok = ok and s.status()['fault-backs'] == 100
        res['scale'] = {
            'nvdimm_bytes': size, 'block': block, 'data_blocks': n,
            'purged': r['blocks'], 'purge_seconds': r['seconds'],
            'attach_seconds': setup_s,
            'qemu_vmas_before': vmas0, 'qemu_vmas_after': vmas1,
            'hostd_rss_kib_before': h0, 'hostd_rss_kib_after': h1,
            'qemu_rss_kib': rss_kib(qpid),
            'vbt_bytes': os.stat(s.img + '.vbt').st_size,
            'vbd_bytes': os.stat(s.img + '.vbd').st_size,
            'purged_status': st['purged'],
            'read_back_100_s': read_s, 'read_back_ok': ok,
            'kvm_memslots': 'one for the NVDIMM, unchanged (placeholders '
                            'are VMAs of QEMU, not memslot holes)'}
        print(f'  scale: {r["blocks"]} purged in {r["seconds"]:.1f} s; '
              f'VMAs {vmas0} -> {vmas1}; hostd RSS {h0} -> {h1} KiB',
              flush=True)
    finally:
        s.close()
        shutil.rmtree(work, ignore_errors=True)


def report(res):
    lines = [f"machine: {res['machine']}", f"command: {res['command']}", '']
    for bs, t in res.get('throughput', {}).items():
        lines.append(f"purge throughput, {int(bs) // KiB} KiB blocks: "
                     f"purge {statistics.median(t['purge_mibs']):.0f} MiB/s, "
                     f"fio seq write {statistics.median(t['fio_mibs']):.0f} "
                     f"MiB/s, ratio {t['ratio']:.2f} (goal >= 0.90)")
        if 'reused_ratio' in t:
            lines.append(
                f"  into slots written before (a second purge after "
                f"unpurge): purge "
                f"{statistics.median(t['reused_purge_mibs']):.0f} MiB/s, "
                f"fio over its own file "
                f"{statistics.median(t['reused_fio_mibs']):.0f} MiB/s, "
                f"ratio {t['reused_ratio']:.2f}; purge reused/first "
                f"{statistics.median(t['reused_purge_mibs']) / statistics.median(t['purge_mibs']):.2f}")
    for bs, f in res.get('faultback', {}).items():
        lines.append(f"fault-back, {int(bs) // KiB} KiB: fio O_DIRECT read "
                     f"p50 {f['fio_p50_us']:.0f}, p99 "
                     f"{f['fio_p99_us']:.0f} us (goal <= 1.5x)")
        if 'wait_p50_us' in f:
            lines.append(f"  the faulting thread waited (agent's read of the "
                         f"fault to its wake): p50 {f['wait_p50_us']} us, "
                         f"p99 {f['wait_p99_us']} us; ratio p50 "
                         f"{f['ratio_wait_p50']:.2f}, p99 "
                         f"{f['ratio_wait_p99']:.2f}")
        lines.append(f"  hostd's notice to MAP_BACK's reply: p50 "
                     f"{f['p50_us']} us, p99 {f['p99_us']} us; ratio p50 "
                     f"{f['ratio_p50']:.2f}, p99 {f['ratio_p99']:.2f}")
        ph = f.get('phases_us')
        if ph and ph.get('timed'):
            n = f['faults']
            lines.append("  per fault, µs: " + ', '.join(
                f"{k} {ph[k] / n:.0f}" for k in
                ('queue', 'read', 'check', 'write', 'map')) +
                f"; of the map, up to the wake {ph['wake'] / ph['timed']:.0f}"
                f"; the agent's hand-off {ph['handoff'] / ph['timed']:.0f}")
    for bs, q in res.get('sequential', {}).items():
        lines.append(f"sequential scan of purged blocks, {int(bs) // KiB} KiB:"
                     f" read-ahead on {q['on']['mibs']:.0f} MiB/s "
                     f"({q['on']['faults']} faults), off "
                     f"{q['off']['mibs']:.0f} MiB/s ({q['off']['faults']} "
                     f"faults): {q['speedup']:.2f}x")
    g = res.get('guest', {})
    if 'skipped' in g:
        lines.append(f"guest: skipped ({g['skipped']})")
    elif g:
        lines.append(f"guest hot-set sweeps/s: stock {g['stock']['sweeps_per_s']:.1f}, "
                     f"patched {g['patched']['sweeps_per_s']:.1f}, purging "
                     f"{g['purging']['sweeps_per_s']:.1f}; purging/patched "
                     f"{g['ratio_purging_vs_patched']:.3f} (goal >= 0.98), "
                     f"patched/stock {g['ratio_patched_vs_stock']:.3f}")
        if g.get('samples'):
            last = g['samples'][-1]
            lines.append(f"  NVM saved after {last['t']:.0f} s: "
                         f"{last['saved'] // MiB} MiB; fault-backs "
                         f"{last['faults']}")
    sc = res.get('scale')
    if sc:
        lines.append(f"scale: {sc['data_blocks']} isolated 64 KiB blocks of a "
                     f"64 GiB NVDIMM: {sc['purged']} purged in "
                     f"{sc['purge_seconds']:.1f} s; QEMU VMAs "
                     f"{sc['qemu_vmas_before']} -> {sc['qemu_vmas_after']}; "
                     f"hostd RSS {sc['hostd_rss_kib_before'] // 1024} -> "
                     f"{sc['hostd_rss_kib_after'] // 1024} MiB; table "
                     f"{sc['vbt_bytes'] // MiB} MiB; 100 read back in "
                     f"{sc['read_back_100_s']:.2f} s ({sc['read_back_ok']})")
    return '\n'.join(lines)


def plot(res, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 4, figsize=(19, 4.2))
    ax = axes[0]
    t = res.get('throughput', {})
    labels = [f'{int(b) // KiB} KiB' for b in t]
    xs = range(len(labels))
    ax.bar([x - 0.2 for x in xs],
           [statistics.median(v['purge_mibs']) for v in t.values()], 0.4,
           label='purge-now')
    ax.bar([x + 0.2 for x in xs],
           [statistics.median(v['fio_mibs']) for v in t.values()], 0.4,
           label='fio seq write')
    ax.set_xticks(list(xs), labels)
    ax.set_ylabel('MiB/s')
    ax.set_title('purge throughput')
    ax.legend()
    ax = axes[1]
    f = res.get('faultback', {})
    labels = [f'{int(b) // KiB} KiB' for b in f]
    xs = range(len(labels))
    for i, (key, name) in enumerate((('wait_p50_us', 'thread waited p50'),
                                      ('p50_us', "hostd's figure p50"),
                                      ('fio_p50_us', 'fio read p50'),
                                      ('wait_p99_us', 'thread waited p99'),
                                      ('p99_us', "hostd's figure p99"),
                                      ('fio_p99_us', 'fio read p99'))):
        ax.bar([x - 0.375 + i * 0.15 for x in xs],
               [v.get(key, 0) / 1000 for v in f.values()], 0.15, label=name)
    ax.set_xticks(list(xs), labels)
    ax.set_ylabel('ms')
    ax.set_yscale('log')
    ax.set_title('one block back vs O_DIRECT read')
    ax.legend(fontsize=7)
    ax = axes[2]
    q = res.get('sequential', {})
    labels = [f'{int(b) // KiB} KiB' for b in q]
    xs = range(len(labels))
    ax.bar([x - 0.2 for x in xs], [v['on']['mibs'] for v in q.values()], 0.4,
           label='read-ahead on')
    ax.bar([x + 0.2 for x in xs], [v['off']['mibs'] for v in q.values()], 0.4,
           label='read-ahead off')
    ax.set_xticks(list(xs), labels)
    ax.set_ylabel('MiB/s')
    ax.set_title('reading purged blocks in order')
    ax.legend(fontsize=7)
    ax = axes[3]
    s = res.get('guest', {}).get('samples', [])
    if s:
        ax.plot([x['t'] for x in s], [x['saved'] / MiB for x in s],
                label='NVM saved (MiB)')
        ax2 = ax.twinx()
        ax2.plot([x['t'] for x in s], [x['faults'] for x in s], 'r--',
                 label='fault-backs')
        ax2.set_ylabel('fault-backs (cumulative)')
        ax.set_xlabel('s')
        ax.set_ylabel('MiB')
        ax.set_title('guest: saved over time, refaults')
        ax.legend(loc='lower right')
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    args = sys.argv[1:]
    quick = '--quick' in args
    parts = [a for a in args if not a.startswith('--')] or \
        ['throughput', 'faultback', 'sequential', 'guest', 'scale']
    res = benchlib.new_results(quick=quick)
    for p in parts:
        print(f'{p}:', flush=True)
        globals()[f'bench_{p}'](res, quick)
    benchlib.save(res, HERE, report, plot)


if __name__ == '__main__':
    main()
