#!/usr/bin/python3
"""Bad flush-hint configurations stop QEMU at start-up with one line naming
the option; good ones start.  No guest is booted: QEMU is started paused
(-S) and asked for its flush-hint state over QMP."""
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'lib'))
import kvmxvm  # noqa: E402

QEMU = kvmxvm.patched_qemu()
failures = []


def qemu_args(backend, device, machine='q35,nvdimm=on',
              mem='256M,slots=2,maxmem=2G'):
    return ['-machine', machine, '-accel', 'tcg', '-S', '-m', mem,
            '-object', backend, '-device', device]


def expect_error(name, backend, device, must_mention, backend_noise=0,
                 **kw):
    """QEMU must exit non-zero with a single error line naming the option
    (after `backend_noise` lines that the memory backend itself prints)."""
    p = subprocess.run([QEMU, '-nodefaults', '-display', 'none'] +
                       qemu_args(backend, device, **kw) + ['-qmp', 'stdio'],
                       input='', capture_output=True, text=True, timeout=60)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    ok = (p.returncode != 0 and 1 <= len(lines) <= 1 + backend_noise and
          all(m in lines[-1] for m in must_mention))
    print(f"{'ok  ' if ok else 'FAIL'} {name}: rc={p.returncode} "
          f"stderr={p.stderr.strip()!r}")
    if not ok:
        failures.append(name)


def expect_mode(name, backend, device, mode, host_flush, fields=None,
                warning=None):
    """QEMU starts; query-nvdimm-flush shows `mode` and `host_flush` (and
    `fields`); its stderr mentions `warning` if given."""
    with tempfile.TemporaryDirectory() as d:
        with kvmxvm.Vm(QEMU, qemu_args(backend, device), d, 'cfg') as vm:
            vm.start()
            info = vm.qmp.cmd('query-nvdimm-flush')
            got = (info[0]['mode'], info[0]['host-flush']) if info else None
            ok = got == (mode, host_flush) and (
                mode == 'off' or len(info[0]['addresses']) >= 1)
            for k, v in (fields or {}).items():
                ok = ok and info[0].get(k) == v
            err = vm.stderr_text()
            if warning is not None:
                ok = ok and warning in err
            print(f"{'ok  ' if ok else 'FAIL'} {name}: {info} "
                  f"stderr={err.strip()!r}")
            if not ok:
                failures.append(name)


def expect_aligned_next(img):
    """A memory device after a flush-hinted NVDIMM keeps 2 MiB alignment
    (Linux maps device memory in 2 MiB subsections)."""
    img2 = img + '.2'
    with open(img2, 'wb') as f:
        f.truncate(64 << 20)
    args = ['-machine', 'q35,nvdimm=on', '-accel', 'tcg', '-S',
            '-m', '256M,slots=4,maxmem=2G',
            '-object', f'memory-backend-file,id=a,share=on,mem-path={img},'
                       'size=64M',
            '-device', 'nvdimm,id=nva,memdev=a,flush-hint=on',
            '-object', f'memory-backend-file,id=b,share=on,mem-path={img2},'
                       'size=64M',
            '-device', 'nvdimm,id=nvb,memdev=b']
    with tempfile.TemporaryDirectory() as d:
        with kvmxvm.Vm(QEMU, args, d, 'align') as vm:
            vm.start()
            addrs = {m['data']['id']: m['data']['addr']
                     for m in vm.qmp.cmd('query-memory-devices')}
            fha = vm.qmp.cmd('query-nvdimm-flush')[0]['addresses'][0]
    ok = (addrs['nvb'] % (2 << 20) == 0 and
          addrs['nva'] + (64 << 20) == fha and fha < addrs['nvb'])
    print(f"{'ok  ' if ok else 'FAIL'} next device stays 2 MiB aligned: "
          f"nva {addrs['nva']:#x}, FHA {fha:#x}, nvb {addrs['nvb']:#x}")
    if not ok:
        failures.append('alignment of the next memory device')


