#!/usr/bin/python3
"""Post-copy with one-sided RDMA page fetch (postcopy-rdma), on soft-RoCE.

  test_rdma_postcopy.py [normal]   the migration, checked (below)
  test_rdma_postcopy.py prefetch   the same with postcopy-prefetch (pattern):
                                   predicted pages come by batched READ
  test_rdma_postcopy.py precopy-uri  precopy over QEMU's own rdma: URI
  test_rdma_postcopy.py kill-source  A's QEMU killed once B reads by RDMA:
                                   B pauses, nothing claims success
  test_rdma_postcopy.py kill-dest  B's QEMU killed in post-copy: A pauses,
                                   stays up and leaves RDMA

The build host has no RDMA device, so, as in test_rdma_transport.py, two
Debian 6.12 guests under TCG, A (10.77.0.1) and B (10.77.0.2), have their
virtio-net NICs wired to each other and an rdma_rxe device on each.  Each
runs the patched QEMU (scripts/mkguest --nested) with the freestanding
test guest (L2, 128 MiB, TCG):

  A  L2 fills 16 MiB of its memory with a pattern of address and seed
     ('fill'); A's QEMU then migrates it to B over TCP between the two
     NICs, with postcopy-ram and postcopy-rdma, switching to post-copy
     at once; once B's fetch is active A's QEMU is stopped (SIGSTOP);
  B  has L2 'check' the 16 MiB: every page it touches that has not
     arrived is a remote fault, and with the source stopped only RDMA
     READ can serve it; then A's QEMU continues and the migration ends.

Checked:
  - L2 on B finds every word of the 16 MiB as written on A (the memory
    moved, nothing stale or lost), and the migration completes on both;
  - with A's QEMU stopped, B's QEMU served at least a quarter of the
    region's pages by RDMA READ (the rest came by precopy before the
    switch), no READ failed and no command was refused;
  - A's QEMU answered fewer page requests than a tenth of the pages B
    read, and A registered L2's RAM and ended closed.
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
from test_rdma_transport import COMMON, rdma_pair  # noqa: E402

check = kvmxtest.Checks()
REGION = 0x6000000          # 96 MiB into L2's RAM
BYTES = 16 << 20
PAGES = BYTES // 4096
KILL_REGION = 0x2000000     # 32 MiB
KILL_BYTES = 64 << 20
PORT = 4444
MIN_READ = PAGES // 4

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
__EXTRA_CAPS__
'''

GUEST_A = COMMON + L1_HELPERS + L2.replace('__INCOMING__', '') + r'''
waitfor /tmp/ser.log "kvmx-testguest ready" 600
echo "fill __REGION__ __BYTES__ 7" >&3
waitfor /tmp/ser.log "ok fill" 900
sleep 1
echo "A-FILLED $(grep 'ok fill' /tmp/ser.log | tr -d '\r')"
read ack
mon "migrate_set_parameter max-bandwidth 2M" "(qemu)" 60
mon "migrate_set_parameter max-postcopy-bandwidth 65536" "(qemu)" 60
mon "migrate -d __SCHEME__:10.77.0.2:__PORT__" "(qemu)" 60
[ __MODE__ = precopy-uri ] || mon "migrate_start_postcopy" "(qemu)" 60
case __MODE__ in
precopy-uri)
  if until_mig "Migration status: completed" 1200; then
    echo "A-COMPLETED"
  else
    echo "A-NOT-COMPLETED"
  fi ;;
normal|prefetch)
  until_mig "Migration status: postcopy-active" 600 && echo "A-POSTCOPY"
  read ack
  # B's fetch is active: freeze the whole source QEMU.  Whatever B's guest
  # reads now that has not arrived can only come by RDMA READ.
  kill -STOP $qpid
  echo "A-STOPPED"
  read ack
  kill -CONT $qpid
  echo "A-CONTINUED"
  if until_mig "Migration status: completed" 1200; then
    echo "A-COMPLETED"
  else
    echo "A-NOT-COMPLETED"
  fi ;;
kill-source)
  until_mig "Migration status: postcopy-active" 600 && echo "A-POSTCOPY"
  read ack
  kill -STOP $qpid
  echo "A-STOPPED"
  read ack
  # B's guest is reading by RDMA: the source dies in the middle.
  kill -9 $qpid
  echo "A-KILLED"
  # The machine stays up (its kernel answers for the dead QEMU's sockets)
  # until B is done.
  read ack
  exit 0 ;;
kill-dest)
  if until_mig "Migration status: postcopy-paused" 600; then
    echo "A-PAUSED"
  fi
  sleep 3
  : > /tmp/mon.log; echo "info migrate" >&4; sleep 2
  kill -0 $qpid 2>/dev/null && echo "A-ALIVE" ;;
esac
echo "A-INFO-BEGIN"; tr -d '\r' < /tmp/mon.log; echo "A-INFO-END"
cat /tmp/qemu.err
quit_l2
'''

GUEST_B = COMMON + L1_HELPERS + L2.replace(
    '__INCOMING__', '-incoming defer') + r'''
mon "migrate_incoming __SCHEME__:10.77.0.2:__PORT__" "(qemu)" 60
echo "B-LISTENING"
if [ __MODE__ != precopy-uri ] && ! until_mig "postcopy rdma: active" 900; then
  echo "B-NO-RDMA"; tr -d '\r' < /tmp/mon.log; cat /tmp/qemu.err
fi
case __MODE__ in
precopy-uri)
  if until_mig "Migration status: completed" 1200; then
    echo "B-COMPLETED"
  else
    echo "B-NOT-COMPLETED"
  fi
  echo "check __REGION__ __BYTES__ 7" >&3
  waitfor /tmp/ser.log "ok check" 1800
sleep 1  # the rest of the line (grep sees lines still arriving)
  echo "B-CHECK $(grep 'ok check' /tmp/ser.log | tr -d '\r')" ;;
normal|prefetch)
  echo "B-ACTIVE"
  read ack
  echo "check __REGION__ __BYTES__ 7" >&3
  waitfor /tmp/ser.log "ok check" 1800
sleep 1  # the rest of the line (grep sees lines still arriving)
  echo "B-CHECK $(grep 'ok check' /tmp/ser.log | tr -d '\r')"
  : > /tmp/mon.log; echo "info migrate" >&4; sleep 2
  echo "B-STOPPED-INFO $(tr -d '\r' < /tmp/mon.log | grep 'postcopy rdma registered')"
  echo "B-READ-DONE"
  read ack
  if until_mig "Migration status: completed" 1200; then
    echo "B-COMPLETED"
  else
    echo "B-NOT-COMPLETED"
  fi ;;
kill-source)
  echo "B-ACTIVE"
  read ack
  echo "check __REGION__ __BYTES__ 7" >&3
  until_mig "pages read: [1-9]" 300 && echo "B-READING"
  read ack
  if until_mig "Migration status: postcopy-paused" 600; then
    echo "B-PAUSED"
  fi
  grep -q "ok check" /tmp/ser.log && echo "B-CHECK-ANSWERED"
  echo "B-INFO-BEGIN"; tr -d '\r' < /tmp/mon.log; echo "B-INFO-END"
  cat /tmp/qemu.err
  kill -9 $qpid
  exit 0 ;;
kill-dest)
  kill -9 $qpid
  echo "B-KILLED"
  read ack
  exit 0 ;;
esac
echo "B-INFO-BEGIN"; tr -d '\r' < /tmp/mon.log; echo "B-INFO-END"
cat /tmp/qemu.err
quit_l2
'''


def script(text, me, peer, mode):
    # kill-source: a bigger region, so that L2 is still reading when the
    # source dies.
    region, size = ((KILL_REGION, KILL_BYTES) if mode == 'kill-source'
                    else (REGION, BYTES))
    extra = {
        'prefetch': 'mon "migrate_set_capability postcopy-prefetch on" '
                    '"(qemu)" 60\n'
                    'mon "migrate_set_parameter postcopy-prefetch-mode '
                    'pattern" "(qemu)" 60',
        # QEMU's own rdma: migration, precopy only.
        'precopy-uri': 'mon "migrate_set_capability postcopy-rdma off" '
                       '"(qemu)" 60\n'
                       'mon "migrate_set_capability postcopy-ram off" '
                       '"(qemu)" 60',
    }.get(mode, '')
    return (text.replace('__ADDR__', me).replace('__PEER__', peer)
            .replace('__MODE__', mode).replace('__EXTRA_CAPS__', extra)
            .replace('__SCHEME__', 'rdma' if mode == 'precopy-uri' else 'tcp')
            .replace('__REGION__', hex(region)).replace('__BYTES__', hex(size))
            .replace('__PORT__', str(PORT)))


def section(text, name):
    m = re.search(rf'{name}-INFO-BEGIN\n(.*?){name}-INFO-END', text, re.S)
    return m[1] if m else ''


def number(info, label):
    m = re.search(rf'{label}: (\d+)', info)
    return int(m[1]) if m else None


def run(mode):
    """Both guests through the mode's script; returns their consoles."""
    work = kvmxtest.workdir(f'rdma-postcopy-{mode}-')
    t0 = time.monotonic()

    def step(what):
        print(f'  {time.monotonic() - t0:4.0f} s: {what}', flush=True)

    with rdma_pair(work, script(GUEST_A, '10.77.0.1', '10.77.0.2', mode),
                   script(GUEST_B, '10.77.0.2', '10.77.0.1', mode),
                   2400) as (a, b):
        a.wait_console(r'A-FILLED .*\n', 1200)
        b.wait_console(r'B-LISTENING\n', 300)
        step(f'L2 filled on A, B listens; migrating ({mode})')
        a.send_serial(b'go\n')
        if mode in ('normal', 'prefetch', 'kill-source'):
            # B's fetch is active: stop A's QEMU, then let L2 read.
            b.wait_console(r'B-ACTIVE\n', 900)
            a.wait_console(r'A-POSTCOPY\n', 300)
            a.send_serial(b'go\n')
            a.wait_console(r'A-STOPPED\n', 120)
            step('source QEMU stopped (SIGSTOP); L2 reads on B')
            b.send_serial(b'go\n')
        if mode == 'precopy-uri':
            rb = kvmxvm.wait_guest_exit(b, 2400)
            ra = kvmxvm.wait_guest_exit(a, 900)
        elif mode in ('normal', 'prefetch'):
            b.wait_console(r'B-READ-DONE\n', 1800)
            step('L2 read its memory; source QEMU continues')
            a.send_serial(b'go\n')
            a.wait_console(r'A-CONTINUED\n', 120)
            b.send_serial(b'go\n')
            rb = kvmxvm.wait_guest_exit(b, 2400)
            ra = kvmxvm.wait_guest_exit(a, 900)
        elif mode == 'kill-source':
            b.wait_console(r'B-READING\n', 600)
            a.send_serial(b'go\n')
            a.wait_console(r'A-KILLED\n', 120)
            step('source QEMU killed while L2 reads on B')
            b.send_serial(b'go\n')
            rb = kvmxvm.wait_guest_exit(b, 2400)
            a.send_serial(b'go\n')
            ra = kvmxvm.wait_guest_exit(a, 300)
        elif mode == 'kill-dest':
            b.wait_console(r'B-KILLED\n', 900)
            ra = kvmxvm.wait_guest_exit(a, 1200)
            b.send_serial(b'go\n')
            rb = kvmxvm.wait_guest_exit(b, 300)
        ta, tb = a.console_text(), b.console_text()
    print(f'both guests done in {time.monotonic() - t0:.0f} s')
    return work, ra, rb, ta, tb


