#!/usr/bin/python3
"""Flush hints seen by a real Linux 6.12 guest (TCG) with its own nfit,
libnvdimm and nd_pmem drivers.

  test_flush_hint_guest.py on    flush-hint=on, file backend:
      region0/deep_flush reads 1; the NFIT type-6 structure is sound and
      its page is clear of RAM, PMEM and PCI windows; a synced write to
      /dev/pmem0 and an fsync on a DAX-mounted ext4 file each raise the host
      flush count, and when the guest's sync returns the backing file has
      no dirty page-cache pages; after SIGKILL of QEMU a new VM on the same
      file finds the fsynced file intact.
  test_flush_hint_guest.py off   flush-hint=off behaves as stock QEMU: same
      NFIT bytes, deep_flush reads 0, synced data still dirty on the host.
"""
import hashlib
import json
import os
import re
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'lib'))
import kvmxtest  # noqa: E402
import kvmxvm  # noqa: E402
import pagecache  # noqa: E402

SIZE = 256 << 20
check = kvmxtest.Checks()


def vm_args(img, flush_hint):
    dev = 'nvdimm,id=nv0,memdev=mem1'
    if flush_hint is not None:
        dev += f',flush-hint={flush_hint}'
    return kvmxtest.nvdimm_args(img, SIZE, dev)


# Prints what the host checks, then waits for the host's "go" (a line on
# the console) before each step, so the host can look at the backing file
# at the moment the guest's sync returned.
GUEST_INFO = r'''
echo "DEEP_FLUSH=$(cat /sys/bus/nd/devices/region0/deep_flush)"
echo "NFIT=$(/opt/kvmx/kvmx-nfit --check 2>/tmp/nfit.err)"
echo "NFITCHECK=$? $(cat /tmp/nfit.err)"
echo "NFITMD5=$(md5sum /sys/firmware/acpi/tables/NFIT | cut -d' ' -f1)"
echo IOMEM-BEGIN; cat /proc/iomem; echo IOMEM-END
'''

GUEST_STEPS = r'''
dd if=/dev/urandom of=/tmp/blk bs=1M count=1 2>/dev/null
echo STEP1-READY; read ack
dd if=/tmp/blk of=/dev/pmem0 bs=1M count=1 conv=fsync 2>/dev/null
echo "STEP1-SYNCED $(md5sum /tmp/blk | cut -d' ' -f1)"
read ack
. /usr/lib/kvmx/pmem-fsdax.sh
dev=$(pmem_fsdax)
# Inode tables zeroed now: else ext4lazyinit writes them to the NVDIMM in
# the background, seconds after the mount, while the host looks at the file.
mkfs.ext4 -q -F -b 4096 -E lazy_itable_init=0 "$dev" &&
  mount -t ext4 -o dax "$dev" /mnt
grep -q 'dax' /proc/mounts && echo "DAX-MOUNTED $dev"
sync
dd if=/dev/urandom of=/tmp/f bs=64k count=4 2>/dev/null
echo STEP2-READY; read ack
dd if=/tmp/f of=/mnt/f bs=64k conv=fsync 2>/dev/null
echo "STEP2-SYNCED $(md5sum /mnt/f | cut -d' ' -f1)"
read ack
'''


def flushes(vm):
    info = vm.qmp.cmd('query-nvdimm-flush')[0]
    return info['guest-flushes'], info['host-flushes']


def iomem_ranges(text):
    """Top-level and nested (start, end, name) of the guest's /proc/iomem."""
    body = text.split('IOMEM-BEGIN', 1)[1].split('IOMEM-END', 1)[0]
    out = []
    for line in body.splitlines():
        m = re.match(r'\s*([0-9a-f]+)-([0-9a-f]+) : (.*)', line)
        if m:
            out.append((int(m[1], 16), int(m[2], 16), m[3].strip()))
    return out


def check_tables(vm, text):
    nfit = json.loads(re.search(r'NFIT=(\{.*\})', text)[1])
    check(re.search(r'NFITCHECK=0 ', text) is not None,
          'kvmx-nfit --check accepts the guest NFIT')
    q = vm.qmp.cmd('query-nvdimm-flush')[0]
    check(q['mode'] == 'trap' and q['host-flush'] == 'fdatasync',
          f"query-nvdimm-flush: mode trap, host flush fdatasync ({q})")
    fh = nfit['flush_hint']
    if not check(len(fh) == 1, 'NFIT has one flush hint structure'):
        return
    check(fh[0]['handle'] == nfit['memdev'][0]['handle'],
          'flush hint handle matches the memdev handle')
    check(fh[0]['addresses'] == q['addresses'],
          f"NFIT hint addresses {fh[0]['addresses']} == QMP {q['addresses']}")
    spa = nfit['spa'][0]
    check(spa['length'] == SIZE, 'SPA range is the whole PMEM size')
    fha = fh[0]['addresses'][0]
    check(fha >= spa['base'] + spa['length'],
          'flush hint page lies above the PMEM range')
    for start, end, name in iomem_ranges(text):
        if name in ('System RAM', 'Reserved') or name.startswith('PCI Bus') \
                or name == 'Persistent Memory':
            check(not (start <= fha <= end),
                  f'FHA {fha:#x} is outside {name} {start:#x}-{end:#x}')