def main():
    tmp = tempfile.mkdtemp(prefix='kvmx-cfg-', dir=kvmxvm.scratch_dir())
    img = os.path.join(tmp, 'pmem.img')
    with open(img, 'wb') as f:
        f.truncate(64 << 20)
    filebe = f'memory-backend-file,id=m,share=on,mem-path={img},size=64M'
    privbe = f'memory-backend-file,id=m,share=off,mem-path={img},size=64M'
    robe = (f'memory-backend-file,id=m,readonly=on,mem-path={img},size=64M')
    rambe = 'memory-backend-ram,id=m,size=64M'
    memfd = 'memory-backend-memfd,id=m,size=64M'
    shmdir = tempfile.mkdtemp(prefix='kvmx-cfg-', dir='/dev/shm')
    shmfile = os.path.join(shmdir, 'pmem.img')
    with open(shmfile, 'wb') as f:
        f.truncate(64 << 20)

    expect_error('on with a RAM backend', rambe,
                 'nvdimm,memdev=m,flush-hint=on', ['flush-hint', "'m'"])
    expect_error('on with a private file mapping', privbe,
                 'nvdimm,memdev=m,flush-hint=on', ['flush-hint', 'share=off'])
    expect_error('on with a read-only backend', robe,
                 'nvdimm,memdev=m,unarmed=on,flush-hint=on',
                 ['flush-hint', 'read-only'])
    expect_error('hint count 0', filebe,
                 'nvdimm,memdev=m,flush-hint=on,flush-hint-count=0',
                 ['flush-hint-count'])
    expect_error('hint count 65', filebe,
                 'nvdimm,memdev=m,flush-hint=on,flush-hint-count=65',
                 ['flush-hint-count'])
    expect_error('bad flush-hint value', filebe,
                 'nvdimm,memdev=m,flush-hint=sometimes', ['flush-hint'])
    expect_error('no nvdimm=on on the machine', filebe,
                 'nvdimm,memdev=m,flush-hint=on', ['flush-hint'],
                 machine='q35')

    expect_error('maxmem without room for the flush hint slot', filebe,
                 'nvdimm,memdev=m,flush-hint=on', ['flush-hint', 'maxmem'],
                 mem='256M,slots=2,maxmem=320M')

    expect_mode('on, shared file', filebe, 'nvdimm,id=nv0,memdev=m,flush-hint=on',
                'trap', 'fdatasync')
    expect_mode('auto, shared file', filebe,
                'nvdimm,id=nv0,memdev=m,flush-hint=auto', 'trap', 'fdatasync')
    # Host memory only: nothing can make it durable, so nothing to trap
    # under 'auto', and 'on' says so (it used to claim fdatasync).
    expect_mode('auto, memfd', memfd, 'nvdimm,id=nv0,memdev=m,flush-hint=auto',
                'no-trap', 'none')
    expect_mode('on, memfd', memfd, 'nvdimm,id=nv0,memdev=m,flush-hint=on',
                'trap', 'none', warning='cannot be made durable')
    dirbe = (f'memory-backend-file,id=m,share=on,mem-path={tmp},size=64M')
    expect_mode('on, directory mem-path (an unlinked file)', dirbe,
                'nvdimm,id=nv0,memdev=m,flush-hint=on', 'trap', 'none',
                warning='unlinked')
    expect_mode('auto, directory mem-path', dirbe,
                'nvdimm,id=nv0,memdev=m,flush-hint=auto', 'no-trap', 'none')
    shm = f'memory-backend-file,id=m,share=on,mem-path={shmfile},size=64M'
    expect_mode('auto, file on tmpfs', shm,
                'nvdimm,id=nv0,memdev=m,flush-hint=auto', 'no-trap', 'none')
    expect_mode('error policy defaults to stop', filebe,
                'nvdimm,id=nv0,memdev=m,flush-hint=on', 'trap', 'fdatasync',
                fields={'error-policy': 'stop', 'healthy': True,
                        'failed-flushes': 0})
    expect_mode('error policy report', filebe,
                'nvdimm,id=nv0,memdev=m,flush-hint=on,flush-hint-error=report',
                'trap', 'fdatasync', fields={'error-policy': 'report'})
    # Backends the host cannot flush are refused at start (they used to
    # start, and then every guest flush failed).
    zero = 'memory-backend-file,id=m,share=on,mem-path=/dev/zero,size=64M'
    # (QEMU's file backend itself prints "ftruncate: Invalid argument")
    expect_error('on with /dev/zero', zero, 'nvdimm,memdev=m,flush-hint=on',
                 ['flush-hint', "'m'", 'not device DAX'], backend_noise=1)
    expect_error('auto with /dev/zero', zero,
                 'nvdimm,memdev=m,flush-hint=auto',
                 ['flush-hint', "'m'", 'not device DAX'], backend_noise=1)
    expect_error('bad flush-hint-error value', filebe,
                 'nvdimm,memdev=m,flush-hint=on,flush-hint-error=ignore',
                 ['flush-hint-error'])
    expect_error('flush hints with nvdimm-persistence=cpu', filebe,
                 'nvdimm,memdev=m,flush-hint=on',
                 ['flush-hint', 'nvdimm-persistence=cpu'],
                 machine='q35,nvdimm=on,nvdimm-persistence=cpu')
    expect_mode('auto, RAM (nothing to flush)', rambe,
                'nvdimm,id=nv0,memdev=m,flush-hint=auto', 'no-trap', 'none')
    expect_mode('default is off', filebe, 'nvdimm,id=nv0,memdev=m', 'off',
                'none')

    expect_aligned_next(img)
    shutil.rmtree(shmdir, ignore_errors=True)

    if failures:
        print(f"FAILED: {', '.join(failures)}")
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
