#!/usr/bin/python3
"""Per-flush latency of NVDIMM flush hints, side by side in one run.

Part KVM (freestanding guest, -accel kvm, one VM of the patched QEMU):
  fha-rom     flush hint, ROM-device mapping, memfd backend (host flush ~free)
  fha-mmio    the same page mapped as plain MMIO (x-flush-hint-mmio=on)
  no-trap     flush-hint=auto on a backend with nothing to flush
  bare-mmio   a store to pc-testdev's MMIO: the bare KVM MMIO exit round trip
  ram         a store to ordinary guest RAM
and bare-mmio again in stock QEMU 10.0, measured right after.
Latencies are TSC cycles timed by the guest around each store (+ sfence);
exit counts come from KVM's mmio_exits statistic.

Part TCG (Linux 6.12 guest, one VM of the patched QEMU, and stock QEMU):
  each region's flush timed in the guest by kvmx-flushbench (writes 1 to
  regionN/deep_flush: a flush hint write for NFIT NVDIMMs, a virtqueue
  request for virtio-pmem):
  fha-rom, fha-mmio, no-trap (memfd / RAM as above), fha-rom-disk (file on
  disk: a real fdatasync), virtio-pmem (memfd), and stock QEMU's NVDIMM
  without flush hints (the flush never reaches the host).

Writes results/<stamp>.json, prints a table, and plots
results/<stamp>.png.  Usage: bench/flush/run.py [--n N] [--skip-tcg]
"""
import argparse
import json
import os
import re
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, 'tests', 'lib'))
sys.path.insert(0, os.path.dirname(HERE))
import benchlib  # noqa: E402
import kvmxvm  # noqa: E402
from fsguest import FsGuest  # noqa: E402

SIZE = 64 << 20
TESTDEV_MMIO = 0xff000000
RAM_ADDR = 0x8000000


def mmio_exits(vm):
    res = vm.qmp.cmd('query-stats', target='vcpu',
                     providers=[{'provider': 'kvm', 'names': ['mmio_exits']}])
    return sum(s['value'] for r in res for s in r['stats'])


def kvm_part(n, work):
    qemu = kvmxvm.patched_qemu()
    elf = os.path.join(ROOT, 'build', 'tests', 'kvm-guest',
                       'kvmx-testguest.elf')
    base = ['-accel', 'kvm', '-machine', 'q35,nvdimm=on', '-cpu', kvmxvm.kvm_cpu_model(qemu),
            '-m', '256M,slots=4,maxmem=4G', '-no-reboot', '-kernel', elf,
            '-device', 'isa-debug-exit,iobase=0xf4,iosize=0x04',
            '-device', 'pc-testdev']
    patched = base + [
        '-object', f'memory-backend-memfd,id=m0,size={SIZE}',
        '-device', 'nvdimm,id=nv0,memdev=m0,flush-hint=on',
        '-object', f'memory-backend-memfd,id=m1,size={SIZE}',
        '-device', 'nvdimm,id=nv1,memdev=m1,flush-hint=on,x-flush-hint-mmio=on',
        '-object', f'memory-backend-ram,id=m2,size={SIZE}',
        '-device', 'nvdimm,id=nv2,memdev=m2,flush-hint=auto']
    out = {}
    with kvmxvm.Vm(kvmxvm.patched_qemu(), patched, work, 'bench-kvm') as vm:
        vm.start()
        g = FsGuest(vm.serial_stream(), timeout=600)
        g.wait_ready(60)
        khz, src = g.tsc_khz()
        out['tsc_khz'] = khz
        fha = {i['id']: i['addresses'][0]
               for i in vm.qmp.cmd('query-nvdimm-flush')}
        targets = [('fha-rom', fha['nv0']), ('fha-mmio', fha['nv1']),
                   ('no-trap', fha['nv2']), ('bare-mmio', TESTDEV_MMIO),
                   ('ram', RAM_ADDR)]
        for name, addr in targets:
            e0 = mmio_exits(vm)
            w = g.timed_write(addr, n)
            e1 = mmio_exits(vm)
            r = g.timed_read(addr, n)
            e2 = mmio_exits(vm)
            out[name] = {'write': w, 'read': r,
                         'write_exits_per_op': (e1 - e0) / n,
                         'read_exits_per_op': (e2 - e1) / n}
        g.quit(0)
    stock = base
    with kvmxvm.Vm(kvmxvm.stock_qemu(), stock, work, 'bench-kvm-stock') as vm:
        vm.start()
        g = FsGuest(vm.serial_stream(), timeout=600)
        g.wait_ready(60)
        e0 = mmio_exits(vm)
        w = g.timed_write(TESTDEV_MMIO, n)
        e1 = mmio_exits(vm)
        out['bare-mmio-stock'] = {'write': w,
                                  'write_exits_per_op': (e1 - e0) / n}
        g.quit(0)
    return out


