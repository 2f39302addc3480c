#!/usr/bin/python3
"""Guest-requested memory protection and dirty tracking, end to end: a real
6.12 guest (TCG) with kvmx_guest.ko bound to the patched QEMU's kvmx-chan
device, kvmxctl and kvmx-prottest inside, and kvmx-hostd attached to the
VM through a QMP socket of its own.

In the guest:
  - kvmx-prottest all: a page protected ro+signal is written, the process
    gets SIGSEGV/SEGV_ACCERR at the written address and the page is
    unchanged; unprotect and the write sticks; deny/log/none semantics;
    dirty tracking reports exactly the pages written; a process's exit
    releases its protections; every bad argument gets its errno; shared
    memory (MAP_SHARED anonymous, memfd, SysV shm, hugetlb) is refused
    with EOPNOTSUPP while another process still writes it; 60 protections
    in a burst all succeed but take >= 1.5 s (the device's rate limit,
    which the driver waits out; query-kvmx-chan counts them as
    throttled); an unprivileged child (uid 65534) protects its own page, not root's, sees
    neither root's entries nor its events, and meets the per-user entry
    limit and the RLIMIT_MEMLOCK byte limit.
  - kvmxctl protects another process's page (as root), lists it with
    --json, and the target's exit releases it; /dev/kvmx is mode 0666, but
    an unprivileged user cannot protect root's process (it may not open
    /proc/PID/mem) and its list does not show root's protection.
  - raw malformed requests straight to the device's doorbell (devmem) are
    rejected and counted, and the guest goes on.
On the host:
  - hostd lists the violations with VM, guest-physical address, access and
    time; after SIGKILL and a restart it still does and re-attaches;
    a garbage line on its socket gets an error and it keeps serving.
  - query-kvmx-chan shows nothing left protected at the end, and the
    rejected count covers the raw malformed requests.
"""
import json
import os
import re
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'lib'))
import kvmxtest  # noqa: E402
import kvmxvm  # noqa: E402
from hostdctl import Hostd, hostd_binary  # noqa: E402

check = kvmxtest.Checks()
HOSTD = hostd_binary()

GUEST = r'''
K=/opt/kvmx
for f in kvmx_guest.ko kvmxctl kvmx-prottest; do
    [ -e $K/$f ] || { echo "MISSING $f"; exit 3; }
done
insmod $K/kvmx_guest.ko || { echo INSMOD-FAILED; dmesg | tail; exit 4; }
[ -c /dev/kvmx ] || { echo NO-DEV; dmesg | tail; exit 5; }
echo "DEVMODE $(stat -c %a /dev/kvmx)"
echo PROT-READY; read ack

$K/kvmx-prottest all; echo "PROTTEST-RC=$?"

# Another process's page, by kvmxctl (root may ptrace it).
sleep 600 & P=$!
sleep 1
A=$(awk '$2 ~ /^rw/ && $6 == "[stack]" {split($1, r, "-"); print "0x" r[1]}' /proc/$P/maps)
echo "TARGET $P $A"
$K/kvmxctl protect --pid $P --addr $A --len 4096 --access ro --action log --json
echo "CTL-PROTECT-RC=$?"
echo "LIST1 $($K/kvmxctl list --pid $P --json)"
# An unprivileged user opens /dev/kvmx (0666) but may not reach root's
# process (no ptrace permission: /proc/$P/mem is EACCES), and does not see
# root's protection.
$K/kvmx-prottest --as-user 65534 -- $K/kvmxctl protect --pid $P --addr $A \
    --len 4096 --access ro --action deny 2>/tmp/eperm.txt
echo "CTL-NOBODY-RC=$? $(cat /tmp/eperm.txt)"
echo "LIST-NOBODY $($K/kvmx-prottest --as-user 65534 -- $K/kvmxctl list --json 2>&1)"
kill $P; wait $P 2>/dev/null
sleep 1
echo "LIST2 $($K/kvmxctl list --pid $P --json)"

# Malformed requests straight to the device (no driver checks on the way).
# The driver holds the BAR (strict /dev/mem): unbind it meanwhile.
DEV=$(for d in /sys/bus/pci/devices/*; do
    [ "$(cat $d/vendor)" = 0x1af4 ] && [ "$(cat $d/device)" = 0x10f0 ] && echo $d; done)
BDF=${DEV##*/}
BAR=$(head -n1 $DEV/resource | cut -d' ' -f1)
echo "BAR $BDF $BAR"
echo $BDF > $DEV/driver/unbind
B=$((BAR))
devmem $((B + 0x10)) 32 3            # shorter than a header
devmem $((B + 0x08)) 32 0xfffff000   # not guest RAM
devmem $((B + 0x0c)) 32 0
devmem $((B + 0x10)) 32 64
echo "RAW-STATUS $(devmem $((B + 0x14)) 32)"
devmem $((B + 0x10)) 32 0x7fffffff  # far too long
echo "RAW-DONE"
echo $BDF > /sys/bus/pci/drivers/kvmx_guest/bind
sleep 1
[ -c /dev/kvmx ] || echo "REBIND-FAILED"
# The driver still works after that.
$K/kvmx-prottest signal; echo "PROTTEST2-RC=$?"
dmesg | grep -E "BUG|WARNING|Oops|kvmx_guest" | tail -n 20
echo GUEST-DONE; read ack
'''


