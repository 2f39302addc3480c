#!/usr/bin/python3
"""A hostile migration source against the destination's postcopy-rdma
(issue 15: anything a migration peer sends is hostile).

MIG_CMD_POSTCOPY_RDMA (docs/specs/rdma-fetch.md) tells the destination
where to READ the source's RAM.  Here a fake source (this script) opens
a migration stream to a patched destination QEMU (machine none, 16 MiB of
RAM, postcopy-ram and postcopy-rdma on), brings it into post-copy
(configuration, OPEN_RETURN_PATH, POSTCOPY_ADVISE, POSTCOPY_LISTEN: the
listen thread then reads the rest) and sends one command, a fresh QEMU
per case.  A malformed or inconsistent command must be refused, counted
(`bad-commands`), reported with its reason (`postcopy-rdma` status
`fallback`), and never abort QEMU or end the migration; the stream goes
on.  A well-formed command is accepted, and since this host has no RDMA
device the connection attempt falls back with the reason.  No RDMA
device is needed: nothing is ever read.
"""
import os
import socket
import struct
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'lib'))
import kvmxtest  # noqa: E402
import kvmxvm  # noqa: E402

check = kvmxtest.Checks()
RAM = 16 << 20
PAGE = 4096
# migration/savevm.c
QEMU_VM_FILE_MAGIC = 0x5145564d
QEMU_VM_FILE_VERSION = 3
QEMU_VM_CONFIGURATION = 0x07
QEMU_VM_COMMAND = 0x08
CMD_OPEN_RETURN_PATH = 1
CMD_POSTCOPY_ADVISE = 3
CMD_POSTCOPY_LISTEN = 4
CMD_POSTCOPY_RUN = 5
CMD_POSTCOPY_RAM_DISCARD = 6
CMD_PACKAGED = 7
CMD_POSTCOPY_RDMA = 12


def command(cmd, data=b''):
    return struct.pack('>BHH', QEMU_VM_COMMAND, cmd, len(data)) + data


def prefix():
    """Header and configuration for machine none, then the return path,
    the post-copy advise (page size summary and target page size), a
    discard and the package with LISTEN and RUN, as a source sends at the switch: the
    destination's listen thread reads on from there."""
    name = b'none'
    out = struct.pack('>II', QEMU_VM_FILE_MAGIC, QEMU_VM_FILE_VERSION)
    out += bytes([QEMU_VM_CONFIGURATION]) + struct.pack('>I', len(name)) + name
    out += command(CMD_OPEN_RETURN_PATH)
    out += command(CMD_POSTCOPY_ADVISE, struct.pack('>QQ', PAGE, PAGE))
    # One discard (page 0 of "ram", never touched): LISTEN then finds the
    # state a source leaves.
    out += command(CMD_POSTCOPY_RAM_DISCARD,
                   bytes([0, 3]) + b'ram\0' + struct.pack('>QQ', 0, PAGE))
    package = command(CMD_POSTCOPY_LISTEN) + command(CMD_POSTCOPY_RUN)
    out += command(CMD_PACKAGED, struct.pack('>I', len(package))) + package
    return out


def rdma_cmd(blocks, version=1, port=4791, token=7, addr='127.0.0.1',
             nblocks=None, tail=b''):
    """MIG_CMD_POSTCOPY_RDMA's payload; blocks: (id, addr, length, rkey)."""
    a = addr.encode()
    body = struct.pack('>BBHQB', version, 0, port, token, len(a)) + a
    body += struct.pack('>H', len(blocks) if nblocks is None else nblocks)
    for bid, baddr, blen, rkey in blocks:
        b = bid.encode()
        body += struct.pack('>B', len(b)) + b + struct.pack('>QQI', baddr,
                                                            blen, rkey)
    return body + tail


