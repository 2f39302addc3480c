#!/usr/bin/python3
"""Flush hint pages under real KVM, counted with KVM's own statistics.

A freestanding guest (tests/kvm-guest) runs in the patched QEMU with
-accel kvm and three NVDIMMs:
  nv0  file on disk, flush-hint=on          ROM-device mapping
  nv1  memfd, flush-hint=on, x-flush-hint-mmio=on   plain MMIO mapping
  nv2  anonymous RAM, flush-hint=auto       nothing to flush: no trap
The guest reads its flush hint N times and writes it M times; QMP
query-stats (KVM's vCPU stat mmio_exits) must show no exits for the reads
of nv0 and exactly M for its writes, N + M for nv1 (the contrast), none
at all for nv2, and query-nvdimm-flush must count the same M.  A write
of data into nv0's PMEM dirties the backing file; one flush hint write
leaves it clean.  Exits 77 where /dev/kvm cannot run a VM."""
import fcntl
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'lib'))
import kvmxtest  # noqa: E402
import kvmxvm  # noqa: E402
import pagecache  # noqa: E402
from fsguest import FsGuest  # noqa: E402

N_READS = 2000
M_WRITES = 300
SIZE = 64 << 20
KVM_GET_API_VERSION = 0xAE00
check = kvmxtest.Checks()


def kvm_unusable_reason():
    try:
        fd = os.open('/dev/kvm', os.O_RDWR)
    except OSError as e:
        return f'cannot open /dev/kvm: {e.strerror}'
    try:
        if fcntl.ioctl(fd, KVM_GET_API_VERSION) != 12:
            return 'unexpected KVM API version'
    except OSError as e:
        return f'KVM_GET_API_VERSION failed: {e.strerror}'
    finally:
        os.close(fd)
    return None


def guest_elf():
    build = os.environ.get('KVMX_BUILD_DIR') or os.path.join(
        kvmxvm.REPO_ROOT, 'build')
    elf = os.path.join(build, 'tests', 'kvm-guest', 'kvmx-testguest.elf')
    if not os.path.isfile(elf):
        kvmxvm.skip(f'{elf} not built (run scripts/build)')
    return elf


def mmio_exits(vm):
    res = vm.qmp.cmd('query-stats', target='vcpu',
                     providers=[{'provider': 'kvm', 'names': ['mmio_exits']}])
    return sum(s['value'] for r in res for s in r['stats']
               if s['name'] == 'mmio_exits')


def flush_info(vm):
    return {i['id']: i for i in vm.qmp.cmd('query-nvdimm-flush')}


def main():
    reason = kvm_unusable_reason()
    if reason:
        kvmxvm.skip(reason)
    qemu = kvmxvm.patched_qemu()
    elf = guest_elf()
    work = kvmxtest.workdir('kvm-')
    img = kvmxtest.backing_file(work, 'pmem.img', SIZE)
    args = ['-accel', 'kvm', '-machine', 'q35,nvdimm=on', '-cpu', kvmxvm.kvm_cpu_model_or_skip(qemu),
            '-m', '256M,slots=4,maxmem=4G', '-no-reboot', '-kernel', elf,
            '-device', 'isa-debug-exit,iobase=0xf4,iosize=0x04',
            '-object', f'memory-backend-file,id=m0,share=on,mem-path={img},'
                       f'size={SIZE}',
            '-device', 'nvdimm,id=nv0,memdev=m0,flush-hint=on',
            '-object', f'memory-backend-memfd,id=m1,size={SIZE}',
            '-device', 'nvdimm,id=nv1,memdev=m1,flush-hint=on,'
                       'x-flush-hint-mmio=on',
            '-object', f'memory-backend-ram,id=m2,size={SIZE}',
            '-device', 'nvdimm,id=nv2,memdev=m2,flush-hint=auto']
    with kvmxvm.Vm(qemu, args, work, 'kvm') as vm:
        vm.start()
        g = FsGuest(vm.serial_stream(), timeout=120)
        g.wait_ready(60)
        info = flush_info(vm)
        check([info[d]['mode'] for d in ('nv0', 'nv1', 'nv2')] ==
              ['trap', 'trap', 'no-trap'], 'modes: trap, trap, no-trap')
        check(info['nv1']['mapping'] == 'mmio', 'nv1 is mapped as MMIO')
        fha = {d: info[d]['addresses'][0] for d in info}
        pmem0 = next(d['data']['addr'] for d in
                     vm.qmp.cmd('query-memory-devices')
                     if d['data'].get('id') == 'nv0')

        def exits_of(fn):
            before = mmio_exits(vm)
            fn()
            return mmio_exits(vm) - before

        # nv0: ROM-device mapping.
        n = exits_of(lambda: g.read(fha['nv0'], N_READS))
        check(n == 0, f'{N_READS} reads of nv0 FHA: {n} MMIO exits (want 0)')
        before = flush_info(vm)['nv0']
        n = exits_of(lambda: g.write(fha['nv0'], M_WRITES))
        after = flush_info(vm)['nv0']
        check(n == M_WRITES, f'{M_WRITES} writes of nv0 FHA: {n} MMIO exits')
        gf = after['guest-flushes'] - before['guest-flushes']
        hf = after['host-flushes'] - before['host-flushes']
        check(gf == M_WRITES and hf == M_WRITES,
              f'query-nvdimm-flush counts {gf} guest, {hf} host flushes '
              f'(one vCPU: one host flush each)')

        # Data written into nv0's PMEM is durable after one FHA write.
        g.write(pmem0 + 0x10000, 1)
        dirty_before = pagecache.cachestat(img)['dirty']
        g.write(fha['nv0'], 1)
        st = pagecache.cachestat(img)
        check(dirty_before > 0 and st['dirty'] == 0 and st['writeback'] == 0,
              f'backing file: {dirty_before} dirty page(s) after the data '
              f'store, {st["dirty"]} after the FHA write')

        # nv1: plain MMIO, the contrast: reads exit too.
        n = exits_of(lambda: g.read(fha['nv1'], N_READS))
        check(n == N_READS, f'{N_READS} reads of nv1 (MMIO) FHA: {n} exits')
        n = exits_of(lambda: g.write(fha['nv1'], M_WRITES))
        check(n == M_WRITES, f'{M_WRITES} writes of nv1 (MMIO) FHA: {n} exits')

        # nv2: auto on a backend with nothing to flush: no exits at all.
        n = exits_of(lambda: (g.read(fha['nv2'], N_READS),
                              g.write(fha['nv2'], M_WRITES)))
        check(n == 0, f'{N_READS} reads + {M_WRITES} writes of nv2 (no-trap) '
                      f'FHA: {n} exits (want 0)')
        check(flush_info(vm)['nv2']['guest-flushes'] == 0,
              'nv2 counted no guest flushes')
        g.quit(0)
    return check.finish(work)


if __name__ == '__main__':
    sys.exit(main())
