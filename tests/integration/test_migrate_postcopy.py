#!/usr/bin/python3
"""Post-copy migration of a VM with a file-backed, flush-hinted NVDIMM
(issue 12, item 1), between two patched QEMUs under TCG with a real
Linux guest.

Stock QEMU 10.0 refuses post-copy for such a VM ("Host backend files need
to be TMPFS or HUGETLBFS only").  With the series:

 separate   each host has its own backend file.  The NVDIMM goes before
            post-copy starts, DRAM goes post-copy (the destination faults
            pages in: postcopy-requests > 0).  When the destination runs,
            the NVDIMM data the guest flushed on the source is in the
            destination's file and durable there (no dirty page cache,
            without any guest flush), and the guest reads it back intact.
 shared     both use the same file with x-ignore-shared: the NVDIMM is not
            sent at all (the migrated RAM total is smaller by its size).
 mismatch   a destination whose flush hints differ from the source's
            refuses the migration, saying why; the source keeps running.
"""
import os
import re
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'lib'))
import kvmxtest  # noqa: E402
import kvmxvm  # noqa: E402
from migwork import wait_status  # noqa: E402
import pagecache  # noqa: E402

SIZE = 256 << 20
PMEM_OFF_MB, PMEM_MB = 16, 16
check = kvmxtest.Checks()

# The guest writes PMEM_MB of random data to the NVDIMM and syncs it (a
# trapped flush), fills 96 MiB of RAM; then, forever, it rewrites 32 MiB of
# other RAM (dirty at the switch, so post-copy must fault it in) and reads
# back the first two.
SCRIPT = rf'''
dd if=/dev/urandom of=/tmp/p bs=1M count={PMEM_MB} 2>/dev/null
dd if=/tmp/p of=/dev/pmem0 bs=1M seek={PMEM_OFF_MB} conv=fsync 2>/dev/null
echo "PMEM $(md5sum < /tmp/p | cut -d' ' -f1)"
rm /tmp/p
dd if=/dev/urandom of=/dev/shm/x bs=1M count=96 2>/dev/null
echo "RAM $(md5sum < /dev/shm/x | cut -d' ' -f1)"
echo READY
i=0
while :; do
  dd if=/dev/zero of=/dev/shm/y bs=1M count=32 conv=notrunc 2>/dev/null
  r=$(md5sum < /dev/shm/x | cut -d' ' -f1)
  p=$(dd if=/dev/pmem0 bs=1M skip={PMEM_OFF_MB} count={PMEM_MB} iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
  echo "CHK $i $r $p"
  i=$((i+1))
done
'''


def args(img, count=1):
    dev = f'nvdimm,id=nv0,memdev=mem1,flush-hint=on,flush-hint-count={count}'
    return kvmxtest.nvdimm_args(img, SIZE, device=dev)


def set_caps(vm, **caps):
    vm.qmp.cmd('migrate-set-capabilities', capabilities=[
        {'capability': k.replace('_', '-'), 'state': v}
        for k, v in caps.items()])




