#!/usr/bin/python3
"""The RDMA transport (hostd/rdma) on a real RDMA device: soft-RoCE.

The build host has no RDMA device, so this boots two Linux guests
(Debian 6.12, scripts/mkguest --nested) under TCG, A (10.77.0.1) and B
(10.77.0.2), whose virtio-net NICs are wired to each other (QEMU -netdev
dgram over a pair of unix sockets), each with an rdma_rxe device on its
NIC.  Two machines rather than two network namespaces of one: the 6.12
rxe driver answers RoCE traffic only in the initial network namespace,
and between two devices of one kernel the traffic would go through lo.

  A  runs the exporter-side Catch2 cases of test-hostd-rdma, then
     `kvmx-rdma-bench serve` (the memory to read), and after that dies
     (the last Catch2 case kills it) a second serve for the benchmark;
  B  runs the reader-side Catch2 cases against A's serve: READ returns
     the exported bytes, bad reads are refused locally, a wrong token is
     refused and counted by A, a wrong rkey fails the connection and not
     the process, a page A writes after registering it is read as written,
     and when A's process dies READs fail within seconds; then
     `kvmx-rdma-bench fetch`, checked: every page fetched over RDMA READ
     and over TCP had the right content, and A's process answered no page
     request for the pages fetched by READ.

The consoles are kept in the work directory; the fetch and registration
JSON lines are what bench/rdma/run.py reads.
"""
import contextlib
import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'lib'))
import kvmxtest  # noqa: E402
import kvmxvm  # noqa: E402

check = kvmxtest.Checks()
MODULES = ('kvmx.modules=virtio_net,rdma_rxe,ib_uverbs,rdma_ucm,'
           'crc32_generic,virtio_blk,ext4')

# Both guests: the NIC up with its address and an rxe device on it.
COMMON = r'''
set -u
for t in /opt/kvmx/ip /opt/kvmx/rdma /opt/kvmx/test-hostd-rdma \
         /opt/kvmx/kvmx-rdma-bench; do
  [ -x $t ] || { echo "RDMA-SKIP $t is not in the image"; exit 3; }
done
IP=/opt/kvmx/ip
RDMA=/opt/kvmx/rdma
$IP link set lo up
$IP addr add __ADDR__/24 dev eth0 || { echo "RDMA-SKIP no eth0"; exit 3; }
$IP link set eth0 up
$RDMA link add rxe0 type rxe netdev eth0 || { echo "RDMA-SKIP rxe"; exit 3; }
$RDMA link show
i=0
while ! ping -c 1 -W 1 __PEER__ >/dev/null 2>&1; do
  i=$((i+1)); [ $i -gt 120 ] && { echo "RDMA-NO-LINK"; exit 4; }
done
echo "RDMA-UP"
'''

GUEST_A = COMMON + r'''
mkdir -p /mnt/disk
if [ -b /dev/vda ]; then mkfs.ext4 -q -F /dev/vda && mount -t ext4 /dev/vda /mnt/disk; fi
KVMX_RDMA_LOCAL_IP=10.77.0.1 KVMX_RDMA_PLAIN_IP=127.0.0.1 \
    /opt/kvmx/test-hostd-rdma --reporter compact --colour-mode none '[nodevice],[local]' 2>&1
echo "A-CATCH2 $?"
# Announced once it listens: it registers and measures first.
serving() {  # serving LOG PID
  i=0
  until grep -q ", ready" $1; do
    i=$((i+1)); [ $i -gt 600 ] && { echo "A-SERVE-NOT-READY"; cat $1; exit 5; }
    kill -0 $2 2>/dev/null || { echo "A-SERVE-DIED"; cat $1; exit 5; }
    sleep 0.2
  done
  cat $1
}
/opt/kvmx/kvmx-rdma-bench serve --addr 10.77.0.1 --ctl-port 4790 \
    --mib 16 --sessions 0 > /tmp/serve1.log 2>&1 &
pid=$!
serving /tmp/serve1.log $pid
echo "A-SERVING"
wait $pid
rc=$?
tail -n 3 /tmp/serve1.log
echo "A-SERVE-EXIT $rc"
/opt/kvmx/kvmx-rdma-bench serve --addr 10.77.0.1 --ctl-port 4790 \
    --mib __MIB__ --sessions 1 --file-dir /mnt/disk > /tmp/serve2.log 2>&1 &
pid=$!
serving /tmp/serve2.log $pid
echo "A-SERVING2"
wait $pid
rc=$?
cat /tmp/serve2.log
echo "A-SERVE2-EXIT $rc"
'''

