#!/usr/bin/python3
"""kvmx-hostctl with disk-backed page dedup (issue 13, item 4): kvmx-hostd
drives patched QEMUs (topic 07-disk-dedup) under TCG whose guest has read
DATA_MIB of files from a virtio-blk disk (a raw ext4 image both QEMUs open:
shared storage on one host) into its page cache.

 refusals  --disk-dedup=on without --shared-storage: migration-refused,
           saying so, nothing set on the destination; a snapshot into a
           directory that does not exist, over an existing file without
           --force, and a relative path over the API socket: refused
 migrate   kvmx-hostctl migrate --shared-storage multifd_channels=2 (dedup
           auto): the start line says disk dedup on and multifd, QEMU has
           both on, progress lines show references, the
           outcome line the pages as references and the destination's
           count; migrate-status: most of the cached data went as
           references, every one resolved, no mismatch; the guest's md5 of
           every file equals the host's on the destination
 snapshot  kvmx-hostctl snapshot of the destination to a file (dedup auto):
           progress, "pages as references", the VM stays paused; the file
           is much smaller than the guest's RAM in use
 restore   first onto a disk whose blocks of a cached file were changed
           after the snapshot: the restore fails, the guest never runs,
           the error names a changed block (hostd's, else QEMU's stderr);
           the blocks put back, a new QEMU (-incoming defer), kvmx-hostctl
           restore: references read from the disk, the guest runs and its
           md5s are right

Each part prints its time.  Skips (77) when the QEMU has no disk dedup.
"""
import json
import os
import re
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'lib'))
sys.path.insert(0, os.path.dirname(__file__))
import kvmxtest  # noqa: E402
import kvmxvm  # noqa: E402
import dedupdisk  # noqa: E402
from hostdctl import Hostd, hostd_binary  # noqa: E402
import test_disk_dedup as tdd  # noqa: E402  (its disk, guest and checks)

MIB = 1 << 20
PAGE = 4096
# Smaller than test_disk_dedup's: this test is about hostd, not QEMU.
tdd.DATA_MIB = DATA_MIB = 64
tdd.IMAGE_MIB = DATA_MIB + DATA_MIB // 4 + tdd.PAT_MIB + 32
tdd.GUEST_MEM = GUEST_MEM = 512 * MIB
BW = 128 * MIB
check = tdd.check


def hostctl():
    return os.path.join(os.path.dirname(hostd_binary()), 'kvmx-hostctl')


