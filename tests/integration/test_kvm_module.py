#!/usr/bin/python3
"""kvmx.ko, the in-kernel flush hint path, tested inside a VM that runs KVM.

The build host cannot load kernel modules, so the test boots the nested
guest image (scripts/mkguest --nested: Debian's 6.12 kernel, kvm/kvm_amd,
kvmx.ko and kvmx-modtest in /opt/kvmx) under TCG with `-cpu max`, which
shows SVM to that guest (L1).  L1 loads kvm and kvm_amd (kernel command
line kvmx.modules=kvm,kvm_amd) and then kvmx.ko, and runs kvmx-modtest,
which makes its own small VMs (L2) through the raw KVM API:

  * the flush hint page attached through /dev/kvmx: M guest writes, no
    exit to user space, M guest flushes, the backing file (ext4 on L1's
    /dev/pmem0, not DAX) clean when each write returns (cachestat);
  * the same page as plain RAM: no exit, no flush; as a read-only memslot
    (QEMU's way today): M KVM_EXIT_MMIO exits, fdatasync in user space;
  * FDATASYNC|DEEP with L1's region0/deep_flush: each host flush reaches
    L1's NVDIMM flush hint, which the outer QEMU (flush-hint=on) counts;
  * the deep flush file must be a region's deep_flush (a full pipe, a
    regular file refused); DEEP alone (device DAX) flushes; FDATASYNC of a
    character device refused;
  * detach, memslot deletion/move, per-file limits, concurrent
    attach/detach while vCPUs flush, several vCPUs (group commit), every
    malformed argument with its error code;
  * stall: a host flush that takes seconds (null_blk at 1 MiB/s) does not
    hold up memslot updates (it runs outside kvm->srcu), yet the guest
    runs nothing after its write before the flush is done;
  * flusherr: writes to the backing fail (null_blk badblocks): with
    KVMX_ATTACH_ERROR_NOTIFY KVM_RUN returns EINTR right after the flush
    hint store (RIP, RCX, the next store not done), the eventfd and the
    signal arrive, later flushes fail at once, CLEAR_ERROR flushes again;
    without it the guest goes on and STATS shows the error;
  * abi: struct sizes as copy_struct_from_user(), features, the new
    fields' errors; perms: the sysfs counters are root's only;
  * rmmod refused while /dev/kvmx is open, allowed after close; a process
    killed with SIGKILL while flushing leaves nothing behind;
  * dmesg: no WARNING, BUG, Oops.

It prints the kernel-vs-user-path measurement as one BENCH line (exits per
flush, time per flush, their ratio); no time bound is asserted.

Exits 77 (skip) if L1 has no SVM or /dev/kvm, or kvmx.ko was not built.
"""
import glob
import hashlib
import lzma
import os
import re
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'lib'))
import kvmxvm  # noqa: E402

M = int(os.environ.get('KVMX_MODTEST_M', '50'))
# KVMX_MODTEST_ONLY="stall flusherr": run only these kvmx-modtest tests
# (one run, the other runs and their checks left out): for development.
ONLY = os.environ.get('KVMX_MODTEST_ONLY', '').split()
PMEM_SIZE = 256 << 20
DAX_SIZE = 64 << 20     # the second NVDIMM, device DAX in L1
failures = []
ALL_TESTS = ['api', 'errors', 'ram', 'kernel', 'user', 'deep', 'detach',
             'memslot', 'limits', 'concurrent', 'multivcpu', 'vmclose',
             'stall', 'flusherr', 'abi', 'perms', 'devdax', 'rmmod', 'sigkill']
# Kernel modules L1 needs beyond the nested image's (scripts/mkguest
# MODULES), in load order: null_blk gives the block devices whose writes
# are slow (mbps) or fail (badblocks).  Taken from the same kernel package
# mkguest unpacked and handed to L1 through fw_cfg, unless L1 already has
# them (then modprobe finds them).
EXTRA_MODULES = [('configfs', 'fs/configfs/configfs.ko'),
                 ('null_blk', 'drivers/block/null_blk/null_blk.ko')]


def check(cond, what):
    print(f"{'ok  ' if cond else 'FAIL'} {what}", flush=True)
    if not cond:
        failures.append(what)