GUEST_B = COMMON + r'''
echo "B-WAIT"; read ack
KVMX_RDMA_PEER=10.77.0.1:4790 KVMX_RDMA_PLAIN_IP=127.0.0.1 \
    /opt/kvmx/test-hostd-rdma --reporter compact --colour-mode none '[nodevice],[peer]' 2>&1
echo "B-CATCH2 $?"
echo "B-WAIT2"; read ack
/opt/kvmx/kvmx-rdma-bench fetch --addr 10.77.0.1 --ctl-port 4790 \
    --samples __SAMPLES__ --depth 32 --json > /tmp/fetch.json
echo "B-FETCH-RC $?"
echo "RDMA-FETCH-JSON $(cat /tmp/fetch.json)"
'''


def guest_args(work, me, peer, mac):
    """The NIC wired to the other guest: each binds its own unix datagram
    socket and sends to the peer's (no start order needed)."""
    return ['-smp', '1',
            '-netdev', f'dgram,id=wire,local.type=unix,'
                       f'local.path={work}/{me}.sock,remote.type=unix,'
                       f'remote.path={work}/{peer}.sock',
            '-device', f'virtio-net-pci,netdev=wire,mac={mac}']


@contextlib.contextmanager
def rdma_pair(work, script_a, script_b, timeout_s, extra_a=()):
    """Guests A (10.77.0.1) and B (10.77.0.2) of scripts/mkguest --nested,
    NIC wired to NIC, each script started after COMMON brought rdma_rxe up;
    yields (a, b) once both said RDMA-UP.  Skips (77) without the image or
    when rxe cannot be set up in a guest.  The consoles are saved to
    <work>/A.console and B.console on the way out, and their tails printed
    when the body times out or QEMU fails."""
    nested = os.path.join(kvmxvm.REPO_ROOT, 'build', 'guest-nested')
    if not os.path.isfile(os.path.join(nested, 'initramfs.cpio.gz')):
        kvmxvm.skip(f'{nested} missing (run scripts/mkguest --nested)')
    os.environ['KVMX_GUEST_DIR'] = nested
    qemu = kvmxvm.patched_qemu()
    append = f'{MODULES} kvmx.timeout={timeout_s}'
    with kvmxvm.start_guest(qemu, script_a,
                            guest_args(work, 'a', 'b', '52:54:00:77:00:01') +
                            list(extra_a),
                            work, 'a', mem='1536M', append_extra=append) as a, \
            kvmxvm.start_guest(qemu, script_b,
                               guest_args(work, 'b', 'a', '52:54:00:77:00:02'),
                               work, 'b', mem='1536M',
                               append_extra=append) as b:
        try:
            for vm in (a, b):
                m = vm.wait_console(r'RDMA-UP|RDMA-SKIP (.*)\n|RDMA-NO-LINK',
                                    600)
                if m[0].startswith('RDMA-SKIP'):
                    kvmxvm.skip(f'in the guest: {m[1]}')
            yield a, b
        except (TimeoutError, RuntimeError):
            print('A:', a.console_text()[-3000:])
            print('B:', b.console_text()[-3000:])
            raise
        finally:
            for vm, name in ((a, 'A'), (b, 'B')):
                with open(os.path.join(work, f'{name}.console'), 'w') as f:
                    f.write(vm.console_text())