def postcopy(qemu, work, name, src_img, dst_img, shared):
    """Migrate with a switch to post-copy; returns the source's RAM total."""
    sock = os.path.join(work, f'{name}.sock')
    with kvmxvm.start_guest(qemu, SCRIPT, args(src_img), work,
                            f'{name}-src') as src:
        m = src.wait_console(r'PMEM ([0-9a-f]{32})\n', 300)
        pmem_md5 = m[1]
        m = src.wait_console(r'RAM ([0-9a-f]{32})\n', 300)
        ram_md5 = m[1]
        src.wait_console(r'CHK 1 ', 300)
        with kvmxvm.start_guest(qemu, None, args(dst_img) +
                                ['-incoming', 'defer'], work,
                                f'{name}-dst') as dst:
            caps = dict(postcopy_ram=True, x_ignore_shared=shared)
            set_caps(dst, **caps)
            dst.qmp.cmd('migrate-incoming', uri=f'unix:{sock}')
            set_caps(src, events=True, **caps)
            # Slow enough that precopy is still running when we switch.
            src.qmp.cmd('migrate-set-parameters', **{
                'max-bandwidth': 32 << 20, 'downtime-limit': 1,
                'max-postcopy-bandwidth': 8 << 20})
            src.qmp.cmd('migrate', uri=f'unix:{sock}')
            time.sleep(1.0)
            src.qmp.cmd('migrate-start-postcopy')
            st, info = wait_status(src, ('completed', 'failed', 'cancelled'))
            check(st == 'completed', f'{name}: post-copy migration {st} '
                  f'({info.get("error-desc", "")})')
            if st != 'completed':
                return None
            events = [e['data']['status'] for e in src.qmp.events()
                      if e['event'] == 'MIGRATION']
            check('postcopy-active' in events,
                  f'{name}: the source went post-copy ({events})')
            ram = info.get('ram', {})
            check(ram.get('postcopy-requests', 0) > 0,
                  f'{name}: the destination faulted DRAM pages in '
                  f'({ram.get("postcopy-requests")} requests)')
            check(dst.qmp.cmd('query-status')['status'] == 'running',
                  f'{name}: the destination runs')
            flushes = dst.qmp.cmd('query-nvdimm-flush')[0]['guest-flushes']
            if not shared:
                # Durable on arrival: before any guest flush there.
                st = pagecache.cachestat(dst_img)
                check(flushes == 0 and st['dirty'] == 0,
                      f'{name}: the NVDIMM is durable in the destination\'s '
                      f'file before any guest flush ({flushes} flushes, {st})')
            check(kvmxtest.file_md5(dst_img, PMEM_OFF_MB, PMEM_MB) == pmem_md5,
                  f'{name}: the flushed NVDIMM data is in the destination\'s '
                  'file')
            # The guest, now on the destination, reads both back.
            n = len(re.findall(r'CHK \d+', dst.console_text()))
            m = dst.wait_console(r'CHK \d+ ([0-9a-f]{32}) ([0-9a-f]{32})\n',
                                 300, start=len(dst.console_text()))
            check(m[1] == ram_md5 and m[2] == pmem_md5,
                  f'{name}: the guest reads its RAM and NVDIMM intact after '
                  f'the move (after {n} checks before)')
            dst.kill()
        src.kill()
    return ram.get('total', 0)


def mismatch(qemu, work):
    sock = os.path.join(work, 'mm.sock')
    src_img, dst_img = (kvmxtest.backing_file(work, n, SIZE)
                        for n in ('mm-src.img', 'mm-dst.img'))
    with kvmxvm.start_guest(qemu, SCRIPT, args(src_img), work,
                            'mm-src') as src:
        src.wait_console(r'READY', 300)
        with kvmxvm.start_guest(qemu, None, args(dst_img, count=2) +
                                ['-incoming', 'defer'], work,
                                'mm-dst') as dst:
            # With a return path the source hears of the refusal (as
            # libvirt's Finish/Confirm phases tell it without one).
            set_caps(dst, return_path=True)
            set_caps(src, return_path=True)
            dst.qmp.cmd('migrate-incoming', uri=f'unix:{sock}')
            src.qmp.cmd('migrate', uri=f'unix:{sock}')
            st, info = wait_status(src, ('completed', 'failed', 'cancelled'))
            check(st == 'failed', f'mismatch: migration {st}')
            dst.wait(30)
            check('flush hints' in dst.stderr_text() and
                  "'flush-hint' settings" in dst.stderr_text(),
                  'mismatch: the destination says why it refused')
        check(src.qmp.cmd('query-status')['status'] == 'running',
              'mismatch: the source keeps running')
        src.kill()


def main():
    kvmxtest.require_guest_image()
    if not pagecache.available():
        kvmxvm.skip('no cachestat(2) on this host kernel')
    qemu = kvmxvm.patched_qemu()
    work = kvmxtest.workdir('postcopy-')

    src_img, dst_img = (kvmxtest.backing_file(work, n, SIZE)
                        for n in ('src.img', 'dst.img'))
    total_sep = postcopy(qemu, work, 'separate', src_img, dst_img, False)

    shared_img = kvmxtest.backing_file(work, 'shared.img', SIZE)
    total_shared = postcopy(qemu, work, 'shared', shared_img, shared_img,
                            True)
    if total_sep and total_shared:
        check(total_sep - total_shared >= SIZE,
              f'shared: the NVDIMM is not migrated (RAM total {total_shared}'
              f' vs {total_sep} when separate)')

    mismatch(qemu, work)
    return check.finish(work)


if __name__ == '__main__':
    sys.exit(main())