# Runs in L1.  Prints L1-* lines for the host; kvmx-modtest prints KVMX-*.
L1_SCRIPT = r'''
echo "L1-KERNEL $(uname -r) cpus $(grep -c ^processor /proc/cpuinfo)"
echo "L1-SHA kvmx.ko $(sha256sum /opt/kvmx/kvmx.ko 2>/dev/null | cut -d' ' -f1)"
echo "L1-SHA kvmx-modtest $(sha256sum /opt/kvmx/kvmx-modtest 2>/dev/null | cut -d' ' -f1)"
grep -qw svm /proc/cpuinfo || { echo "L1-SKIP no svm flag in L1's /proc/cpuinfo"; exit 0; }
[ -c /dev/kvm ] || { echo "L1-SKIP no /dev/kvm in L1 (modules: $(lsmod | grep -o '^kvm[a-z_]*' | tr '\n' ' '))"; exit 0; }
[ -f /opt/kvmx/kvmx.ko ] || { echo "L1-SKIP /opt/kvmx/kvmx.ko is not in the nested image"; exit 0; }
[ -x /opt/kvmx/kvmx-modtest ] || { echo "L1-SKIP /opt/kvmx/kvmx-modtest is not in the nested image"; exit 0; }
insmod /opt/kvmx/kvmx.ko || { echo "L1-INSMOD-FAILED"; dmesg | tail -n 20; exit 1; }
echo "L1-INSMOD-OK $(cat /sys/class/misc/kvmx/api_version)"
[ -c /dev/kvmx ] || { echo "L1-NO-DEV"; exit 1; }

# The backing files live on ext4 (page cache, no DAX) on L1's NVDIMM, so
# fdatasync has real work; background writeback is held off so only our
# flushes clean the pages.
mkfs.ext4 -q -F -b 4096 /dev/pmem0 && mount -t ext4 /dev/pmem0 /mnt || { echo "L1-NO-FS"; exit 3; }
echo 0 > /proc/sys/vm/dirty_writeback_centisecs
echo 360000 > /proc/sys/vm/dirty_expire_centisecs
df=/sys/bus/nd/devices/region0/deep_flush
echo "L1-DEEP-FLUSH $(cat $df)"

# Two memory-backed null_blk devices: "slow" writes 1 MiB/s (a host flush
# that takes seconds), "err" fails I/O to the sectors kvmx-modtest lists
# in its badblocks file (a host flush that fails, and later works again).
for m in configfs null_blk; do
  if ! modprobe $m 2>/dev/null; then
    f=/sys/firmware/qemu_fw_cfg/by_name/opt/kvmx/$m.ko/raw
    [ -r $f ] && cat $f > /tmp/$m.ko && insmod /tmp/$m.ko $([ $m = null_blk ] && echo nr_devices=0)
  fi
done
grep -q configfs /proc/mounts || mount -t configfs configfs /sys/kernel/config
nb=/sys/kernel/config/nullb
# null_blk's mbps lets through at most MBPS/50 MiB per 20 ms tick and never
# more than that at once: a larger request would wait for ever, so requests
# are capped at 4 KiB (max_sectors 8).
mknb() {  # mknb NAME MBPS -> prints /dev/NAME (null_blk names it after the dir)
  mkdir $nb/$1 && echo 1 > $nb/$1/memory_backed && echo 16 > $nb/$1/size &&
  echo 4096 > $nb/$1/blocksize && echo 8 > $nb/$1/max_sectors &&
  echo $2 > $nb/$1/mbps && echo 1 > $nb/$1/power &&
  i=0 && while [ ! -b /dev/$1 ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done &&
  [ -b /dev/$1 ] && echo /dev/$1
}
if [ -d $nb ] && slow=$(mknb kvmxslow 1) && errdev=$(mknb kvmxerr 0); then
  echo "L1-NULLBLK $slow $errdev"
  NB="-S $slow -E $nb/kvmxerr"
else
  echo "L1-NO-NULLBLK (modules: $(lsmod | cut -d' ' -f1 | tr '\n' ' '))"
  NB=
fi
# The second NVDIMM (flush hints too) as device DAX, as ndctl would make it.
. /usr/lib/kvmx/pmem-fsdax.sh
r0=$(readlink -f /sys/block/pmem0/device | grep -o 'region[0-9]*' | tail -n1)
DAX=
for r in /sys/bus/nd/devices/region*; do
  [ "$(basename $r)" = "$r0" ] && continue
  if d=$(pmem_devdax $(basename $r)) && [ -c "$d" ]; then
    echo "L1-DEVDAX $d $(basename $r) deep_flush=$(cat $r/deep_flush)"
    DAX="-X $d,$r/deep_flush"
  fi
done
[ -n "$DAX" ] || echo "L1-NO-DEVDAX"
echo "L1-READY"; read ack

if [ -n "__ONLY__" ]; then
  kvmx-modtest -m __M__ -d /mnt -D $df $NB $DAX -k /opt/kvmx/kvmx.ko __ONLY__
  echo "L1-MODTEST-RC $?"
  dmesg > /tmp/dmesg.txt
  grep -E 'WARNING|BUG|Oops|Call Trace|general protection|RIP: |kvmx:' /tmp/dmesg.txt | sed 's/^/L1-DMESG /'
  echo "L1-DONE"; read ack
  exit 0
fi
kvmx-modtest -m __M__ -d /mnt -D $df $NB $DAX all
echo "L1-MODTEST-RC $?"
kvmx-modtest -m __M__ -d /mnt -k /opt/kvmx/kvmx.ko rmmod sigkill
echo "L1-MODTEST2-RC $?"
# The two paths once more with a backing file on tmpfs, whose fdatasync
# does nothing: what is left is the cost of the path itself.
kvmx-modtest -m 200 -d /tmp kernel user
echo "L1-MODTEST3-RC $?"
# And with the tools an operator uses.
rmmod kvmx; echo "L1-RMMOD-RC $?"
insmod /opt/kvmx/kvmx.ko; echo "L1-INSMOD2-RC $?"
rmmod kvmx; echo "L1-RMMOD2-RC $?"
dmesg > /tmp/dmesg.txt
grep -E 'WARNING|BUG|Oops|Call Trace|general protection|RIP: |kvmx:' /tmp/dmesg.txt | sed 's/^/L1-DMESG /'
echo "L1-DMESG-LINES $(wc -l < /tmp/dmesg.txt)"
echo "L1-DONE"; read ack
'''