def run_on(work, img):
    qemu = kvmxvm.patched_qemu()
    with kvmxvm.start_guest(qemu, GUEST_INFO + GUEST_STEPS,
                            vm_args(img, 'on'), work, 'on') as vm:
        vm.wait_console(r'IOMEM-END', 300)
        text = vm.console_text()
        check('DEEP_FLUSH=1' in text, 'guest region0/deep_flush reads 1')
        check_tables(vm, text)

        vm.wait_console(r'STEP1-READY', 60)
        g0, h0 = flushes(vm)
        vm.send_serial(b'go\n')
        md5 = vm.wait_console(r'STEP1-SYNCED ([0-9a-f]{32})\n', 120)[1]
        st = pagecache.cachestat(img)
        g1, h1 = flushes(vm)
        check(g1 > g0 and h1 > h0,
              f'synced write to /dev/pmem0 raised guest flushes {g0}->{g1}, '
              f'host flushes {h0}->{h1}')
        check(st['dirty'] == 0 and st['writeback'] == 0,
              f'backing file clean when the guest sync returned ({st})')
        with open(img, 'rb') as f:
            check(hashlib.md5(f.read(1 << 20)).hexdigest() == md5,
                  'backing file holds what the guest wrote')

        vm.send_serial(b'go\n')
        vm.wait_console(r'STEP2-READY', 120)
        check('DAX-MOUNTED' in vm.console_text(), 'ext4 mounted with dax')
        g2, h2 = flushes(vm)
        vm.send_serial(b'go\n')
        md5f = vm.wait_console(r'STEP2-SYNCED ([0-9a-f]{32})\n', 120)[1]
        st = pagecache.cachestat(img)
        g3, h3 = flushes(vm)
        check(g3 > g2 and h3 > h2,
              f'fsync on DAX ext4 raised guest flushes {g2}->{g3}, '
              f'host flushes {h2}->{h3}')
        check(st['dirty'] == 0 and st['writeback'] == 0,
              f'backing file clean when fsync returned ({st})')
        info = vm.qmp.cmd('query-nvdimm-flush')[0]
        check(info['host-flushes'] <= info['guest-flushes'] and
              info['host-flush-errors'] == 0 and
              0 < info['latency-min-ns'] <= info['latency-avg-ns']
              <= info['latency-max-ns'],
              f'flush statistics are consistent ({info})')
        vm.kill()   # a crash: no shutdown, no flush at exit
        vm.wait(30)

    # A new VM on the same file sees the fsynced file.
    script = r'''
. /usr/lib/kvmx/pmem-fsdax.sh
dev=$(pmem_fsdax)
mount -t ext4 -o dax "$dev" /mnt && echo "AFTER-CRASH $(md5sum /mnt/f | cut -d' ' -f1)"
'''
    rc, text = kvmxvm.run_guest_script(qemu, script, vm_args(img, 'on'), work,
                                       'after')
    m = re.search(r'AFTER-CRASH ([0-9a-f]{32})', text)
    check(rc == 0 and m and m[1] == md5f,
          'file fsynced before SIGKILL is intact in a new VM')


def run_off(work, img):
    results = {}
    for name, qemu, fh in (('patched-off', kvmxvm.patched_qemu(), 'off'),
                           ('stock', kvmxvm.stock_qemu(), None)):
        with open(img, 'r+b') as f:
            f.truncate(0)
            f.truncate(SIZE)
        with kvmxvm.start_guest(qemu, GUEST_INFO + GUEST_STEPS,
                                vm_args(img, fh), work, name) as vm:
            vm.wait_console(r'STEP1-READY', 300)
            vm.send_serial(b'go\n')
            vm.wait_console(r'STEP1-SYNCED ([0-9a-f]{32})\n', 120)
            st = pagecache.cachestat(img)
            text = vm.console_text()
            results[name] = {
                'deep_flush': re.search(r'DEEP_FLUSH=(\S*)', text)[1],
                'nfit_md5': re.search(r'NFITMD5=(\S*)', text)[1],
                'hints': json.loads(re.search(r'NFIT=(\{.*\})',
                                              text)[1])['flush_hint'],
                'dirty': st['dirty'],
                'iomem': [r for r in iomem_ranges(text)
                          if r[2] in ('Persistent Memory', 'ndbus0')],
            }
            if name == 'patched-off':
                q = vm.qmp.cmd('query-nvdimm-flush')[0]
                check(q['mode'] == 'off' and q['addresses'] == [],
                      f'query-nvdimm-flush reports mode off ({q})')
            vm.kill()
    p, s = results['patched-off'], results['stock']
    print(f'patched-off: {p}\nstock:       {s}')
    check(p['deep_flush'] == '0' and s['deep_flush'] == '0',
          'deep_flush reads 0 with flush-hint=off and with stock QEMU')
    check(p['hints'] == [] and s['hints'] == [], 'no type-6 structure')
    check(p['nfit_md5'] == s['nfit_md5'],
          'NFIT bytes identical to stock QEMU')
    check(p['iomem'] == s['iomem'], 'guest iomem layout identical to stock')
    check(p['dirty'] > 0 and s['dirty'] > 0,
          'synced data still dirty in the host page cache (the gap)')


def main():
    mode = sys.argv[1] if len(sys.argv) > 1 else 'on'
    kvmxtest.require_guest_image()
    if not pagecache.available():
        kvmxvm.skip('host kernel has no cachestat(2)')
    work = kvmxtest.workdir(f'flush-{mode}-')
    img = kvmxtest.backing_file(work, 'pmem.img', SIZE)
    {'on': run_on, 'off': run_off}[mode](work, img)
    return check.finish(work)


if __name__ == '__main__':
    sys.exit(main())
