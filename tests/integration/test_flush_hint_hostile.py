#!/usr/bin/python3
"""A hostile guest cannot hurt QEMU through the flush hint page.

Real Linux 6.12 guest (TCG), root in the guest, /dev/mem: writes of 1, 2,
4 and 8 bytes at every kind of offset of the page (first byte, unaligned,
last bytes, a straddle of two hint lines), reads of every size, and the
same against the benchmark-only MMIO mapping.  Every write is exactly one
guest flush (never split, never lost), reads return 0 and count nothing,
QEMU stays up and keeps answering QMP, and the guest's own flushes still
work afterwards."""
import os
import re
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'lib'))
import kvmxtest  # noqa: E402
import kvmxvm  # noqa: E402

SIZE = 64 << 20
check = kvmxtest.Checks()


# (offset, width in bits).  Naturally aligned ones, at the first and
# last bytes of the page and in between: each is exactly one flush.
ALIGNED = [(0, 8), (0, 16), (0, 32), (0, 64), (1, 8), (62, 16), (4095, 8),
           (4094, 16), (4092, 32), (4088, 64), (2048 + 7, 8)]
# Unaligned ones, one across two hint lines: the vCPU may split them into
# aligned pieces (TCG does), each piece a flush: at least one each.
UNALIGNED = [(3, 32), (5, 16), (60, 64)]
WRITES = ALIGNED + UNALIGNED

# The region driver claims the page (request_mem_region), and Debian's
# kernel (CONFIG_IO_STRICT_DEVMEM) keeps /dev/mem off claimed ranges: the
# region is unbound for the attack and bound again afterwards.
SCRIPT = r'''
fha=$((__FHA__))
echo region0 > /sys/bus/nd/drivers/nd_region/unbind
echo UNBOUND; read ack
rc=0
for w in __ALIGNED__; do
  off=${w%:*}; bits=${w#*:}
  devmem $((fha + off)) $bits 0xffffffff || rc=1
done
echo "ALIGNED-DONE $rc"; read ack
for w in __UNALIGNED__; do
  off=${w%:*}; bits=${w#*:}
  devmem $((fha + off)) $bits 0xffffffff || rc=1
done
echo "WRITES-DONE $rc"; read ack
bad=0
for w in __WRITES__; do
  off=${w%:*}; bits=${w#*:}
  v=$(devmem $((fha + off)) $bits) || bad=1
  [ $((v)) -eq 0 ] || { echo "READ $off/$bits = $v"; bad=1; }
done
echo "READS-DONE $bad"; read ack
echo region0 > /sys/bus/nd/drivers/nd_region/bind
for i in 1 2 3 4 5; do [ -b /dev/pmem0 ] && break; sleep 1; done
[ -b /dev/pmem0 ] && dd if=/dev/urandom of=/dev/pmem0 bs=4k count=1 conv=fsync 2>/dev/null
echo "SYNC-DONE $?"
'''


def main():
    kvmxtest.require_guest_image()
    qemu = kvmxvm.patched_qemu()
    work = kvmxtest.workdir('hostile-')
    for mapping in ('rom', 'mmio'):
        img = kvmxtest.backing_file(work, f'{mapping}.img', SIZE)
        dev = 'nvdimm,id=nv0,memdev=mem1,flush-hint=on'
        if mapping == 'mmio':
            dev += ',x-flush-hint-mmio=on'
        args = kvmxtest.nvdimm_args(img, SIZE, dev)
        # The address is fixed by the command line: learn it from a paused
        # QEMU first, then hand it to the guest script.
        with kvmxvm.Vm(qemu, args + ['-S'], work, f'probe-{mapping}') as vm:
            vm.start()
            fha = vm.qmp.cmd('query-nvdimm-flush')[0]['addresses'][0]
        def words(ws):
            return ' '.join(f'{o}:{b}' for o, b in ws)
        script = (SCRIPT.replace('__FHA__', hex(fha))
                  .replace('__ALIGNED__', words(ALIGNED))
                  .replace('__UNALIGNED__', words(UNALIGNED))
                  .replace('__WRITES__', words(WRITES)))
        with kvmxvm.start_guest(qemu, script, args, work, mapping) as vm:
            # Detaching the pmem disk flushes the region: count after it.
            vm.wait_console(r'UNBOUND', 300)
            before = vm.qmp.cmd('query-nvdimm-flush')[0]['guest-flushes']
            vm.send_serial(b'go\n')
            vm.wait_console(r'ALIGNED-DONE (\d)\n', 300)
            # The script waits for an ack after each phase, so that the
            # count read here holds that phase's flushes and no later ones.
            aligned = vm.qmp.cmd('query-nvdimm-flush')[0]['guest-flushes']
            vm.send_serial(b'go\n')
            m = vm.wait_console(r'WRITES-DONE (\d)\n', 300)
            mid = vm.qmp.cmd('query-nvdimm-flush')[0]
            vm.send_serial(b'go\n')
            check(m[1] == '0', f'{mapping}: every devmem write completed')
            n = aligned - before
            check(n == len(ALIGNED), f'{mapping}: {len(ALIGNED)} aligned '
                  f'writes of every size = {n} flushes')
            n = mid['guest-flushes'] - aligned
            check(n >= len(UNALIGNED), f'{mapping}: {len(UNALIGNED)} '
                  f'unaligned writes = {n} flushes (at least one each)')
            m = vm.wait_console(r'READS-DONE (\d)\n', 300)
            check(m[1] == '0', f'{mapping}: reads of every size return 0')
            after = vm.qmp.cmd('query-nvdimm-flush')[0]
            vm.send_serial(b'go\n')
            check(after['guest-flushes'] == mid['guest-flushes'],
                  f'{mapping}: reads are not flushes')
            m = vm.wait_console(r'SYNC-DONE (\d)\n', 120)
            check(m[1] == '0', f'{mapping}: the guest still syncs afterwards')
            check(vm.qmp.cmd('query-status')['status'] == 'running' and
                  after['host-flush-errors'] == 0,
                  f'{mapping}: QEMU running, no host flush errors')
            rc = kvmxvm.wait_guest_exit(vm, 120)
            check(rc == 0, f'{mapping}: guest script exit {rc}')
    text = open(os.path.join(work, 'rom.console'), errors='replace').read()
    check(not re.search(r'Call Trace|BUG:|Oops', text),
          'guest kernel logged no oops')
    return check.finish(work)


if __name__ == '__main__':
    sys.exit(main())
