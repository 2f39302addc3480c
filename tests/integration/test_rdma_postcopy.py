#!/usr/bin/python3
"""Post-copy with one-sided RDMA page fetch (postcopy-rdma), on soft-RoCE.

The build host has no RDMA device, so, as in test_rdma_transport.py, two
Debian 6.12 guests under TCG, A (10.77.0.1) and B (10.77.0.2), have their
virtio-net NICs wired to each other and an rdma_rxe device on each.  Each
runs the patched QEMU (scripts/mkguest --nested) with the freestanding
test guest (L2, 128 MiB, TCG):

  A  L2 fills 16 MiB of its memory with a pattern of address and seed
     ('fill'); A's QEMU then migrates it to B over TCP between the two
     NICs, with postcopy-ram and postcopy-rdma, switching to post-copy
     at once, the background stream held to 64 KiB/s;
  B  waits until its QEMU reports the RDMA fetch active, then has L2
     'check' the 16 MiB: every page it touches first is a remote fault.

Checked:
  - L2 on B finds every word of the 16 MiB as written on A (the memory
    moved, nothing stale or lost), and the migration completes on both;
  - B's QEMU served faults by RDMA READ (at least 256 of the region's
    4096 pages; the rest came with the background stream before L2
    touched them), no READ failed and no command was refused;
  - A's QEMU answered fewer page requests than a tenth of the pages B
    read: no per-page work on the source for the pages read by READ;
  - A's QEMU registered L2's RAM and the connection ended closed.
"""
import os
import re
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'lib'))
sys.path.insert(0, os.path.dirname(__file__))
import kvmxtest  # noqa: E402
import kvmxvm  # noqa: E402
from test_flush_hint_nested import L1_HELPERS  # noqa: E402
from test_rdma_transport import COMMON, MODULES, guest_args  # noqa: E402

check = kvmxtest.Checks()
REGION = 0x6000000          # 96 MiB into L2's RAM
BYTES = 16 << 20
PAGES = BYTES // 4096
PORT = 4444
MIN_READ = 256

L2 = r'''
mkfifo /tmp/ser.in /tmp/ser.out /tmp/mon.in /tmp/mon.out
/opt/kvmx/qemu-system-x86_64 -accel tcg -machine q35 -m 128M -nodefaults \
  -display none -no-reboot -kernel /opt/kvmx/kvmx-testguest.elf \
  -device isa-debug-exit,iobase=0xf4,iosize=0x04 \
  -serial pipe:/tmp/ser -monitor pipe:/tmp/mon __INCOMING__ 2>/tmp/qemu.err &
qpid=$!
cat /tmp/ser.out >> /tmp/ser.log &
cat /tmp/mon.out >> /tmp/mon.log &
exec 3>/tmp/ser.in 4>/tmp/mon.in
mon() {  # mon COMMAND PATTERN SECONDS: run an HMP command, wait for PATTERN
  : > /tmp/mon.log
  echo "$1" >&4
  waitfor /tmp/mon.log "$2" "$3"
}
until_mig() {  # until_mig PATTERN SECONDS: poll info migrate for PATTERN
  j=0
  while :; do
    : > /tmp/mon.log
    echo "info migrate" >&4
    sleep 2
    grep -q "$1" /tmp/mon.log && return 0
    grep -q "Migration status: failed" /tmp/mon.log && return 1
    j=$((j+2)); [ $j -gt $2 ] && return 1
  done
}
mon "migrate_set_capability postcopy-ram on" "(qemu)" 60
mon "migrate_set_capability postcopy-rdma on" "(qemu)" 60
'''

GUEST_A = COMMON + L1_HELPERS + L2.replace('__INCOMING__', '') + r'''
waitfor /tmp/ser.log "kvmx-testguest ready" 600
echo "fill __REGION__ __BYTES__ 7" >&3
waitfor /tmp/ser.log "ok fill" 900
echo "A-FILLED $(grep 'ok fill' /tmp/ser.log | tr -d '\r')"
read ack
mon "migrate_set_parameter max-bandwidth 8M" "(qemu)" 60
mon "migrate_set_parameter max-postcopy-bandwidth 65536" "(qemu)" 60
mon "info migrate_parameters" "max-postcopy-bandwidth" 60
echo "A-PARAMS $(tr -d '\r' < /tmp/mon.log | grep -e max-postcopy-bandwidth -e 'max-bandwidth' | tr '\n' ' ')"
mon "migrate -d tcp:10.77.0.2:__PORT__" "(qemu)" 60
mon "migrate_start_postcopy" "(qemu)" 60
if until_mig "Migration status: completed" 1200; then
  echo "A-COMPLETED"
else
  echo "A-NOT-COMPLETED"
fi
echo "A-INFO-BEGIN"; tr -d '\r' < /tmp/mon.log; echo "A-INFO-END"
cat /tmp/qemu.err
quit_l2
'''

GUEST_B = COMMON + L1_HELPERS + L2.replace(
    '__INCOMING__', '-incoming defer') + r'''
mon "migrate_incoming tcp:10.77.0.2:__PORT__" "(qemu)" 60
echo "B-LISTENING"
if ! until_mig "postcopy rdma: active" 900; then
  echo "B-NO-RDMA"; tr -d '\r' < /tmp/mon.log; cat /tmp/qemu.err
fi
echo "check __REGION__ __BYTES__ 7" >&3
waitfor /tmp/ser.log "ok check" 1800
echo "B-CHECK $(grep 'ok check' /tmp/ser.log | tr -d '\r')"
if until_mig "Migration status: completed" 1200; then
  echo "B-COMPLETED"
else
  echo "B-NOT-COMPLETED"
fi
echo "B-INFO-BEGIN"; tr -d '\r' < /tmp/mon.log; echo "B-INFO-END"
cat /tmp/qemu.err
quit_l2
'''


