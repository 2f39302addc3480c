#!/usr/bin/python3
"""A host flush that fails is never acknowledged to the guest as done.

The NVDIMM's backing file lives on a host disk that the test fills up
(tests/lib/faultystore.py: ext4 on a loop device whose store is a small
tmpfs), so writeback fails with ENOSPC, as on a host whose disk is full.
A Linux 6.12 guest (TCG) writes 8 MiB to /dev/pmem0 with conv=fsync.

  test_flush_hint_error.py stop     flush-hint-error=stop (the default):
      the guest's dd does not return; the VM stops (io-error) with
      NVDIMM_FLUSH_ERROR naming the device and ENOSPC; query-nvdimm-flush
      shows the error and the failed flush; migration is refused; 'cont'
      fails and the VM stays stopped while the disk is still full; once
      there is room, 'cont' redoes the flush, the guest's dd returns, and
      what it wrote is in the store (the backing file has no dirty page
      and reads back right after its cache is dropped).  Linux reports a
      writeback error once only, so without the redo the data would be
      lost while every later fdatasync() succeeds.
  test_flush_hint_error.py report   flush-hint-error=report: the guest's
      dd returns, NVDIMM_FLUSH_ERROR says 'report', query-nvdimm-flush
      and the guest's `ndctl list -DH` show the NVDIMM unhealthy (fatal).
"""
import hashlib
import os
import re
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'lib'))
import faultystore  # noqa: E402
import kvmxtest  # noqa: E402
import kvmxvm  # noqa: E402
import pagecache  # noqa: E402

SIZE = 64 << 20
DATA = 8 << 20
ENOSPC = 28
check = kvmxtest.Checks()

GUEST = r'''
dd if=/dev/urandom of=/tmp/blk bs=1M count=8 2>/dev/null
echo "PATTERN $(md5sum /tmp/blk | cut -d' ' -f1)"
echo "HEALTH0 $(ndctl list -DH 2>&1 | tr -d ' \n')"
echo STEP-READY; read ack
dd if=/tmp/blk of=/dev/pmem0 bs=1M count=8 conv=fsync 2>/dev/null
echo "DD-RETURNED $?"
echo "HEALTH1 $(ndctl list -DH 2>&1 | tr -d ' \n')"
read ack
'''


def info(vm):
    return vm.qmp.cmd('query-nvdimm-flush')[0]


def run_stop(vm, fs, work):
    vm.wait_console(r'STEP-READY', 300)
    fs.fill()
    vm.send_serial(b'go\n')
    ev = vm.qmp.wait_event('NVDIMM_FLUSH_ERROR', 180)['data']
    check(ev['id'] == 'nv0' and ev['errno'] == ENOSPC and
          ev['action'] == 'stop',
          f'NVDIMM_FLUSH_ERROR names nv0, ENOSPC, action stop ({ev})')
    vm.qmp.wait_event('STOP', 60)
    st = vm.qmp.cmd('query-status')
    check(st['status'] == 'io-error' and not st['running'],
          f'the VM stopped with io-error ({st})')
    q = info(vm)
    check(q.get('error') and q['failed-flushes'] >= 1 and
          q['host-flush-errors'] >= 1 and q['error-policy'] == 'stop',
          f'query-nvdimm-flush shows the error and the failed flush ({q})')
    time.sleep(3)
    check('DD-RETURNED' not in vm.console_text(),
          "the guest's synced write did not return")

    try:
        vm.qmp.cmd('migrate', uri=f'exec:cat >{work}/mig.out')
        mig_err = None
    except kvmxvm.QmpError as e:
        mig_err = str(e)
    check(mig_err is not None and 'nv0' in mig_err,
          f'migration refused while the flush error stands ({mig_err})')

    try:
        vm.qmp.cmd('cont')
        cont_err = None
    except kvmxvm.QmpError as e:
        cont_err = str(e)
    st = vm.qmp.cmd('query-status')
    check(cont_err is not None and 'nv0' in cont_err and
          st['status'] == 'io-error',
          f"'cont' fails while the disk is full, VM stays stopped "
          f"({cont_err}; {st['status']})")
    time.sleep(1)
    check('DD-RETURNED' not in vm.console_text(),
          "the guest's synced write still did not return")

    fs.free()
    vm.qmp.cmd('cont')
    m = vm.wait_console(r'DD-RETURNED (\d+)\r?\n', 180)
    dirty = pagecache.cachestat(fs.path)
    check(m[1] == '0', f'after cont the guest dd returned success (rc {m[1]})')
    check(dirty['dirty'] == 0 and dirty['writeback'] == 0,
          f'backing file clean when the guest sync returned ({dirty})')
    q = info(vm)
    check('error' not in q and vm.qmp.cmd('query-status')['running'],
          f'error cleared, VM running ({q})')
    md5 = re.search(r'PATTERN ([0-9a-f]{32})', vm.console_text())[1]
    # A crash now: QEMU's mapping goes, the page cache is dropped, and what
    # is read back comes from the store.
    vm.kill()
    vm.wait(30)
    fs.drop_cache()
    left = pagecache.cachestat(fs.path)['cache']
    with open(fs.path, 'rb') as f:
        got = hashlib.md5(f.read(DATA)).hexdigest()
    check(got == md5, 'after SIGKILL and dropping the cache '
          f'({left} pages left) the store holds what the guest wrote '
          f'({got} vs {md5})')


def run_report(vm, fs):
    vm.wait_console(r'STEP-READY', 300)
    text = vm.console_text()
    check('"health_state":"ok"' in text.split('HEALTH0', 1)[1].split('\n')[0],
          'before: ndctl list -DH shows health_state ok')
    fs.fill()
    vm.send_serial(b'go\n')
    ev = vm.qmp.wait_event('NVDIMM_FLUSH_ERROR', 180)['data']
    check(ev['id'] == 'nv0' and ev['errno'] == ENOSPC and
          ev['action'] == 'report',
          f'NVDIMM_FLUSH_ERROR names nv0, ENOSPC, action report ({ev})')
    vm.wait_console(r'HEALTH1 .*\n', 180)
    text = vm.console_text()
    check(vm.qmp.cmd('query-status')['running'], 'the VM kept running')
    q = info(vm)
    check(q['healthy'] is False and q['host-flush-errors'] >= 1,
          f'query-nvdimm-flush shows it unhealthy ({q})')
    h1 = text.split('HEALTH1', 1)[1].split('\n')[0]
    check('"health_state":"fatal"' in h1,
          f'guest: ndctl list -DH shows health_state fatal ({h1.strip()})')
    fs.free()


def main():
    mode = sys.argv[1] if len(sys.argv) > 1 else 'stop'
    why = faultystore.unavailable()
    if why:
        kvmxvm.skip(why)
    kvmxtest.require_guest_image()
    qemu = kvmxvm.patched_qemu()
    work = kvmxtest.workdir(f'flusherr-{mode}-')
    with faultystore.FaultyStore(work, SIZE) as fs:
        dev = f'nvdimm,id=nv0,memdev=mem1,flush-hint=on,flush-hint-error={mode}'
        args = kvmxtest.nvdimm_args(fs.path, SIZE, dev)
        with kvmxvm.start_guest(qemu, GUEST, args, work, mode) as vm:
            if mode == 'stop':
                run_stop(vm, fs, work)
            else:
                run_report(vm, fs)
                vm.kill()
                vm.wait(30)
    return check.finish(work)


if __name__ == '__main__':
    sys.exit(main())