def main():
    kvmxtest.require_guest_image()
    qemu = kvmxvm.patched_qemu()
    if not os.access(HOSTD, os.X_OK):
        kvmxvm.skip(f'{HOSTD} not built')
    work = kvmxtest.workdir('protect-')
    hostd_qmp = os.path.join(work, 'hostd-qmp.sock')
    hostd = Hostd(work)
    hostd.start()
    try:
        with kvmxvm.start_guest(
                qemu, GUEST,
                ['-device', 'kvmx-chan,id=chan0',
                 '-qmp', f'unix:{hostd_qmp},server=on,wait=off'],
                work, 'protect') as vm:
            vm.wait_console(r'PROT-READY', 180)
            r = hostd.call('attach', vm='prot1', qmp=hostd_qmp)
            check('error' not in r, f'hostd attaches to the VM: {r}')
            vm.send_serial(b'go\n')
            m = vm.wait_console(r'GUEST-DONE|KVMX-GUEST-EXIT', 900)
            con = vm.console_text()
            # The guest waits, else it may power off before QEMU answers.
            info = vm.qmp.cmd('query-kvmx-chan')
            if m[0] == 'GUEST-DONE':
                vm.send_serial(b'go\n')
            rc = kvmxvm.wait_guest_exit(vm, 120)
        print(con[con.find('PROT-READY'):])
        check(rc == 0, f'guest script exit {rc}')
        for line in re.findall(r'^(?:PASS|FAIL) .*$', con, re.M):
            check(line.startswith('PASS'), f'guest: {line.strip()}')
        check(re.search(r'PROTTEST-RC=0', con), 'kvmx-prottest all passes')
        check(re.search(r'CTL-PROTECT-RC=0', con),
              'kvmxctl protects another process as root')
        m = re.search(r'^LIST1 (.*)$', con, re.M)
        try:
            l1 = json.loads(m.group(1)) if m else None
        except ValueError:
            l1 = None
        ents = l1 if isinstance(l1, list) else (l1 or {}).get('protections', [])
        check(len(ents) == 1, f'kvmxctl list --json shows the protection: {l1}')
        m = re.search(r'^DEVMODE (\S+)', con, re.M)
        check(m and m.group(1) == '666',
              f'/dev/kvmx is mode 0666: {m.group(1) if m else None}')
        t = re.search(r'^TARGET (\d+) ', con, re.M)
        m = re.search(r'CTL-NOBODY-RC=(\d+) (.*)', con)
        msg = m.group(2) if m else ''
        # It must fail for the ptrace reason, not for /dev/kvmx's mode.
        ptrace_reason = (
            (t and f'/proc/{t.group(1)}/mem' in msg) or
            'Permission denied' in msg or 'Operation not permitted' in msg)
        check(m and m.group(1) != '0' and msg.startswith('kvmxctl:') and
              ptrace_reason and 'open /dev/kvmx' not in msg,
              f'an unprivileged user cannot protect root\'s process '
              f'(/proc/PID/mem, EACCES/EPERM): {m.group(0) if m else None}')
        m = re.search(r'^LIST-NOBODY (.*)$', con, re.M)
        try:
            ln = json.loads(m.group(1)) if m else None
        except ValueError:
            ln = None
        check(isinstance(ln, dict) and ln.get('protections') == [] and
              ln.get('count') == 0,
              f'an unprivileged user does not see root\'s protection: '
              f'{m.group(1) if m else None}')
        m = re.search(r'^LIST2 (.*)$', con, re.M)
        try:
            l2 = json.loads(m.group(1)) if m else None
        except ValueError:
            l2 = None
        ents = l2 if isinstance(l2, list) else (l2 or {}).get('protections')
        check(ents == [], f'the target\'s exit released its protection: {l2}')
        m = re.search(r'RAW-STATUS (\S+)', con)
        check(m and int(m.group(1), 16) == 0xfffffff2,
              f'a request outside guest RAM gets -EFAULT: '
              f'{m.group(1) if m else None}')
        check('RAW-DONE' in con and 'REBIND-FAILED' not in con and
              re.search(r'PROTTEST2-RC=0', con),
              'raw malformed requests leave the device and driver working')
        check(not re.search(r'BUG|Oops|WARNING', con),
              'guest kernel log has no BUG/WARNING/Oops')
        dev = info[0] if info else {}
        check(dev.get('entries') == [],
              f'nothing protected or tracked at the end: {dev.get("entries")}')
        check(dev.get('rejected', 0) >= 3,
              f'device counted the malformed requests: {dev.get("rejected")}')
        check(dev.get('violations', 0) >= 3,
              f'device counted violations: {dev.get("violations")}')
        check(dev.get('throttled', 0) >= 1,
              f'the device rate-limited the guest\'s burst of protections '
              f'(kvmx-prottest rate), and the driver waited it out: '
              f'throttled {dev.get("throttled")}')

        v = hostd.violations('prot1')
        check(len(v) >= 3, f'hostd recorded the violations: {len(v)}')
        writes = [x for x in v if x.get('access') == 'write']
        check(writes and all('gpa' in x and ('time' in x or 'host_time' in x
                                              or 'time_ns' in x) for x in writes),
              f'violations carry gpa, access and time: {writes[:1]}')
        r = hostd.send(b'{this is not json\n')
        check('error' in r, f'hostd answers garbage with an error: {r}')
        hostd.kill()
        hostd.start()
        v2 = hostd.violations('prot1')
        check(len(v2) == len(v),
              f'after SIGKILL and restart hostd still has {len(v2)}/{len(v)}')
        st = hostd.call('stats')
        check('error' not in st, f'hostd serves after restart: {st}')
    finally:
        hostd.stop()
    return check.finish(work)


if __name__ == '__main__':
    sys.exit(main())