def ctl(hostd, *args, timeout=600):
    p = subprocess.run([hostctl(), '-s', hostd.sock] + [str(a) for a in args],
                       capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout, p.stderr


def hostd_qmp(work, name):
    return os.path.join(work, f'{name}-hostd.qmp')


def vm_args(work, name, img, incoming=False):
    args = tdd.vm_args(img, 'raw') + [
        '-qmp', f'unix:{hostd_qmp(work, name)},server=on,wait=off']
    if incoming:
        args += ['-incoming', 'defer']
    return args


def attach(hostd, work, name):
    rc, out, err = ctl(hostd, 'attach', f'vm={name}',
                       f'qmp={hostd_qmp(work, name)}')
    return check(rc == 0 and '"attached"' in out,
                 f'hostd attached {name} ({out.strip()[:120]} {err.strip()})')


def incoming(qemu, work, name, img):
    return kvmxvm.start_guest(qemu, None, vm_args(work, name, img, True), work,
                              name, mem=f'{GUEST_MEM // MIB}M')


def status(hostd, vm):
    rc, out, _ = ctl(hostd, '--json', 'migrate-status', f'vm={vm}')
    return json.loads(out).get('result', {}) if rc == 0 else {}


def refusals(hostd, work, src, dst):
    rc, out, err = ctl(hostd, 'migrate', 'vm=src', 'dest=dst',
                       '--disk-dedup=on')
    caps = {c['capability']: c['state']
            for c in dst.qmp.cmd('query-migrate-capabilities')}
    check(rc == 1 and 'migration-refused' in err and
          '--disk-dedup=on, but the storage is not said to be shared' in err
          and not caps.get('disk-dedup') and
          not dst.qmp.cmd('query-migrate').get('status'),
          f'--disk-dedup=on without --shared-storage: refused, nothing set '
          f'({err.strip()})')
    rc, out, err = ctl(hostd, 'snapshot', 'vm=src',
                       f'file={work}/no-such-dir/x.snap')
    check(rc == 1 and 'invalid-request' in err and 'does not exist' in err,
          f'a snapshot into a missing directory: refused ({err.strip()})')
    there = os.path.join(work, 'there.snap')
    with open(there, 'w') as f:
        f.write('precious')
    rc, out, err = ctl(hostd, 'snapshot', 'vm=src', f'file={there}')
    check(rc == 1 and "exists: name a new file" in err,
          f'a snapshot over an existing file: refused ({err.strip()})')
    rc, out, err = ctl(hostd, 'snapshot', 'vm=src', f'file={there}',
                       '--force')
    check(rc == 1 and 'is not a QEMU snapshot' in err and
          open(there).read() == 'precious',
          f'--force over a file that is no snapshot: refused, the file '
          f'stays ({err.strip()})')
    r = hostd.call('snapshot', vm='src', file='rel/x.snap')
    check(r.get('error', {}).get('code') == 'invalid-request' and
          'absolute path' in r['error']['message'],
          f'a relative path over the API: refused ({r})')
    check(src.qmp.cmd('query-status')['status'] == 'running',
          'after the refusals the source still runs')


def migrate(hostd, work, disk, src, dst):
    t0 = time.monotonic()
    rc, out, err = ctl(hostd, 'migrate', 'vm=src', 'dest=dst',
                       '--shared-storage', f'max_bandwidth={BW}',
                       'multifd_channels=2')
    took = time.monotonic() - t0
    print(f'--- kvmx-hostctl migrate ({took:.1f} s)\n{out}{err}---')
    lines = out.splitlines()
    if not check(rc == 0 and lines and 'completed' in lines[-1],
                 f'migrate: completed ({err.strip()})'):
        return False
    check(any('disk dedup on: disks' in l for l in lines),
          'migrate: the start line says disk dedup is on, and on which disks')
    check(any('multifd, 2 channels' in l for l in lines),
          'migrate: the start line says multifd with 2 channels')
    caps = {c['capability']: c['state']
            for c in src.qmp.cmd('query-migrate-capabilities')}
    chans = src.qmp.cmd('query-migrate-parameters').get('multifd-channels')
    check(caps.get('multifd') and caps.get('disk-dedup') and chans == 2,
          f'migrate: the source ran with multifd ({chans} channels) and '
          f'disk-dedup')
    check(any(re.search(r'precopy\s+pass \d+ .* refs \d+ \(', l)
              for l in lines) or took < 2,
          'migrate: progress lines show the pages sent as references')
    check(re.search(r'disk dedup: \d+ pages as references \(.* saved\), '
                    r'the destination resolved \d+', lines[-1]) is not None,
          f'migrate: the outcome line says how many went as references '
          f'({lines[-1]})')
    r = status(hostd, 'src')
    dd = r.get('dedup_stats', {})
    data_pages = DATA_MIB * MIB // PAGE
    check(r.get('dedup') and dd.get('pages_as_reference', 0) >= data_pages // 2
          and dd.get('references_resolved') == dd.get('pages_as_reference')
          and dd.get('mismatches') == 0 and dd.get('read_errors') == 0,
          f'migrate: most of the {data_pages} cached pages went as references, '
          f'all resolved ({dd})')
    print(f'numbers migrate: {r.get("transferred", 0) / MIB:.1f} MiB sent, '
          f'{dd.get("pages_as_reference")} pages as references, '
          f'{dd.get("bytes_saved", 0) / MIB:.1f} MiB saved, {took:.1f} s')
    check(dst.qmp.cmd('query-status')['status'] == 'running',
          'migrate: the destination runs')
    tdd.md5_check(dst, disk, 'migrate', 'migrate')
    return True


def snapshot(hostd, work, dst):
    path = os.path.join(work, 'guest.snap')
    t0 = time.monotonic()
    rc, out, err = ctl(hostd, 'snapshot', 'vm=dst', f'file={path}')
    took = time.monotonic() - t0
    print(f'--- kvmx-hostctl snapshot ({took:.1f} s)\n{out}{err}---')
    lines = out.splitlines()
    if not check(rc == 0 and lines and 'completed' in lines[-1],
                 f'snapshot: completed ({err.strip()})'):
        return None
    m = re.search(r'(\d+) pages as references', lines[-1])
    check(m and int(m[1]) >= DATA_MIB * MIB // PAGE // 2 and
          'the VM is paused' in lines[-1],
          f'snapshot: the cached data went as references, the VM stays '
          f'paused ({lines[-1]})')
    st = dst.qmp.cmd('query-status')['status']
    check(st == 'postmigrate', f'snapshot: QEMU has the guest stopped ({st})')
    size = os.path.getsize(path)
    m = re.search(r'\((\d+\.\d) MiB saved\)', lines[-1])
    saved = float(m[1]) if m else 0
    print(f'numbers snapshot: file {size / MIB:.1f} MiB, {saved} MiB saved '
          f'by references, {took:.1f} s')
    check(saved >= DATA_MIB * 0.9,
          f'snapshot: the file ({size / MIB:.1f} MiB) is {saved} MiB smaller '
          f'than without dedup: most of the {DATA_MIB} MiB of cached data')
    rc, out, err = ctl(hostd, 'migrate-status', 'vm=dst')
    check(rc == 0 and out.startswith(f'dst snapshot {path}: ') and
          'saved' in out,
          f'snapshot: migrate-status shows it ({out.strip()[:160]})')
    rc, out, err = ctl(hostd, 'snapshot', 'vm=dst', f'file={path}')
    check(rc == 1 and 'exists' in err,
          f'snapshot: the same path again without --force: refused '
          f'({err.strip()})')
    return path


def restore_changed(hostd, work, qemu, disk, img, path):
    """Blocks of a cached file changed in the image after the snapshot: the
    restore fails (never a wrong page), the guest never runs; the blocks
    are put back afterwards."""
    fname = 'f05'
    blocks = disk.blocks(img, fname)[16:48]
    put_back = dedupdisk.change_blocks(img, blocks, PAGE)
    try:
        with incoming(qemu, work, 'bad', img) as r:
            if not attach(hostd, work, 'bad'):
                return
            rc, out, err = ctl(hostd, 'restore', 'vm=bad', f'file={path}')
            print(f'--- kvmx-hostctl restore onto a changed disk\n{out}{err}---')
            named = [b for b in blocks if f'{b * PAGE:#x}' in err]
            stderr = [ln for ln in r.stderr_text().splitlines()
                      if 'disk-dedup' in ln]
            print(f'note: the restoring QEMU\'s stderr: {stderr[:2]}')
            st = r.qmp.cmd('query-status')['status'] \
                if r.returncode is None else f'exit {r.returncode}'
            check(rc == 1 and 'migration-failed' in err and st != 'running',
                  f'restore onto a changed disk: fails, the guest does not '
                  f'run ({st}; {err.strip()[:200]})')
            m = re.search(r'(\d+) mismatches', err)
            check(m and int(m[1]) > 0,
                  f'restore onto a changed disk: hostd says the destination '
                  f'counted mismatches ({m and m[0]})')
            check(named or any(f'{b * PAGE:#x}' in ln for b in blocks
                               for ln in stderr),
                  f'restore onto a changed disk: the error names a changed '
                  f'block (hostd: {bool(named)}, QEMU stderr: '
                  f'{bool(stderr)})')
            r.kill()
        ctl(hostd, 'detach', 'vm=bad')
    finally:
        put_back()


def restore(hostd, work, qemu, disk, img, path):
    with incoming(qemu, work, 'rst', img) as r:
        if not attach(hostd, work, 'rst'):
            return
        t0 = time.monotonic()
        rc, out, err = ctl(hostd, 'restore', 'vm=rst', f'file={path}')
        took = time.monotonic() - t0
        print(f'--- kvmx-hostctl restore ({took:.1f} s)\n{out}{err}---')
        lines = out.splitlines()
        check(rc == 0 and lines and
              re.search(r'completed, \d+ pages read from the disk by '
                        r'reference; the guest runs', lines[-1]),
              f'restore: completed, references read, the guest runs '
              f'({lines[-1:]} {err.strip()})')
        check(r.qmp.cmd('query-status')['status'] == 'running',
              'restore: QEMU says running')
        tdd.md5_check(r, disk, 'restore', 'restore')
        print(f'numbers restore: {took:.1f} s')
        r.kill()


def main():
    kvmxtest.require_guest_image()
    qemu = kvmxvm.patched_qemu()
    if not os.access(hostd_binary(), os.X_OK):
        kvmxvm.skip(f'{hostd_binary()} is not built')
    lacks = tdd.dedup_support(qemu)
    if lacks:
        kvmxvm.skip(f'this QEMU has no disk dedup: {lacks}')
    qemu_img = os.path.join(os.path.dirname(qemu), 'qemu-img')
    work = kvmxtest.workdir('hostd-dedup-')
    if len(hostd_qmp(work, 'src')) > 100:
        kvmxvm.skip(f'work directory {work} too long for socket paths')
    t_start = time.monotonic()
    times = {}
    hostd = Hostd(work)
    try:
        disk = tdd.Disk(work)
        disk.build(qemu_img)
        hostd.start()
        img = disk.raw
        t0 = time.monotonic()
        src = kvmxvm.start_guest(qemu, tdd.guest_script(disk),
                                 vm_args(work, 'src', img), work, 'src',
                                 mem=f'{GUEST_MEM // MIB}M',
                                 append_extra='kvmx.modules=virtio_blk,ext4')
        with src:
            src.wait_console(r'CACHED (.*)\n', 300)
            src.wait_console(r'READY\n', 30)
            times['boot'] = time.monotonic() - t0
            with incoming(qemu, work, 'dst', img) as dst:
                if attach(hostd, work, 'src') and attach(hostd, work, 'dst'):
                    t0 = time.monotonic()
                    refusals(hostd, work, src, dst)
                    times['refusals'] = time.monotonic() - t0
                    t0 = time.monotonic()
                    ok = migrate(hostd, work, disk, src, dst)
                    times['migrate'] = time.monotonic() - t0
                    src.kill()
                    path = None
                    if ok:
                        t0 = time.monotonic()
                        path = snapshot(hostd, work, dst)
                        times['snapshot'] = time.monotonic() - t0
                    # The snapshot's QEMU holds the image: gone before the
                    # restore opens it (the disk as the file refers to it).
                    dst.kill()
                    dst.shutdown(timeout=5)
                    if path:
                        t0 = time.monotonic()
                        restore_changed(hostd, work, qemu, disk, img, path)
                        times['restore-changed'] = time.monotonic() - t0
                        t0 = time.monotonic()
                        restore(hostd, work, qemu, disk, img, path)
                        times['restore'] = time.monotonic() - t0
            src.kill()
    except (RuntimeError, OSError, subprocess.TimeoutExpired,
            kvmxvm.QmpError, TimeoutError) as e:
        check(False, f'{type(e).__name__}: {e}')
    finally:
        hostd.kill()
        if check.failures:
            print(f'--- hostd log tail\n{hostd.tail(6000)}')
    for k, v in times.items():
        print(f'time  {k}: {v:.1f} s')
    print(f'test_hostd_dedup: {time.monotonic() - t_start:.1f} s')
    return check.finish(work)


if __name__ == '__main__':
    sys.exit(main())
