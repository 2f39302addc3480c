#!/usr/bin/python3
"""A guest hammering its flush hints from several vCPUs at once (TCG,
4 vCPUs, real Linux guest) does not stall the monitor, and its concurrent
flushes coalesce: fewer host flushes than guest flushes, none failed.

Each guest loop dirties a block of the NVDIMM and then flushes it through
region0/deep_flush (which writes the flush hint), so every host flush has
data to write and takes real time.  Meanwhile the host times QMP round
trips; the bound checked (2 s) is far above a healthy answer and far below
what holding the BQL across back-to-back fdatasync() calls would give."""
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'lib'))
import kvmxtest  # noqa: E402
import kvmxvm  # noqa: E402

SIZE = 256 << 20
SECONDS = 20
check = kvmxtest.Checks()


SCRIPT = r'''
for n in 0 1 2 3; do
  ( i=0
    while :; do
      dd if=/dev/zero of=/dev/pmem0 bs=64k count=1 seek=$((n * 1000 + i % 1000)) \
         oflag=direct 2>/dev/null
      echo 1 > /sys/bus/nd/devices/region0/deep_flush
      i=$((i+1))
    done ) &
done
echo HAMMERING
sleep 3600
'''


def main():
    kvmxtest.require_guest_image()
    qemu = kvmxvm.patched_qemu()
    work = kvmxtest.workdir('hammer-')
    img = kvmxtest.backing_file(work, 'pmem.img', SIZE)
    args = kvmxtest.nvdimm_args(img, SIZE, extra=['-smp', '4'])
    with kvmxvm.start_guest(qemu, SCRIPT, args, work, 'hammer') as vm:
        vm.wait_console(r'HAMMERING', 300)
        before = vm.qmp.cmd('query-nvdimm-flush')[0]
        worst = 0.0
        samples = 0
        end = time.monotonic() + SECONDS
        while time.monotonic() < end:
            t0 = time.monotonic()
            vm.qmp.cmd('query-status')
            vm.qmp.cmd('query-nvdimm-flush')
            worst = max(worst, time.monotonic() - t0)
            samples += 1
            time.sleep(0.05)
        after = vm.qmp.cmd('query-nvdimm-flush')[0]
        guest = after['guest-flushes'] - before['guest-flushes']
        host = after['host-flushes'] - before['host-flushes']
        print(f'{guest} guest flushes, {host} host flushes in {SECONDS} s; '
              f'{samples} QMP round trips, slowest {worst * 1000:.1f} ms; '
              f'flush latency avg {after["latency-avg-ns"] / 1e6:.2f} ms, '
              f'max {after["latency-max-ns"] / 1e6:.2f} ms')
        check(guest > 100, f'the guest flushed continuously ({guest})')
        check(worst < 2.0, f'QMP answered within 2 s throughout '
                           f'(slowest {worst:.3f} s)')
        check(0 < host < guest, f'concurrent flushes coalesced ({host} host '
                                f'flushes for {guest} guest flushes)')
        check(after['host-flush-errors'] == 0, 'no host flush failed')
        check(vm.qmp.cmd('query-status')['status'] == 'running',
              'VM still running')
        vm.kill()
    return check.finish(work)


if __name__ == '__main__':
    sys.exit(main())