def attempt(qemu, work, n, what, payload, expect, rdma_cap=True, then=None,
            bad=1):
    """One destination, one command; expect: the refusal's words, or None
    for a command that is accepted (then the connection falls back)."""
    args = ['-machine', 'none', '-accel', 'tcg', '-m', str(RAM >> 20),
            '-display', 'none', '-incoming', 'defer']
    with kvmxvm.Vm(qemu, args + ['-S'], work, f'dst{n}') as vm:
        vm.start()
        vm.qmp.cmd('migrate-set-capabilities', capabilities=[
            {'capability': 'postcopy-ram', 'state': True},
            {'capability': 'postcopy-rdma', 'state': rdma_cap}])
        port = kvmxtest.free_port()
        vm.qmp.cmd('migrate-incoming', uri=f'tcp:127.0.0.1:{port}')
        s = socket.create_connection(('127.0.0.1', port), timeout=10)
        try:
            s.sendall(prefix() + command(CMD_POSTCOPY_RDMA, payload) +
                      (command(CMD_POSTCOPY_RDMA, then) if then else b''))
            info, deadline = {}, time.monotonic() + 20
            while time.monotonic() < deadline:
                info = vm.qmp.cmd('query-migrate')
                r = info.get('postcopy-rdma', {})
                if r.get('status') in ('fallback', 'failed', 'active'):
                    break
                if not rdma_cap and info.get('status') == 'postcopy-active':
                    time.sleep(1)
                    break
                time.sleep(0.1)
            info = vm.qmp.cmd('query-migrate')
            r = info.get('postcopy-rdma', {})
            alive = vm.proc.poll() is None
            if not rdma_cap:
                check(alive and info.get('status') == 'postcopy-active' and
                      not r,
                      f'{what}: ignored, the migration goes on '
                      f'({info.get("status")}, {r})')
            elif expect is None:
                check(alive and r.get('bad-commands') == 0 and
                      r.get('status') == 'fallback' and
                      'RDMA' in r.get('reason', ''),
                      f'{what}: accepted; without a device the connection '
                      f'falls back ({r.get("reason")})')
            else:
                check(alive and info.get('status') == 'postcopy-active' and
                      r.get('bad-commands') == bad and
                      r.get('status') == 'fallback' and
                      expect in r.get('reason', ''),
                      f'{what}: refused, counted, the migration goes on '
                      f'({info.get("status")}: {r.get("reason")!r})')
        finally:
            s.close()


def main():
    qemu = kvmxvm.patched_qemu()
    work = kvmxtest.workdir('rdma-hostile-')
    probe = kvmxvm.Vm(qemu, ['-machine', 'none', '-accel', 'tcg', '-m', '16',
                             '-display', 'none', '-S'], work, 'probe')
    with probe:
        probe.start()
        caps = [c['capability'] for c in
                probe.qmp.cmd('query-migrate-capabilities')]
        blocks = probe.qmp.cmd('human-monitor-command',
                               **{'command-line': 'info ramblock'})
    if 'postcopy-rdma' not in caps:
        kvmxvm.skip('this QEMU has no postcopy-rdma (topic 09-rdma-fetch, '
                    'built with rdma-core)')
    print(blocks)
    ram = 'ram'
    good = [(ram, 0x7f0000000000, RAM, 0x1234)]
    cases = [
        ('a well-formed command', rdma_cmd(good), None),
        ('version 2', rdma_cmd(good, version=2), 'unknown version'),
        ('empty', b'', 'unknown version'),
        ('cut in the header', rdma_cmd(good)[:9], 'malformed header'),
        ('port 0', rdma_cmd(good, port=0), 'malformed header'),
        ('address length 0', rdma_cmd(good, addr=''), 'malformed header'),
        ('address of 65 bytes', rdma_cmd(good, addr='1' * 65),
         'malformed header'),
        ('0 blocks', rdma_cmd([], nblocks=0), '0 RAM blocks'),
        ('65 blocks announced', rdma_cmd(good, nblocks=65), '65 RAM blocks'),
        ('2 blocks announced, 1 sent', rdma_cmd(good, nblocks=2),
         'block 1 truncated'),
        ('an unknown block', rdma_cmd([('nope', 0, RAM, 1)]),
         "'nope' does not go post-copy here"),
        ('a block id with a NUL', rdma_cmd([('ra\0m', 0, RAM, 1)]),
         'block 0 truncated or malformed'),
        ('a length that differs', rdma_cmd([(ram, 0, RAM // 2, 1)]),
         'has 16777216 bytes, not 8388608'),
        ('an address range that wraps', rdma_cmd([(ram, 2**64 - PAGE, RAM,
                                                   1)]),
         'its address range wraps'),
        ('the same block twice', rdma_cmd(good + good), 'twice'),
        ('bytes after the last block', rdma_cmd(good, tail=b'x'),
         '1 bytes after the last block'),
        ('an address other than the peer', rdma_cmd(good, addr='10.9.9.9'),
         "is not the migration peer's"),
        ('not an IP address', rdma_cmd(good, addr='localhost'),
         "is not the migration peer's"),
    ]
    for n, (what, payload, expect) in enumerate(cases):
        attempt(qemu, work, n, what, payload, expect)
    attempt(qemu, work, len(cases), 'the capability off on the destination',
            rdma_cmd(good), 'off here', rdma_cap=False)
    attempt(qemu, work, len(cases) + 1, 'a second command (after a bad one)',
            rdma_cmd(good, version=9), 'a second command', then=rdma_cmd(good),
            bad=2)
    return check.finish(work)


if __name__ == '__main__':
    sys.exit(main())