BAD_DMESG = re.compile(r'WARNING|BUG|Oops|Call Trace|general protection|RIP: ')


def sha256(path):
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    return h.hexdigest()


def main():
    build = os.environ.get('KVMX_BUILD_DIR') or os.path.join(kvmxvm.REPO_ROOT, 'build')
    ko = os.path.join(build, 'kvm-module', 'kvmx.ko')
    modtest = os.path.join(build, 'tests', 'kvm-module', 'kvmx-modtest')
    nested = os.path.join(kvmxvm.REPO_ROOT, 'build', 'guest-nested')
    if not os.path.isfile(ko):
        kvmxvm.skip(f'{ko} not built (no kernel headers? run scripts/setup, '
                    f'then scripts/build)')
    if not os.path.isfile(modtest):
        kvmxvm.skip(f'{modtest} not built (run scripts/build)')
    if not os.path.isfile(os.path.join(nested, 'initramfs.cpio.gz')):
        kvmxvm.skip(f'{nested} missing (run scripts/mkguest --nested)')
    os.environ['KVMX_GUEST_DIR'] = nested
    qemu = kvmxvm.patched_qemu()

    work = tempfile.mkdtemp(prefix='kvm-module-', dir=kvmxvm.scratch_dir())
    img = os.path.join(work, 'outer-pmem.img')
    with open(img, 'wb') as f:
        f.truncate(PMEM_SIZE)
    img2 = os.path.join(work, 'outer-dax.img')
    with open(img2, 'wb') as f:
        f.truncate(DAX_SIZE)
    args = ['-smp', '2',
            '-machine', 'q35,nvdimm=on', '-m', '1536M,slots=2,maxmem=4G',
            '-object', f'memory-backend-file,id=mem1,share=on,mem-path={img},'
                       f'size={PMEM_SIZE}',
            '-device', 'nvdimm,id=nv0,memdev=mem1,flush-hint=on',
            '-object', f'memory-backend-file,id=mem2,share=on,mem-path={img2},'
                       f'size={DAX_SIZE}',
            '-device', 'nvdimm,id=nv1,memdev=mem2,flush-hint=on']
    script = L1_SCRIPT.replace('__M__', str(M)).replace('__ONLY__', ' '.join(ONLY))
    args += extra_modules(nested, work)
    append = 'kvmx.modules=kvm,kvm_amd kvmx.timeout=1700'
    with kvmxvm.start_guest(qemu, script, args, work, 'l1', mem='1536M',
                            append_extra=append) as vm:
        m = vm.wait_console(r'(L1-READY|L1-SKIP [^\n]*|KVMX-GUEST-EXIT \d+)\n', 900)
        if m.group(1).startswith('L1-SKIP'):
            print(vm.console_text()[-3000:])
            kvmxvm.skip(m.group(1)[len('L1-SKIP '):] + ' (nested L1 guest)')
        if not m.group(1).startswith('L1-READY'):
            print(vm.console_text()[-5000:])
            check(False, 'L1 got ready (insmod, mkfs)')
            return finish(work)
        outer0 = outer_flushes(vm)
        vm.send_serial(b'go\n')
        try:
            vm.wait_console(r'L1-DONE\n', 1500)
        except (TimeoutError, kvmxvm.QemuExited) as e:
            # A hung or crashed L1 (a deadlock in the module, an oops):
            # the console has the kernel's report.
            print(e)
            check(False, 'L1 ran kvmx-modtest to the end (see the console above)')
            return finish(work)
        outer1 = outer_flushes(vm)
        vm.send_serial(b'go\n')
        rc = kvmxvm.wait_guest_exit(vm, 300)
        text = vm.console_text()

    with open(os.path.join(work, 'l1.log'), 'w') as f:
        f.write(text)
    for line in text.splitlines():
        if line.startswith(('KVMX-', 'L1-')):
            print(line)

    check(rc == 0, f'L1 script finished ({rc})')
    shas = dict(re.findall(r'L1-SHA (\S+) ([0-9a-f]*)', text))
    check(shas.get('kvmx.ko') == sha256(ko) and
          shas.get('kvmx-modtest') == sha256(modtest),
          'the nested image holds the kvmx.ko and kvmx-modtest just built '
          '(else run scripts/mkguest --nested)')
    check('L1-INSMOD-OK 1' in text, 'insmod kvmx.ko; API version 1')

    fails = re.findall(r'KVMX-CHECK FAIL (.*)', text)
    for f in fails:
        check(False, f'kvmx-modtest: {f}')
    n_ok = len(re.findall(r'KVMX-CHECK ok ', text))
    ends = dict(re.findall(r'KVMX-TEST-END (\S+) (\S+)', text))
    for line in re.findall(r'KVMX-STALL (.*)', text):
        print(f'STALL {line}', flush=True)
    for line in re.findall(r'KVMX-FLUSHERR (.*)', text):
        print(f'FLUSHERR {line}', flush=True)
    if ONLY:
        for t in ONLY:
            check(ends.get(t) == 'PASS', f'kvmx-modtest {t}: {ends.get(t, "did not run")}')
        mm = re.search(r'L1-MODTEST-RC (\d+)', text)
        check(mm is not None and mm.group(1) == '0', 'L1-MODTEST-RC')
        bad = [ln for ln in re.findall(r'L1-DMESG (.*)', text) if BAD_DMESG.search(ln)]
        check(not bad, 'dmesg has no WARNING/BUG/Oops' + (': ' + ' | '.join(bad[:5]) if bad else ''))
        return finish(work)
    check('L1-NULLBLK' in text, 'L1 made its null_blk devices (slow, failing)')
    check(re.search(r'KVMX-STALL ', text) is not None, 'the slow-flush test ran')
    check(re.search(r'KVMX-FLUSHERR ', text) is not None, 'the failing-flush test ran')
    check(re.search(r'KVMX-DEEP-ONLY host_flushes=3', text) is not None,
          'DEEP alone (device DAX) flushed through the region')
    for t in ALL_TESTS:
        check(ends.get(t) == 'PASS', f'kvmx-modtest {t}: {ends.get(t, "did not run")}')
    results = re.findall(r'KVMX-MODTEST-RESULT passed=(\d+) failed=(\d+)', text)
    check(len(results) == 3 and all(int(f) == 0 for _, f in results),
          f'kvmx-modtest runs: {results} ({n_ok} checks ok)')
    for key in ('L1-MODTEST-RC', 'L1-MODTEST2-RC', 'L1-MODTEST3-RC', 'L1-RMMOD-RC',
                'L1-INSMOD2-RC', 'L1-RMMOD2-RC'):
        mm = re.search(key + r' (\d+)', text)
        check(mm is not None and mm.group(1) == '0',
              f'{key} {mm.group(1) if mm else "missing"}')

    bad = [ln for ln in re.findall(r'L1-DMESG (.*)', text) if BAD_DMESG.search(ln)]
    check(not bad, 'dmesg has no WARNING/BUG/Oops' + (': ' + ' | '.join(bad[:5]) if bad else ''))
    check(re.search(r'L1-DMESG .*kvmx: fdatasync of the backing file failed for gfn 0x800: -5\b',
                    text) is not None,
          'dmesg: a failed host flush is logged (pr_warn_ratelimited)')
    loads = len(re.findall(r'L1-DMESG .*kvmx: /dev/kvmx ready, API version 1', text))
    check(loads >= 3, f'dmesg: pr_info on each load ({loads})')

    deep = re.search(r'KVMX-DEEP host_flushes=(\d+)', text)
    if deep and 'L1-DEEP-FLUSH 1' in text:
        check(outer1['nv0'] - outer0['nv0'] >= int(deep.group(1)),
              f'every deep flush reached the outer NVDIMM flush hint '
              f"(outer guest flushes +{outer1['nv0'] - outer0['nv0']} >= {deep.group(1)})")
    check('L1-DEVDAX ' in text, 'L1 made a device DAX of its second NVDIMM')
    dax = re.search(r'KVMX-DEVDAX host_flushes=(\d+)', text)
    check(dax is not None and int(dax.group(1)) == min(M, 10) and
          outer1['nv1'] - outer0['nv1'] >= int(dax.group(1)),
          f'device DAX: every deep flush reached the outer flush hint of nv1 '
          f"({dax.group(1) if dax else 'not run'}; "
          f"outer +{outer1['nv1'] - outer0['nv1']})")

    # One line per backing: disk (ext4 on L1's NVDIMM: the real flush) and
    # tmpfs (no-op flush: the cost of the path alone).  Numbers only.
    benches = re.findall(r'KVMX-BENCH (.*)', text)
    for b in benches:
        kv = dict(p.split('=', 1) for p in b.split())
        print(f"BENCH kvm-module M={kv['M']} backing={kv['backing']} "
              f"exits_per_flush kernel={kv['kernel_exits_per_flush']} "
              f"user={kv['user_exits_per_flush']} "
              f"vmexits_per_flush kernel={kv['kernel_vmexits_per_flush']} "
              f"user={kv['user_vmexits_per_flush']} "
              f"us_per_flush kernel={float(kv['kernel_ns_per_flush']) / 1e3:.1f} "
              f"user={float(kv['user_ns_per_flush']) / 1e3:.1f} "
              f"user_over_kernel={kv['user_over_kernel_latency']}", flush=True)
        check(float(kv['kernel_exits_per_flush']) == 0.0 and
              float(kv['user_exits_per_flush']) == 1.0,
              f"exits to user space per flush ({kv['backing']} backing): "
              f"kernel path 0, user path 1")
    check(len(benches) == 2, f'two KVMX-BENCH lines ({len(benches)})')
    coal = re.search(r'KVMX-COALESCE (.*)', text)
    if coal:
        print(f'COALESCE {coal.group(1)}')
    return finish(work)


