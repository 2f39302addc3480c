#!/usr/bin/python3
"""Guest-requested memory protection, measured side by side in one run.

host   build/bench/kvmx-bench-mechanisms: mprotect() of 4 KiB / 2 MiB /
       1 GiB on the host (the reference), a KVM read-only memslot split +
       merge of the same sizes, uffd-wp on + off; violation delivery of
       mprotect (SIGSEGV) and uffd-wp.
kvm    patched QEMU, -accel kvm, freestanding guest playing the guest
       driver (as tests/integration/test_protect_kvm.py): PROTECT +
       UNPROTECT round trips of 4 KiB and 1 GiB (one guest-physically
       contiguous extent), timed on the host around the doorbell stores
       minus a plain store's round trip; the vCPU's cost of one violating
       store vs a store to RAM (guest TSC); exits counted by KVM.
tcg    Linux 6.12 guest (TCG) with kvmx_guest.ko: kvmx-protbench (protect +
       unprotect of 4 KiB, 2 MiB, 1 GiB through /dev/kvmx vs the guest's
       own mprotect; SIGSEGV delivery; a write-heavy loop with no tracking,
       with kvmx dirty tracking, with mprotect-based tracking).

Writes results/<stamp>.{json,txt,png}.  Usage:
  bench/protect/run.py [--reps N] [--skip-kvm] [--skip-tcg] [--skip-host]
"""
import argparse
import json
import os
import re
import statistics
import struct
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, 'tests', 'lib'))
sys.path.insert(0, os.path.dirname(HERE))
import benchlib  # noqa: E402
sys.path.insert(0, os.path.join(ROOT, 'tests', 'integration'))
import kvmxvm  # noqa: E402
from fsguest import FsGuest  # noqa: E402
from test_protect_kvm import Chan, find_chan, mmio_exits  # noqa: E402

BUILD = os.environ.get('KVMX_BUILD_DIR') or os.path.join(ROOT, 'build')
GIB = 1 << 30


def json_lines(text):
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith('{') and line.endswith('}'):
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


def host_part(reps):
    exe = os.path.join(BUILD, 'bench', 'kvmx-bench-mechanisms')
    p = subprocess.run([exe, '-n', str(reps)], capture_output=True, text=True,
                       check=True)
    return json_lines(p.stdout)


def kvm_part(reps, work):
    qemu = kvmxvm.patched_qemu()
    elf = os.path.join(BUILD, 'tests', 'kvm-guest', 'kvmx-testguest.elf')
    args = ['-accel', 'kvm', '-machine', 'q35', '-cpu', kvmxvm.kvm_cpu_model(qemu), '-m', '1536M',
            '-no-reboot', '-kernel', elf,
            '-device', 'isa-debug-exit,iobase=0xf4,iosize=0x04',
            '-device', 'kvmx-chan,id=chan0']
    res = {}
    with kvmxvm.Vm(qemu, args, work, 'bench-kvm') as vm:
        vm.start()
        g = FsGuest(vm.serial_stream(), timeout=300)
        g.wait_ready(60)
        bus, slot, fn, bar = find_chan(vm)
        g.out(0xcf8, 4, 0x80000000 | bus << 16 | slot << 11 | fn << 8 | 4)
        g.out(0xcfc, 2, 0x0006)
        chan = Chan(g, bar)
        khz = int(re.search(r'khz=(\d+)', g.command('tsc')).group(1))
        res['tsc_khz'] = khz

        def rtt(fn_, n):
            t = []
            for _ in range(n):
                t0 = time.perf_counter()
                fn_()
                t.append((time.perf_counter() - t0) * 1e6)
            return statistics.median(t)

        base = rtt(lambda: g.poke(0x700000, 4, 0), reps)
        # A request costs 4 commands besides the doorbell (header words are
        # written once and reused: only the doorbell differs per rep).
        for name, addr, size in (('4K', 0xA00000, 4096),
                                 ('1G', 0x10000000, GIB)):
            t = []
            for i in range(reps):
                for op in (2, 3):        # PROTECT, UNPROTECT
                    hdr = dict(op=op, id_=100 + i, access=1, action=1,
                               extents=[(addr, size)] if op == 2 else [])
                    # write the request (not timed), then time the doorbell
                    body_len = 64 + 16 * len(hdr['extents'])
                    t0_cost = None
                    words = struct.pack('<IIiIQIIiIQQQ', op, body_len, 0,
                                        len(hdr['extents']), 100 + i, 1, 1, 0,
                                        0, 0, 0, 0) + b''.join(
                        struct.pack('<QQ', a, n) for a, n in hdr['extents'])
                    for off in range(0, len(words), 8):
                        g.poke(0x800000 + off, 8,
                               struct.unpack_from('<Q', words, off)[0])
                    g.poke(bar + 0x08, 4, 0x800000)
                    g.poke(bar + 0x0c, 4, 0)
                    t0 = time.perf_counter()
                    g.poke(bar + 0x10, 4, body_len)
                    t0_cost = (time.perf_counter() - t0) * 1e6 - base
                    st = g.peek(bar + 0x14, 4)
                    if st:
                        raise RuntimeError(f'request op {op} failed: {st:#x}')
                    t.append(t0_cost)
            # t alternates protect, unprotect
            pairs = [t[j] + t[j + 1] for j in range(0, len(t), 2)]
            res[f'protect+unprotect-{name}'] = statistics.median(pairs)
        # The vCPU's cost of a violating store vs a store to RAM.
        st, _ = chan.request(2, 500, 1, 1, [(0xA00000, 4096)])
        assert st == 0
        e0 = mmio_exits(vm)
        tw = g.command(f'tw {0xA00000:#x} 2000')
        res['exits-2000-violations'] = mmio_exits(vm) - e0
        res['violation-store-cycles'] = int(re.search(r'p50=(\d+)', tw).group(1))
        chan.request(3, 500)
        tw = g.command(f'tw {0xA00000:#x} 2000')
        res['ram-store-cycles'] = int(re.search(r'p50=(\d+)', tw).group(1))
        g.command('q 0')
    return res


