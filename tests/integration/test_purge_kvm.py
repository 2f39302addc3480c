#!/usr/bin/python3
"""Purged NVDIMM blocks under real KVM, touched by the freestanding guest.

The test guest (tests/kvm-guest) runs with -accel kvm and a 32 MiB
file-backed NVDIMM with purge-agent; every 8-byte word of the backend
holds (block << 32 | word index).  hostd purges every block (purge-now);
the backend's allocated bytes drop to nothing.  Then the guest's vCPU
loads words from purged blocks (KVM faults on QEMU's placeholder and
waits in userfaultfd until hostd has brought the block back): each load
returns the right word, hostd counts one fault-back per block touched
(plus the read-ahead that two sequential faults start), and the other
blocks stay purged.  A store into a purged block lands
after its fault-back and is in the file.  Exits 77 where /dev/kvm cannot
run a VM."""
import os
import struct
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'lib'))
import hostdctl  # noqa: E402
import kvmxtest  # noqa: E402
import kvmxvm  # noqa: E402
from fsguest import FsGuest  # noqa: E402
from test_flush_hint_kvm import guest_elf, kvm_unusable_reason  # noqa: E402

MiB = 1 << 20
SIZE = 32 * MiB
BLOCK = 2 * MiB
check = kvmxtest.Checks()


def word(block, i):
    return (block << 32) | i


def make_backend(path):
    with open(path, 'wb') as f:
        for b in range(SIZE // BLOCK):
            f.write(b''.join(struct.pack('<Q', word(b, i))
                             for i in range(BLOCK // 8)))


def status(hostd):
    return hostd.call('purge-status', vm='k', nvdimm='m0')['result'][
        'nvdimms'][0]


def main():
    reason = kvm_unusable_reason()
    if reason:
        kvmxvm.skip(reason)
    qemu = kvmxvm.patched_qemu()
    elf = guest_elf()
    work = kvmxtest.workdir('purge-kvm-')
    img = os.path.join(work, 'pmem.img')
    make_backend(img)
    agent = os.path.join(work, 'agent.sock')
    hqmp = os.path.join(work, 'hostd.qmp')
    args = ['-accel', 'kvm', '-machine', 'q35,nvdimm=on',
            '-cpu', kvmxvm.kvm_cpu_model_or_skip(qemu),
            '-m', '256M,slots=4,maxmem=4G', '-no-reboot', '-kernel', elf,
            '-device', 'isa-debug-exit,iobase=0xf4,iosize=0x04',
            '-object', f'memory-backend-file,id=m0,share=on,mem-path={img},'
                       f'size={SIZE},purge-agent={agent}',
            '-device', 'nvdimm,id=nv0,memdev=m0',
            '-qmp', f'unix:{hqmp},server=on,wait=off']
    hostd = hostdctl.Hostd(work)
    hostd.start()
    try:
        with kvmxvm.Vm(qemu, args, work, 'kvm') as vm:
            vm.start()
            run(vm, hostd, img, hqmp)
    finally:
        hostd.stop()
    return check.finish(work)


def run(vm, hostd, img, hqmp):
    g = FsGuest(vm.serial_stream(), timeout=120)
    g.wait_ready(60)
    base = next(d['data']['addr'] for d in vm.qmp.cmd('query-memory-devices')
                if d['data'].get('id') == 'nv0')
    r = hostd.call('attach', vm='k', qmp=hqmp)
    check('result' in r, f'hostd attaches ({r.get("error")})')
    hostd.wait_vm('k', lambda v: v['state'] == 'attached', 60)
    r = hostd.call('purge-policy', vm='k', nvdimm='m0')
    if not check('result' in r, f'purging enabled ({r.get("error")})'):
        return
    # The guest reads a word first: the block is resident, no fault.
    check(g.peek(base + 8, 8) == word(0, 1), 'a resident word reads right')
    before = os.stat(img).st_blocks * 512
    r = hostd.call('purge-now', vm='k', nvdimm='m0', ignore_idle=True)
    check('result' in r and r['result']['blocks'] == SIZE // BLOCK,
          f'every block purged ({r.get("result", r)})')
    after = os.stat(img).st_blocks * 512
    check(after == 0, f'backend allocation {before // MiB} MiB -> {after} B')

    touched = [0, 3, 7, 8, 15]
    s0 = status(hostd)
    for b in touched:
        for i in (0, 12345, BLOCK // 8 - 1):
            v = g.peek(base + b * BLOCK + i * 8, 8)
            check(v == word(b, i), f'KVM load of block {b} word {i}: '
                                   f'{v:#x} (want {word(b, i):#x})')
    s1 = status(hostd)
    # 7 then 8 are sequential faults: read-ahead brings the next purged
    # blocks as well (a window of 2: blocks 9 and 10), nothing else does.
    n = s1['fault-backs'] - s0['fault-backs']
    ra = s1['readahead']['blocks'] - s0['readahead']['blocks']
    check(n == len(touched) + ra and ra == 2,
          f'{n} fault-backs for {len(touched)} blocks touched '
          f'({s1["faults"] - s0["faults"]} faults) and {ra} read ahead')
    check(s1['purged'] == SIZE // BLOCK - len(touched) - ra,
          f'{s1["purged"]} blocks stay purged')

    # A store into a purged block: it comes back first, then the store lands.
    g.poke(base + 5 * BLOCK + 64, 8, 0xfeedface)
    check(g.peek(base + 5 * BLOCK + 64, 8) == 0xfeedface and
          g.peek(base + 5 * BLOCK + 72, 8) == word(5, 9),
          'a store into a purged block lands on its restored data')
    with open(img, 'rb') as f:
        f.seek(5 * BLOCK + 64)
        got = struct.unpack('<QQ', f.read(16))
    check(got == (0xfeedface, word(5, 9)), f'and is in the backend: {got}')
    s2 = status(hostd)
    errs = {k: v for k, v in s2['errors'].items() if v}
    check(not errs and s2['lost'] == 0, f'no errors ({errs})')
    g.quit(0)


if __name__ == '__main__':
    sys.exit(main())