TCG_SCRIPT = r'''
args=""
for r in /sys/bus/nd/devices/region*; do
  r=$(basename $r)
  echo "REGION $r $(cat /sys/bus/nd/devices/$r/resource 2>/dev/null)"
  [ -w /sys/bus/nd/devices/$r/deep_flush ] && args="$args $r=$r"
  for b in /sys/bus/nd/devices/$r/namespace*/block/*; do
    [ -e "$b" ] && args="$args fsync-$r=/dev/$(basename $b)"
  done
done
/opt/kvmx/kvmx-flushbench -n __N__ $args | sed 's/^/RESULT /'
'''


def tcg_run(qemu, args, work, name, n):
    script = TCG_SCRIPT.replace('__N__', str(n))
    with kvmxvm.start_guest(qemu, script, args, work, name,
                            append_extra='kvmx.modules=virtio_pmem') as vm:
        devs = vm.qmp.cmd('query-memory-devices')
        rc = kvmxvm.wait_guest_exit(vm, 1800)
        text = vm.console_text()
    if rc != 0:
        raise RuntimeError(f'{name}: guest script failed ({rc}):\n{text[-2000:]}')
    addr2id = {}
    for d in devs:
        data = d['data']
        addr2id[data.get('addr', data.get('memaddr'))] = data['id']
    region2id = {m[1]: addr2id.get(int(m[2], 16))
                 for m in re.finditer(r'REGION (\S+) (0x[0-9a-f]+)', text)}
    res = {}
    for m in re.finditer(r'RESULT (\{.*\})', text):
        r = json.loads(m[1])
        label = r['label']
        kind = 'fsync' if label.startswith('fsync-') else 'flush'
        dev = region2id.get(label.removeprefix('fsync-'), label)
        res.setdefault(dev, {})[kind] = r
    return res


def tcg_part(n, work):
    img = os.path.join(work, 'disk.img')
    with open(img, 'wb') as f:
        f.truncate(SIZE)
    mem = ['-machine', 'q35,nvdimm=on', '-m', '512M,slots=8,maxmem=4G']
    patched = mem + [
        '-object', f'memory-backend-memfd,id=m0,size={SIZE}',
        '-device', 'nvdimm,id=fha-rom,memdev=m0,flush-hint=on',
        '-object', f'memory-backend-memfd,id=m1,size={SIZE}',
        '-device', 'nvdimm,id=fha-mmio,memdev=m1,flush-hint=on,x-flush-hint-mmio=on',
        '-object', f'memory-backend-ram,id=m2,size={SIZE}',
        '-device', 'nvdimm,id=no-trap,memdev=m2,flush-hint=auto',
        '-object', f'memory-backend-file,id=m3,share=on,mem-path={img},size={SIZE}',
        '-device', 'nvdimm,id=fha-rom-disk,memdev=m3,flush-hint=on',
        '-object', f'memory-backend-memfd,id=m4,size={SIZE}',
        '-device', 'virtio-pmem-pci,id=virtio-pmem,memdev=m4']
    out = tcg_run(kvmxvm.patched_qemu(), patched, work, 'bench-tcg', n)
    stock = mem + ['-object', f'memory-backend-memfd,id=m0,size={SIZE}',
                   '-device', 'nvdimm,id=stock-no-hints,memdev=m0']
    out.update(tcg_run(kvmxvm.stock_qemu(), stock, work, 'bench-tcg-stock', n))
    return out


TCG_ROWS = ('fha-rom', 'fha-mmio', 'no-trap', 'fha-rom-disk', 'virtio-pmem',
            'stock-no-hints')


def cyc_us(c, khz):
    return c / khz * 1000.0


