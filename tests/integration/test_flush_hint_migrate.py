#!/usr/bin/python3
"""A VM with flush hints live-migrates between two patched QEMUs (TCG,
real Linux guest).  The guest keeps writing and syncing blocks across the
migration; afterwards its flushes trap on the destination, land in the
destination's backing file, and leave it clean, while the source's
counters stop."""
import hashlib
import os
import re
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'lib'))
import kvmxtest  # noqa: E402
import kvmxvm  # noqa: E402
import pagecache  # noqa: E402

SIZE = 256 << 20
check = kvmxtest.Checks()


def vm_args(img):
    return kvmxtest.nvdimm_args(img, SIZE)


# Writes 4 KiB block i, syncs it, reports its md5; forever, unless the
# host says "hold": then it writes nothing more until "go".
SCRIPT = r'''
echo "DEEP_FLUSH=$(cat /sys/bus/nd/devices/region0/deep_flush)"
i=0
while :; do
  dd if=/dev/urandom of=/tmp/b bs=4k count=1 2>/dev/null
  dd if=/tmp/b of=/dev/pmem0 bs=4k count=1 seek=$i conv=fsync 2>/dev/null
  echo "TICK $i $(md5sum /tmp/b | cut -d' ' -f1)"
  i=$((i+1))
  # read -t 0 only polls; a timed read could drop half a line (busybox)
  sleep 0.2
  read -t 0 && read cmd && [ "$cmd" = hold ] && { echo HELD; read ack; }
done
'''


def flush_count(vm):
    return vm.qmp.cmd('query-nvdimm-flush')[0]['guest-flushes']


def main():
    kvmxtest.require_guest_image()
    qemu = kvmxvm.patched_qemu()
    work = kvmxtest.workdir('migrate-')
    src_img, dst_img = (kvmxtest.backing_file(work, n, SIZE)
                        for n in ('src.img', 'dst.img'))
    sock = os.path.join(work, 'mig.sock')

    with kvmxvm.start_guest(qemu, SCRIPT, vm_args(src_img), work,
                            'src') as src:
        src.wait_console(r'TICK 3 ', 300)
        check('DEEP_FLUSH=1' in src.console_text(), 'deep_flush reads 1')
        # Same machine, same guest kernel; the destination waits for the
        # stream.  'cont' from the harness only arms autostart there.
        dst_args = vm_args(dst_img) + ['-incoming', 'defer']
        with kvmxvm.start_guest(qemu, None, dst_args, work, 'dst') as dst:
            dst.qmp.cmd('migrate-incoming', uri=f'unix:{sock}')
            src.qmp.cmd('migrate', uri=f'unix:{sock}')
            deadline = time.monotonic() + 300
            while True:
                st = src.qmp.cmd('query-migrate').get('status')
                if st in ('completed', 'failed', 'cancelled'):
                    break
                if time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            check(st == 'completed', f'migration status {st}')
            if st != 'completed':
                return 1
            src_after = flush_count(src)
            dst_before = flush_count(dst)
            status = dst.qmp.cmd('query-status')['status']
            check(status == 'running', f'destination runs ({status})')

            # Ticks written after the switch-over show up on the
            # destination's console.
            m = dst.wait_console(r'TICK (\d+) ([0-9a-f]{32})\n', 120)
            first = int(m[1])
            m = dst.wait_console(rf'TICK {first + 3} ([0-9a-f]{{32}})\n', 120)
            # The guest writes and syncs on: hold it between two blocks, so
            # that the file is not looked at in the middle of one's sync.
            dst.send_serial(b'hold\n')
            dst.wait_console(r'HELD\n', 120, start=m.end())
            dst_after = flush_count(dst)
            check(dst_after > dst_before,
                  f'destination traps guest flushes ({dst_before} -> '
                  f'{dst_after})')
            check(flush_count(src) == src_after,
                  'source counters stopped after migration')
            st = pagecache.cachestat(dst_img)
            check(st['dirty'] == 0, f'destination file clean ({st})')
            text = dst.console_text()
            with open(dst_img, 'rb') as f:
                for i in range(first, first + 4):
                    want = re.search(rf'TICK {i} ([0-9a-f]{{32}})', text)[1]
                    f.seek(i * 4096)
                    got = hashlib.md5(f.read(4096)).hexdigest()
                    check(got == want,
                          f'block {i} synced on the destination is in its file')
            info = dst.qmp.cmd('query-nvdimm-flush')[0]
            src_info = src.qmp.cmd('query-nvdimm-flush')[0]
            check(info['addresses'] == src_info['addresses'],
                  'same flush hint address on both sides')
            dst.kill()
        src.kill()
    return check.finish(work)


if __name__ == '__main__':
    sys.exit(main())