def check_normal(ra, rb, ta, tb, ia, ib):
    check(ra == 0 and rb == 0, f'both guest scripts ended normally ({ra}, {rb})')
    m = re.search(r'B-CHECK ok check n=(\d+) bad=(\d+) first=(\S+)', tb)
    check(m is not None and int(m[1]) == PAGES and m[2] == '0',
          f'L2 on B finds all {PAGES} pages as written on A '
          f'({m[0] if m else "no check result"})')
    check('A-COMPLETED' in ta and 'B-COMPLETED' in tb,
          'the migration completed on both sides')
    check('B-NO-RDMA' not in tb, 'B reported the RDMA fetch active '
          'before L2 read its memory')
    stopped = re.search(r'B-STOPPED-INFO .*pages read: (\d+)', tb)
    stopped = int(stopped[1]) if stopped else None
    pre = re.search(r'B-STOPPED-INFO .*prefetched: (\d+)', tb)
    pre = int(pre[1]) if pre else 0
    read = number(ib, 'pages read')
    fails = number(ib, 'read failures')
    bad = number(ib, 'bad commands')
    dups = number(ib, 'duplicates')
    # L2 read its memory while A's QEMU was stopped (SIGSTOP): every page
    # that had not arrived by precopy before the switch came by RDMA READ,
    # with no source thread running at all.
    check('A-STOPPED' in ta and ta.find('A-CONTINUED') > 0,
          "A's QEMU was stopped while L2 read and continued afterwards")
    check(stopped is not None and stopped + pre >= MIN_READ,
          f'with the source QEMU stopped, B served {stopped} faults by RDMA '
          f'READ and read {pre} predicted pages (together at least '
          f'{MIN_READ} of the region\'s {PAGES} pages; the rest had come by '
          'precopy before the switch)')
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