TCG_SCRIPT = r'''
insmod /opt/kvmx/kvmx_guest.ko || exit 3
echo BENCH-BEGIN
/opt/kvmx/kvmx-protbench --sizes 4K,2M,1G --reps REPS --loop-bytes 64M --passes 5
echo "BENCH-RC=$?"
echo BENCH-END
'''


def tcg_part(reps, work):
    qemu = kvmxvm.patched_qemu()
    rc, con = kvmxvm.run_guest_script(
        qemu, TCG_SCRIPT.replace('REPS', str(reps)),
        ['-device', 'kvmx-chan,id=chan0', '-smp', '2'], work, 'bench-tcg',
        timeout=3600, mem='3G')
    body = con[con.find('BENCH-BEGIN'):con.find('BENCH-END')]
    if rc != 0 or 'BENCH-RC=0' not in body:
        raise RuntimeError(f'guest benchmark failed (rc {rc}):\n{body[-2000:]}')
    return json_lines(body)


def fmt_size(b):
    return {4096: '4 KiB', 2 << 20: '2 MiB', GIB: '1 GiB'}.get(b, f'{b} B')


def report(res):
    lines = [f"# kvmx guest memory protection benchmark, {res['date']}",
             f"command: {res['command']}",
             f"machine: {res['machine']}", '']
    host = {(r['mechanism'], r['what'], r['bytes']): r['us']
            for r in res.get('host', [])}
    tcg = {(r['what'], r['mech'], r['bytes']): r.get('us', r.get('us_per_pass'))
           for r in res.get('tcg', [])}
    if host:
        lines += ['## protect + unprotect, µs (median)', '',
                  '| size | host mprotect | host mprotect (THP) | '
                  'host KVM memslot split+merge | host uffd-wp | '
                  'KVM guest: kvmx-chan | TCG guest: kvmx | '
                  'TCG guest: mprotect (THP) | KVM guest kvmx-chan / '
                  'host mprotect | TCG kvmx / TCG mprotect |',
                  '|---|---|---|---|---|---|---|---|---|---|']
        for b in (4096, 2 << 20, GIB):
            hm = host.get(('mprotect', 'protect+unprotect', b))
            kv = res.get('kvm', {}).get(
                {4096: 'protect+unprotect-4K', GIB: 'protect+unprotect-1G'}
                .get(b, ''))
            tk = tcg.get(('protect+unprotect', 'kvmx', b))
            tm = tcg.get(('protect+unprotect', 'mprotect', b))

            def f(v):
                return '—' if v is None else f'{v:.1f}'
            r1 = f'{kv / hm:.2f}x' if kv and hm else '—'
            r2 = f'{tk / tm:.1f}x' if tk and tm else '—'
            lines.append(f"| {fmt_size(b)} | {f(hm)} | "
                         f"{f(host.get(('mprotect-thp', 'protect+unprotect', b)))} | "
                         f"{f(host.get(('memslot', 'protect+unprotect', b)))} | "
                         f"{f(host.get(('uffd-wp', 'protect+unprotect', b)))} | "
                         f"{f(kv)} | {f(tk)} | {f(tm)} | {r1} | {r2} |")
        lines.append('')
    if res.get('tcg') or host:
        lines += ['## violation delivery, µs (median)', '',
                  '| path | µs |', '|---|---|']
        for k, v in (('host: mprotect → SIGSEGV handler',
                      host.get(('mprotect', 'violation-delivery', 4096))),
                     ('host: uffd-wp → event read by another thread',
                      host.get(('uffd-wp', 'violation-delivery', 4096))),
                     ('TCG guest: kvmx signal (write → SIGSEGV handler)',
                      tcg.get(('violation-delivery', 'kvmx', 4096))),
                     ('TCG guest: mprotect → SIGSEGV handler',
                      tcg.get(('violation-delivery', 'mprotect', 4096)))):
            if v is not None:
                lines.append(f'| {k} | {v:.1f} |')
        kvm = res.get('kvm')
        if kvm:
            khz = kvm['tsc_khz']
            lines.append(f"| KVM guest: vCPU cost of a violating store "
                         f"({kvm['exits-2000-violations']} exits for 2000) | "
                         f"{kvm['violation-store-cycles'] / khz * 1e3:.1f} |")
            lines.append(f"| KVM guest: a store to unprotected RAM | "
                         f"{kvm['ram-store-cycles'] / khz * 1e3:.1f} |")
        lines.append('')
    if res.get('tcg'):
        none = tcg.get(('write-loop', 'none', 64 << 20))
        lines += ['## write-heavy loop (64 MiB, one byte per 64), TCG guest, '
                  'µs per pass (median)', '',
                  '| tracking | µs per pass | overhead |', '|---|---|---|']
        for m in ('none', 'kvmx-track', 'mprotect-track'):
            v = tcg.get(('write-loop', m, 64 << 20))
            if v is not None:
                lines.append(f'| {m} | {v:.0f} | '
                             f'{v / none:.2f}x |' if none else f'| {m} | {v:.0f} | — |')
    return '\n'.join(lines)


