#!/usr/bin/python3
"""What post-copy with a file-backed NVDIMM costs, side by side in one run
(issue 12, item 1).  One VM: Debian 6.12 guest under TCG, 1 GiB RAM, a
256 MiB NVDIMM on a file on disk, 96 MiB of it written with random data
first.  The guest keeps writing (and syncing) 64 KiB of the NVDIMM and
rewriting 64 KiB of RAM every --pmem-rate-ms while it migrates over a Unix
socket capped at --bandwidth.

  stock-precopy      Debian's QEMU 10.0, precopy (it refuses post-copy)
  kvmx-precopy       the patched QEMU, precopy
  kvmx-postcopy      patched, switch to post-copy after --switch-after s;
                     the NVDIMM goes before the switch (separate files)
  kvmx-postcopy-shared  the same with one shared file and x-ignore-shared

For each: total time, downtime, bytes sent, post-copy page requests, the
destination's post-load flush of the NVDIMM (trace
nvdimm_flush_hint_incoming) and, for stock, whether post-copy was refused.
Writes results/<stamp>.{json,txt,png}.  Usage: bench/migrate/run.py
[--bandwidth MiB/s] [--switch-after S] [--pmem-rate-ms MS]
"""
import argparse
import os
import re
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, 'tests', 'lib'))
sys.path.insert(0, os.path.dirname(HERE))
import benchlib  # noqa: E402
import kvmxtest  # noqa: E402
import kvmxvm  # noqa: E402

SIZE = 256 << 20

SCRIPT = r'''
dd if=/dev/urandom of=/dev/pmem0 bs=1M count=96 seek=128 conv=fsync 2>/dev/null
dd if=/dev/urandom of=/dev/shm/x bs=1M count=128 2>/dev/null
echo READY
i=0
while :; do
  dd if=/dev/urandom of=/dev/pmem0 bs=64k count=1 seek=$((i % 4096)) conv=fsync 2>/dev/null
  dd if=/dev/zero of=/dev/shm/x bs=64k count=1 seek=$((i % 2048)) conv=notrunc 2>/dev/null
  i=$((i+1))
  sleep 0.PAUSE
done
'''


def vm_args(img, patched):
    dev = 'nvdimm,id=nv0,memdev=mem1' + (',flush-hint=on' if patched else '')
    extra = ['-trace', 'nvdimm_flush_hint_incoming'] if patched else []
    return kvmxtest.nvdimm_args(img, SIZE, device=dev) + extra


def caps(vm, **c):
    vm.qmp.cmd('migrate-set-capabilities', capabilities=[
        {'capability': k.replace('_', '-'), 'state': v} for k, v in c.items()])


def one(name, qemu, patched, work, args, postcopy, shared):
    src_img = kvmxtest.backing_file(work, f'{name}-src.img', SIZE)
    dst_img = src_img if shared else kvmxtest.backing_file(
        work, f'{name}-dst.img', SIZE)
    sock = os.path.join(work, f'{name}.sock')
    script = SCRIPT.replace('PAUSE', f'{args.pmem_rate_ms:03d}')
    res = {'name': name}
    with kvmxvm.start_guest(qemu, script, vm_args(src_img, patched), work,
                            f'{name}-src') as src:
        src.wait_console(r'READY', 300)
        time.sleep(2)
        with kvmxvm.start_guest(qemu, None, vm_args(dst_img, patched) +
                                ['-incoming', 'defer'], work,
                                f'{name}-dst') as dst:
            c = dict(x_ignore_shared=shared) if shared else {}
            if postcopy:
                c['postcopy_ram'] = True
            if c:
                caps(dst, **c)
            dst.qmp.cmd('migrate-incoming', uri=f'unix:{sock}')
            if c:
                caps(src, **c)
            src.qmp.cmd('migrate-set-parameters', **{
                'max-bandwidth': args.bandwidth << 20})
            t0 = time.monotonic()
            src.qmp.cmd('migrate', uri=f'unix:{sock}')
            if postcopy:
                time.sleep(args.switch_after)
                src.qmp.cmd('migrate-start-postcopy')
            try:
                while True:
                    info = src.qmp.cmd('query-migrate')
                    if info.get('status') in ('completed', 'failed',
                                              'cancelled'):
                        break
                    time.sleep(0.1)
            except (kvmxvm.QmpError, kvmxvm.QemuExited, OSError):
                # Stock QEMU 10.0 aborts here under TCG (the bug of
                # qemu-patches/00-fixes): record it, do not stop the run.
                err = src.stderr_text().strip().splitlines()
                info = {'status': 'crashed',
                        'error': err[-1] if err else 'QEMU exited'}
            res['wall_s'] = time.monotonic() - t0
            res['error'] = info.get('error')
            ram = info.get('ram', {})
            res.update(status=info['status'],
                       total_ms=info.get('total-time'),
                       downtime_ms=info.get('downtime'),
                       transferred=ram.get('transferred'),
                       postcopy_requests=ram.get('postcopy-requests'),
                       ram_total=ram.get('total'))
            time.sleep(1)
            m = re.findall(r'nvdimm_flush_hint_incoming .*ret=(-?\d+) in '
                           r'(\d+) us', dst.stderr_text())
            res['dst_flush_us'] = int(m[-1][1]) if m else None
            dst.kill()
        src.kill()
    return res