def outer_flushes(vm):
    """The outer QEMU's guest flush count per NVDIMM id."""
    return {d['id']: d['guest-flushes'] for d in vm.qmp.cmd('query-nvdimm-flush')}


def extra_modules(nested, work):
    """-fw_cfg arguments handing EXTRA_MODULES to L1 (decompressed), from
    the kernel package scripts/mkguest unpacked for the nested image."""
    try:
        with open(os.path.join(nested, 'kernel.release')) as f:
            rel = f.read().strip()
    except OSError:
        return []
    trees = glob.glob(os.path.join(kvmxvm.REPO_ROOT, 'build', 'cache', 'guest-kernel',
                                   '*', 'lib', 'modules', rel))
    args = []
    for name, rel_path in EXTRA_MODULES:
        for tree in trees:
            src = os.path.join(tree, 'kernel', rel_path)
            dst = os.path.join(work, name + '.ko')
            if os.path.isfile(src + '.xz'):
                with lzma.open(src + '.xz') as fi, open(dst, 'wb') as fo:
                    shutil.copyfileobj(fi, fo)
            elif os.path.isfile(src):
                shutil.copyfile(src, dst)
            else:
                continue
            args += ['-fw_cfg', f'name=opt/kvmx/{name}.ko,file={dst}']
            break
        else:
            print(f'note: {rel_path} not found for {rel}: L1 has no {name} '
                  f'unless the image does', flush=True)
    return args


def finish(work):
    if failures:
        print(f'FAILED ({len(failures)}): ' + '; '.join(failures[:10]))
        print(f'work files kept in {work}')
        return 1
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