def plot(res, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    host = {(r['mechanism'], r['bytes']): r['us'] for r in res.get('host', [])
            if r['what'] == 'protect+unprotect'}
    tcg = {(r['mech'], r['bytes']): r['us'] for r in res.get('tcg', [])
           if r['what'] == 'protect+unprotect'}
    sizes = [4096, 2 << 20, GIB]
    series = [('host mprotect', [host.get(('mprotect', b)) for b in sizes]),
              ('host memslot', [host.get(('memslot', b)) for b in sizes]),
              ('host uffd-wp', [host.get(('uffd-wp', b)) for b in sizes]),
              ('TCG guest kvmx', [tcg.get(('kvmx', b)) for b in sizes]),
              ('TCG guest mprotect', [tcg.get(('mprotect', b)) for b in sizes])]
    kvm = res.get('kvm', {})
    series.append(('KVM guest kvmx-chan', [kvm.get('protect+unprotect-4K'),
                                           None, kvm.get('protect+unprotect-1G')]))
    fig, ax = plt.subplots(figsize=(9, 4.5))
    w = 0.8 / len(series)
    for i, (name, vals) in enumerate(series):
        xs = [x + (i - len(series) / 2) * w + w / 2 for x in range(len(sizes))]
        ax.bar([x for x, v in zip(xs, vals) if v],
               [v for v in vals if v], width=w, label=name)
    ax.set_xticks(range(len(sizes)))
    ax.set_xticklabels([fmt_size(b) for b in sizes])
    ax.set_yscale('log')
    ax.set_ylabel('protect + unprotect, µs (log)')
    ax.set_title('Guest-requested protection vs mprotect (one run)')
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--reps', type=int, default=11)
    ap.add_argument('--skip-host', action='store_true')
    ap.add_argument('--skip-kvm', action='store_true')
    ap.add_argument('--skip-tcg', action='store_true')
    a = ap.parse_args()
    work = tempfile.mkdtemp(prefix='bench-protect-', dir=kvmxvm.scratch_dir())
    res = benchlib.new_results()
    if not a.skip_host:
        res['host'] = host_part(a.reps)
    if not a.skip_kvm:
        res['kvm'] = kvm_part(a.reps, work)
    if not a.skip_tcg:
        res['tcg'] = tcg_part(a.reps, work)
    benchlib.save(res, HERE, report, plot)
    return 0


if __name__ == '__main__':
    sys.exit(main())