def check_precopy_uri(ra, rb, ta, tb, ia, ib):
    """QEMU's own rdma: migration (precopy) with the patched QEMU."""
    check(ra == 0 and rb == 0, f'both guest scripts ended normally ({ra}, {rb})')
    check('A-COMPLETED' in ta and 'B-COMPLETED' in tb,
          'precopy over rdma: completed on both sides')
    m = re.search(r'B-CHECK ok check n=(\d+) bad=(\d+)', tb)
    check(m is not None and int(m[1]) == PAGES and m[2] == '0',
          f'L2 on B finds all {PAGES} pages as written on A '
          f'({m[0] if m else "no check result"})')


def check_prefetch(ra, rb, ta, tb, ia, ib):
    """As normal, with the pattern predictor: its pages come by READ too."""
    check_normal(ra, rb, ta, tb, ia, ib)
    m = re.search(r'B-STOPPED-INFO .*prefetched: (\d+)', tb)
    pre = int(m[1]) if m else 0
    read = re.search(r'B-STOPPED-INFO .*pages read: (\d+)', tb)
    read = int(read[1]) if read else 0
    # L2 reads sequentially: after a few faults the predictor asks for the
    # next pages, and with the source stopped only READ can bring them.
    check(pre >= MIN_READ // 2 and read < pre,
          f'with the source stopped, {pre} predicted pages came by batched '
          f'RDMA READ and only {read} faults were left (a fault each time '
          'the prediction ran out)')