def stock_refuses_postcopy(qemu, work):
    img = kvmxtest.backing_file(work, 'refuse.img', SIZE)
    with kvmxvm.Vm(qemu, ['-machine', 'q35,nvdimm=on,accel=tcg',
                          '-incoming', 'defer'] +
                   vm_args(img, False)[2:], work, 'refuse').start() as vm:
        try:
            caps(vm, postcopy_ram=True)
            return None
        except kvmxvm.QmpError as e:
            return str(e)


def report(res):
    lines = [f"{res['machine']['cpu']}, {res['machine']['cores']} cores, "
             f"kernel {res['machine']['kernel']}",
             f"command: {res['command']}",
             f"stock QEMU post-copy: {res['stock_postcopy']}",
             '',
             f"{'mode':22} {'status':10} {'total ms':>9} {'downtime':>9} "
             f"{'MiB sent':>9} {'requests':>9} {'dst flush':>10} "
             f"{'total/base':>11}"]
    base_name = next((r['name'] for r in res['runs'] if r['total_ms']),
                     None)
    base = next((r['total_ms'] for r in res['runs']
                 if r['name'] == base_name), None)
    for r in res['runs']:
        ratio = (f"{r['total_ms'] / base:.2f}" if base and r['total_ms']
                 else '-')
        lines.append(
            f"{r['name']:22} {r['status']:10} {r['total_ms'] or 0:9} "
            f"{r['downtime_ms'] or 0:9} "
            f"{(r['transferred'] or 0) / 2**20:9.1f} "
            f"{r['postcopy_requests'] or 0:9} "
            f"{(str(r['dst_flush_us']) + ' us') if r['dst_flush_us'] is not None else '-':>10} "
            f"{ratio:>11}")
    for r in res['runs']:
        if r.get('error'):
            lines.append(f"{r['name']}: {r['error']}")
    lines.append(f'base of the ratios: {base_name}')
    return '\n'.join(lines)


def plot(res, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    runs = [r for r in res['runs'] if r['total_ms']]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    names = [r['name'] for r in runs]
    ax[0].barh(names, [r['total_ms'] / 1000 for r in runs])
    ax[0].set_xlabel('total migration time (s)')
    ax[1].barh(names, [(r['transferred'] or 0) / 2**20 for r in runs])
    ax[1].set_xlabel('MiB sent')
    fig.suptitle('VM with a 256 MiB file-backed NVDIMM, TCG, '
                 f"{res['bandwidth']} MiB/s")
    fig.tight_layout()
    fig.savefig(path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--bandwidth', type=int, default=64)
    ap.add_argument('--switch-after', type=float, default=3.0)
    ap.add_argument('--pmem-rate-ms', type=int, default=200)
    args = ap.parse_args()
    kvmxtest.require_guest_image()
    patched, stock = kvmxvm.patched_qemu(), kvmxvm.stock_qemu()
    work = kvmxtest.workdir('bench-migrate-')
    res = benchlib.new_results(bandwidth=args.bandwidth,
                               switch_after=args.switch_after,
                               pmem_rate_ms=args.pmem_rate_ms)
    res['stock_postcopy'] = stock_refuses_postcopy(stock, work) or 'accepted'
    res['runs'] = [
        one('stock-precopy', stock, False, work, args, False, False),
        one('kvmx-precopy', patched, True, work, args, False, False),
        one('kvmx-postcopy', patched, True, work, args, True, False),
        one('kvmx-postcopy-shared', patched, True, work, args, True, True),
    ]
    benchlib.save(res, HERE, report, plot)


if __name__ == '__main__':
    sys.exit(main())