def run_pair(work, mib=64, samples=1000):
    """Boot A and B, drive them; returns (rc A, rc B, A's console, B's)."""
    disk = os.path.join(work, 'disk.img')
    with open(disk, 'wb') as f:
        f.truncate(256 << 20)
    script_a = (GUEST_A.replace('__ADDR__', '10.77.0.1')
                .replace('__PEER__', '10.77.0.2').replace('__MIB__', str(mib)))
    script_b = (GUEST_B.replace('__ADDR__', '10.77.0.2')
                .replace('__PEER__', '10.77.0.1')
                .replace('__SAMPLES__', str(samples)))
    with rdma_pair(work, script_a, script_b, 1500,
                   ['-drive', f'file={disk},format=raw,if=virtio']) as (a, b):
        a.wait_console(r'A-SERVING\n', 600)
        b.wait_console(r'B-WAIT\n', 60)
        b.send_serial(b'go\n')
        b.wait_console(r'B-CATCH2 \d+', 900)
        a.wait_console(r'A-SERVING2\n', 120)
        b.wait_console(r'B-WAIT2\n', 60)
        b.send_serial(b'go\n')
        rb = kvmxvm.wait_guest_exit(b, 900)
        ra = kvmxvm.wait_guest_exit(a, 120)
        return ra, rb, a.console_text(), b.console_text()


def parse_json(text, tag):
    """The last line "TAG {json}" of a console, parsed."""
    m = re.findall(rf'^{tag} (.*)$', text, re.M)
    if not m:
        return None
    try:
        return json.loads(m[-1])
    except ValueError:
        return None


def main():
    try:
        kvmxvm.guest_image(os.path.join(kvmxvm.REPO_ROOT))
    except kvmxvm.GuestImageMissing as e:
        kvmxvm.skip(str(e))
    work = kvmxtest.workdir('rdma-')
    t0 = time.monotonic()
    ra, rb, ta, tb = run_pair(work)
    print(f'both guests done in {time.monotonic() - t0:.0f} s')
    for name, text in (('A', ta), ('B', tb)):
        tail = text[text.find('RDMA-UP'):]
        print(f'--- {name}\n{tail[-4000:]}')
    check(ra == 0 and rb == 0, f'both guest scripts ended normally ({ra}, {rb})')
    m = re.search(r'A-CATCH2 (\d+)', ta)
    check(m is not None and m[1] == '0',
          f'exporter-side Catch2 cases passed on A (rc {m[1] if m else "none"})')
    m = re.search(r'B-CATCH2 (\d+)', tb)
    check(m is not None and m[1] == '0',
          f'reader-side Catch2 cases passed on B (rc {m[1] if m else "none"})')
    for name, text in (('A', ta), ('B', tb)):
        # Catch2's compact summary: "All tests passed (A assertions in N test cases)" or
        # "test cases: N | P passed | S skipped ..."
        c = re.search(r'All tests passed .*|test cases: .*', text)
        check(c is not None and 'skipped' not in c[0],
              f'{name}: no case skipped for want of a device or peer '
              f'({c[0] if c else "no summary"})')
    check(re.search(r'A-SERVE-EXIT 9', ta) is not None,
          "A's serve ended by the reader's kill request, as a killed source")
    reg = parse_json(ta, 'SERVE-REGISTER')
    check(reg is not None, 'registration costs were measured on A')
    fetch = parse_json(tb, 'RDMA-FETCH-JSON')
    check(fetch is not None, 'the benchmark ran on B')
    if fetch:
        check(fetch['bad_pages'] == 0,
              'every page fetched by READ and by TCP had the right content')
        check(fetch['device'].startswith('rxe'),
              f"read through {fetch['device']}")
        check(fetch['server_pages_served_rdma'] == 0,
              'the exporting process served no page request while '
              f"{fetch['region_mib']} MiB were fetched by READ")
        check(fetch['server_pages_served_tcp'] == fetch['region_mib'] * 256,
              'the TCP comparison was served page by page '
              f"({fetch['server_pages_served_tcp']})")
        st = fetch['stale'].get('cow_of_untouched_write_pin', {})
        check(st.get('stale') is False,
              'untouched memory, write-pinned, then written: READ sees the '
              f'write ({st})')
        for k, v in fetch['stale'].items():
            print(f'  staleness probe: {k}: {v}')
        print('fetch:', json.dumps(fetch))
    if reg:
        print('register:', json.dumps(reg))
    return check.finish(work)


if __name__ == '__main__':
    sys.exit(main())