def script(text, me, peer):
    return (text.replace('__ADDR__', me).replace('__PEER__', peer)
            .replace('__REGION__', hex(REGION)).replace('__BYTES__', hex(BYTES))
            .replace('__PORT__', str(PORT)))


def section(text, name):
    m = re.search(rf'{name}-INFO-BEGIN\n(.*?){name}-INFO-END', text, re.S)
    return m[1] if m else ''


def number(info, label):
    m = re.search(rf'{label}: (\d+)', info)
    return int(m[1]) if m else None


def main():
    try:
        kvmxvm.guest_image(os.path.join(kvmxvm.REPO_ROOT))
    except kvmxvm.GuestImageMissing as e:
        kvmxvm.skip(str(e))
    nested = os.path.join(kvmxvm.REPO_ROOT, 'build', 'guest-nested')
    if not os.path.isfile(os.path.join(nested, 'initramfs.cpio.gz')):
        kvmxvm.skip(f'{nested} missing (run scripts/mkguest --nested)')
    os.environ['KVMX_GUEST_DIR'] = nested
    work = kvmxtest.workdir('rdma-postcopy-')
    qemu = kvmxvm.patched_qemu()
    append = f'{MODULES} kvmx.timeout=2400'
    t0 = time.monotonic()
    with kvmxvm.start_guest(qemu, script(GUEST_A, '10.77.0.1', '10.77.0.2'),
                            guest_args(work, 'a', 'b', '52:54:00:77:00:01'),
                            work, 'a', mem='1536M', append_extra=append) as a, \
            kvmxvm.start_guest(qemu,
                               script(GUEST_B, '10.77.0.2', '10.77.0.1'),
                               guest_args(work, 'b', 'a', '52:54:00:77:00:02'),
                               work, 'b', mem='1536M',
                               append_extra=append) as b:
        def save():
            for vm, name in ((a, 'A'), (b, 'B')):
                with open(os.path.join(work, f'{name}.console'), 'w') as f:
                    f.write(vm.console_text())
        try:
            for vm in (a, b):
                m = vm.wait_console(r'RDMA-UP|RDMA-SKIP (.*)\n|RDMA-NO-LINK',
                                    600)
                if m[0].startswith('RDMA-SKIP'):
                    kvmxvm.skip(f'in the guest: {m[1]}')
            a.wait_console(r'A-FILLED .*\n', 1200)
            b.wait_console(r'B-LISTENING\n', 300)
            print(f'  {time.monotonic() - t0:4.0f} s: L2 filled on A, B '
                  f'listens; migrating', flush=True)
            a.send_serial(b'go\n')
            rb = kvmxvm.wait_guest_exit(b, 2400)
            ra = kvmxvm.wait_guest_exit(a, 600)
        except (TimeoutError, RuntimeError):
            save()
            print('A:', a.console_text()[-3000:])
            print('B:', b.console_text()[-3000:])
            raise
        save()
        ta, tb = a.console_text(), b.console_text()
    print(f'both guests done in {time.monotonic() - t0:.0f} s')
    ia, ib = section(ta, 'A'), section(tb, 'B')
    print('--- A (source) info migrate\n' + ia)
    print('--- B (destination) info migrate\n' + ib)
    check(ra == 0 and rb == 0, f'both guest scripts ended normally ({ra}, {rb})')
    m = re.search(r'B-CHECK ok check n=(\d+) bad=(\d+) first=(\S+)', tb)
    check(m is not None and int(m[1]) == PAGES and m[2] == '0',
          f'L2 on B finds all {PAGES} pages as written on A '
          f'({m[0] if m else "no check result"})')
    check('A-COMPLETED' in ta and 'B-COMPLETED' in tb,
          'the migration completed on both sides')
    check('B-NO-RDMA' not in tb, 'B reported the RDMA fetch active '
          'before L2 read its memory')
    read = number(ib, 'pages read')
    fails = number(ib, 'read failures')
    bad = number(ib, 'bad commands')
    dups = number(ib, 'duplicates')
    # Every fault on a page that had not arrived was a READ; how many pages
    # the background stream delivered first depends on how fast L2 runs
    # against the stream (measured: 1277-1314 of 4096 read on a 2-core
    # host; the stream moved ~1.1 MB/s in post-copy although
    # max-postcopy-bandwidth was 64 KiB/s, which is not understood yet).
    check(read is not None and read >= MIN_READ,
          f'B served {read} faults by RDMA READ (at least {MIN_READ}; '
          f'the region has {PAGES} pages, the rest came with the stream '
          'first)')
    check(fails == 0 and bad == 0,
          f'no READ failed ({fails}), no command refused ({bad}); '
          f'{dups} pages came twice')
    reqs = number(ia, 'postcopy request count') or 0
    check(read is not None and reqs * 10 < read,
          f"A's QEMU answered {reqs} page requests while B read {read} "
          'pages: no per-page work on the source')
    reg = number(ia, 'postcopy rdma registered')
    check(reg is not None and reg >= 128 << 20,
          f'A registered {reg} bytes of L2 RAM')
    m = re.search(r'postcopy rdma: (\S+)', ia)
    check(m is not None and m[1] == 'closed',
          f"A's RDMA state at the end: {m[1] if m else 'none'}")
    return check.finish(work)


if __name__ == '__main__':
    sys.exit(main())