def check_kill_source(ra, rb, ta, tb, ia, ib):
    """As over TCP: the destination pauses, nothing claims success."""
    check(ra == 0 and rb == 0, f'both guest scripts ended normally ({ra}, {rb})')
    check('B-NO-RDMA' not in tb, 'the RDMA fetch was active before the kill')
    check('B-READING' in tb, 'L2 was reading by RDMA READ when the source '
          'died')
    check('B-PAUSED' in tb, "B's post-copy paused when the source died")
    check('B-CHECK-ANSWERED' not in tb and 'Migration status: completed'
          not in ib, 'L2 did not finish its read and B claims no success')
    # Which comes first is a race: a READ in flight fails (state failed,
    # then the fault goes to the dead stream), or the broken stream pauses
    # post-copy and the fault thread holds before its next READ, as it
    # does without RDMA.  Both end paused; neither reads a wrong page.
    m = re.search(r'postcopy rdma: (\S+)(.*)', ib)
    print(f"  B's RDMA state: {m[0] if m else 'none'}; read failures "
          f"{number(ib, 'read failures')}")
    check(m is not None and m[1] in ('failed:', 'active'),
          f"B's RDMA state is failed or held by the pause "
          f"({m[0] if m else 'none'})")


def check_kill_dest(ra, rb, ta, tb, ia, ib):
    """As over TCP: the source pauses and stays up, and unpins."""
    check(ra == 0 and rb == 0, f'both guest scripts ended normally ({ra}, {rb})')
    check('A-PAUSED' in ta, "A's post-copy paused when the destination died")
    check('A-ALIVE' in ta, "A's QEMU is still running")
    m = re.search(r'postcopy rdma: (\S+)', ia)
    check(m is not None and m[1] != 'active',
          f"A's RDMA connection is not left active "
          f"({m[1] if m else 'none'}): the registered RAM is unpinned")


def main():
    mode = sys.argv[1] if len(sys.argv) > 1 else 'normal'
    if mode not in ('normal', 'prefetch', 'kill-source', 'kill-dest',
                    'precopy-uri'):
        print('usage: test_rdma_postcopy.py '
              '[normal|prefetch|kill-source|kill-dest|precopy-uri]',
              file=sys.stderr)
        return 2
    try:
        kvmxvm.guest_image(os.path.join(kvmxvm.REPO_ROOT))
    except kvmxvm.GuestImageMissing as e:
        kvmxvm.skip(str(e))
    work, ra, rb, ta, tb = run(mode)
    ia, ib = section(ta, 'A'), section(tb, 'B')
    print('--- A (source) info migrate\n' + ia)
    print('--- B (destination) info migrate\n' + ib)
    {'normal': check_normal, 'prefetch': check_prefetch,
     'precopy-uri': check_precopy_uri,
     'kill-source': check_kill_source,
     'kill-dest': check_kill_dest}[mode](ra, rb, ta, tb, ia, ib)
    return check.finish(work)


if __name__ == '__main__':
    sys.exit(main())