def report(res):
    lines = []
    m = res['machine']
    lines.append(f"machine: {m['cpu']}, {m['cores']} cores, kernel "
                 f"{m['kernel']}, hardware virtualization: {m['hw_virt']}")
    k = res.get('kvm')
    if k:
        khz = k['tsc_khz']
        lines.append(f"\nKVM, freestanding guest, n={res['n']} per row "
                     f"(TSC {khz} kHz); latency of one store + sfence, us")
        lines.append(f"{'target':<16}{'p50':>9}{'p90':>9}{'p99':>9}"
                     f"{'max':>10}{'exits/wr':>10}{'exits/rd':>10}")
        for name in ('fha-rom', 'fha-mmio', 'no-trap', 'bare-mmio', 'ram',
                     'bare-mmio-stock'):
            r = k[name]
            w = r['write']
            lines.append(f"{name:<16}{cyc_us(w['p50'], khz):>9.2f}"
                         f"{cyc_us(w['p90'], khz):>9.2f}"
                         f"{cyc_us(w['p99'], khz):>9.2f}"
                         f"{cyc_us(w['max'], khz):>10.2f}"
                         f"{r['write_exits_per_op']:>10.2f}"
                         f"{r.get('read_exits_per_op', float('nan')):>10.2f}")
        ratio = k['fha-rom']['write']['p50'] / k['bare-mmio']['write']['p50']
        lines.append(f"fha-rom / bare-mmio (p50): {ratio:.2f}x "
                     f"(target <= 1.2x)")
    t = res.get('tcg')
    if t:
        lines.append(f"\nTCG, Linux 6.12 guest, kvmx-flushbench n={res['n_tcg']}"
                     f"; us per operation")
        lines.append(f"{'device':<16}{'flush p50':>11}{'p99':>9}"
                     f"{'4K+fsync p50':>14}{'p99':>9}")
        for name in TCG_ROWS:
            if name not in t:
                continue
            f, s = t[name].get('flush'), t[name].get('fsync')
            fl = (f"{f['p50_ns'] / 1e3:>11.2f}{f['p99_ns'] / 1e3:>9.2f}"
                  if f else f"{'(none)':>11}{'':>9}")
            fs = (f"{s['p50_ns'] / 1e3:>14.2f}{s['p99_ns'] / 1e3:>9.2f}"
                  if s else '')
            lines.append(f"{name:<16}{fl}{fs}")
    return '\n'.join(lines)


def plot(res, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    panels = [p for p in ('kvm', 'tcg') if res.get(p)]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4))
    if len(panels) == 1:
        axes = [axes]
    for ax, p in zip(axes, panels):
        d = res[p]
        if p == 'kvm':
            khz = d['tsc_khz']
            names = ['fha-rom', 'fha-mmio', 'no-trap', 'bare-mmio', 'ram',
                     'bare-mmio-stock']
            vals = [[cyc_us(d[n]['write'][q], khz) for q in ('p50', 'p90', 'p99')]
                    for n in names]
            ax.set_title('KVM: one flush-hint store (freestanding guest)')
        else:
            names = [n for n in TCG_ROWS if n in d and 'fsync' in d[n]]
            vals = [[d[n]['fsync'][q] / 1e3 for q in ('p50_ns', 'p90_ns',
                                                     'p99_ns')]
                    for n in names]
            ax.set_title('TCG: 4 KiB write + fsync (Linux guest)')
            ax.set_yscale('log')
        x = range(len(names))
        for i, (q, c) in enumerate(zip(('p50', 'p90', 'p99'),
                                       ('tab:blue', 'tab:orange', 'tab:red'))):
            ax.bar([xi + (i - 1) * 0.27 for xi in x], [v[i] for v in vals],
                   width=0.27, label=q, color=c)
        ax.set_xticks(list(x))
        ax.set_xticklabels(names, rotation=30, ha='right')
        ax.set_ylabel('microseconds')
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--n', type=int, default=20000,
                    help='stores per KVM row (default 20000)')
    ap.add_argument('--n-tcg', type=int, default=2000,
                    help='flushes per TCG row (default 2000)')
    ap.add_argument('--skip-tcg', action='store_true')
    ap.add_argument('--skip-kvm', action='store_true')
    a = ap.parse_args()
    work = tempfile.mkdtemp(prefix='bench-flush-', dir=kvmxvm.scratch_dir())
    res = benchlib.new_results(n=a.n, n_tcg=a.n_tcg)
    if not a.skip_kvm:
        res['kvm'] = kvm_part(a.n, work)
    if not a.skip_tcg:
        res['tcg'] = tcg_part(a.n_tcg, work)
    benchlib.save(res, HERE, report, plot)
    return 0


if __name__ == '__main__':
    sys.exit(main())
