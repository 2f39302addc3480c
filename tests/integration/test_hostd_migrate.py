#!/usr/bin/python3
"""kvmx-hostctl migrate: kvmx-hostd drives both QEMUs (source and
destination, each attached to hostd with a QMP socket of its own) through a
post-copy migration of a real Linux guest with a file-backed, flush-hinted
NVDIMM (issue 12, item 3), under TCG.

 refusals  before anything moves, with the pair that then migrates:
           --prefetch between QEMUs without the postcopy-prefetch
           capability (a clear error naming it, nothing set: the patched
           QEMU if it has no topic 06, else Debian's stock QEMU; with it
           the migration below uses --prefetch=pattern), --shared-storage with
           separate backend files, a destination that maps the source's
           file without --shared-storage (a third QEMU), an exec: URI, a
           unix socket path that is a regular file, --transport=rdma
           without a tcp: URI.  Afterwards the source
           still runs and the destination still waits (nothing was set
           listening).
 policy    kvmx-hostctl migrate --postcopy with the default policy: a
           progress line about every second (state, pass, remaining,
           sent, bytes/s), the switch to post-copy once the first precopy
           pass is complete, post-copy lines, "completed"; the destination
           faulted pages in; its NVDIMM file is durable before any guest
           flush there; the guest reads back its RAM and NVDIMM intact.
           Over tcp: with --transport=rdma: this host has no RDMA device,
           so QEMU falls back to the stream and hostd says so, with
           QEMU's reason, as it goes and in the outcome.
 recover   a second pair, --switch=manual and recover_attempts=1:
           migrate-postcopy switches; the test breaks the stream
           (migrate-pause on the source) and hostd recovers by itself
           (migrate-recover on the destination, migrate resume=true on the
           source); broken again, with no attempts left the migration ends
           "paused" (exit 1, migration-paused, the command to recover);
           kvmx-hostctl migrate-recover completes it; the guest's data is
           intact.
"""
import json
import os
import re
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'lib'))
import kvmxtest  # noqa: E402
import kvmxvm  # noqa: E402
import pagecache  # noqa: E402
from hostdctl import Hostd, hostd_binary  # noqa: E402

SIZE = 256 << 20
PMEM_OFF_MB, PMEM_MB = 16, 16
MIB = 1 << 20
check = kvmxtest.Checks()

# As test_migrate_postcopy.py: flushed NVDIMM data and 96 MiB of RAM whose
# checksums the guest prints, then forever: dirty 32 MiB, read both back;
# and 4 MiB dirtied all the time.
SCRIPT = rf'''
dd if=/dev/urandom of=/tmp/p bs=1M count={PMEM_MB} 2>/dev/null
dd if=/tmp/p of=/dev/pmem0 bs=1M seek={PMEM_OFF_MB} conv=fsync 2>/dev/null
echo "PMEM $(md5sum < /tmp/p | cut -d' ' -f1)"
rm /tmp/p
dd if=/dev/urandom of=/dev/shm/x bs=1M count=96 2>/dev/null
echo "RAM $(md5sum < /dev/shm/x | cut -d' ' -f1)"
echo READY
# Dirtied without a pause, so precopy never converges: dd rewrites its
# 4 MiB buffer with every read, with data that is not zero (a zero page
# costs QEMU nothing to send: passes would be instant, and one of dozens of
# syncs a second would catch the guest idle).
(while :; do dd if=/dev/shm/x of=/dev/null bs=4M 2>/dev/null; done) &
i=0
while :; do
  dd if=/dev/zero of=/dev/shm/y bs=1M count=32 conv=notrunc 2>/dev/null
  r=$(md5sum < /dev/shm/x | cut -d' ' -f1)
  p=$(dd if=/dev/pmem0 bs=1M skip={PMEM_OFF_MB} count={PMEM_MB} iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
  echo "CHK $i $r $p"
  i=$((i+1))
done
'''

# A progress line of kvmx-hostctl (ctl/args.cc, format_event).
SAMPLE_RE = re.compile(
    r'^\[\s*([\d.]+) s\] (\w+)\s+pass (\d+)  remaining ([\d.]+ \w+)  '
    r'sent ([\d.]+ \w+)  ([\d.]+ \w+)/s')


def hostctl():
    return os.path.join(os.path.dirname(hostd_binary()), 'kvmx-hostctl')


def ctl(hostd, *args, timeout=600):
    """kvmx-hostctl against this hostd: (exit status, stdout, stderr)."""
    p = subprocess.run([hostctl(), '-s', hostd.sock] + [str(a) for a in args],
                       capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout, p.stderr


class Follow:
    """kvmx-hostctl running in the background; its lines as they come,
    each with the time it arrived."""

    def __init__(self, hostd, *args):
        self.proc = subprocess.Popen(
            [hostctl(), '-s', hostd.sock] + [str(a) for a in args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines = []     # (monotonic time, line)
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        for line in self.proc.stdout:
            with self.cond:
                self.lines.append((time.monotonic(), line.rstrip('\n')))
                self.cond.notify_all()

    def wait_line(self, regex, timeout):
        rx = re.compile(regex)
        with self.cond:
            self.cond.wait_for(lambda: any(rx.search(l) for _, l in self.lines)
                               or self.proc.poll() is not None, timeout)
            return next((l for _, l in self.lines if rx.search(l)), None)

    def finish(self, timeout=600):
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.thread.join(5)
        return self.proc.returncode, self.proc.stderr.read()

    def text(self):
        with self.cond:
            return '\n'.join(l for _, l in self.lines)


def vm_args(work, name, img, incoming=False):
    dev = 'nvdimm,id=nv0,memdev=mem1,flush-hint=on'
    args = kvmxtest.nvdimm_args(img, SIZE, device=dev)
    # A monitor of hostd's own beside the test's.
    args += ['-qmp', f'unix:{hostd_qmp(work, name)},server=on,wait=off']
    if incoming:
        args += ['-incoming', 'defer']
    return args


def hostd_qmp(work, name):
    return os.path.join(work, f'{name}-hostd.qmp')


def wait_attached(hostd, name):
    v = hostd.wait_vm(name, lambda v: v['state'] == 'attached', 30)
    return v and v['state'] == 'attached'


def attach(hostd, work, name):
    rc, out, err = ctl(hostd, 'attach', f'vm={name}',
                       f'qmp={hostd_qmp(work, name)}')
    return check(rc == 0 and '"attached"' in out,
                 f'hostd attached {name} ({out.strip()[:120]} {err.strip()})')



def guest_sums(src):
    pmem = src.wait_console(r'PMEM ([0-9a-f]{32})\n', 300)[1]
    ram = src.wait_console(r'RAM ([0-9a-f]{32})\n', 300)[1]
    src.wait_console(r'CHK 1 ', 300)
    return ram, pmem


def check_guest_after(dst, name, ram, pmem):
    """The guest, now on the destination, reads both back."""
    n = len(re.findall(r'CHK \d+', dst.console_text()))
    m = dst.wait_console(r'CHK \d+ ([0-9a-f]{32}) ([0-9a-f]{32})\n', 300,
                         start=len(dst.console_text()))
    check(m[1] == ram and m[2] == pmem,
          f'{name}: the guest reads its RAM and NVDIMM intact after the move '
          f'({n} checks before it)')


def capabilities(vm):
    return [c['capability'] for c in vm.qmp.cmd('query-migrate-capabilities')]


def prefetch_capable(vm):
    return 'postcopy-prefetch' in capabilities(vm)


# -- refusals --------------------------------------------------------------------------
def no_prefetch_here(hostd, work, qemu, what):
    """--prefetch between two QEMUs that lack postcopy-prefetch: a clear
    error, nothing set (both still as they were)."""
    with kvmxvm.Vm(qemu, ['-machine', 'q35,accel=tcg', '-m', '64M', '-qmp',
                          f'unix:{hostd_qmp(work, "np-src")},server=on,wait=off'],
                   work, 'np-src').start() as a, \
         kvmxvm.Vm(qemu, ['-machine', 'q35,accel=tcg', '-m', '64M', '-qmp',
                          f'unix:{hostd_qmp(work, "np-dst")},server=on,wait=off',
                          '-incoming', 'defer'], work, 'np-dst').start() as b:
        if not (attach(hostd, work, 'np-src') and attach(hostd, work, 'np-dst')):
            return
        rc, out, err = ctl(hostd, 'migrate', 'vm=np-src', 'dest=np-dst',
                           '--postcopy', '--prefetch=pattern')
        caps = {c['capability']: c['state']
                for c in b.qmp.cmd('query-migrate-capabilities')}
        check(rc == 1 and 'migration-unsupported' in err and
              "has no migration capability 'postcopy-prefetch'" in err and
              not caps.get('postcopy-ram') and
              not b.qmp.cmd('query-migrate').get('status') and
              a.qmp.cmd('query-status')['status'] == 'running',
              f'--prefetch on {what} without postcopy-prefetch: a clear '
              f'error, nothing set ({err.strip()})')
        ctl(hostd, 'detach', 'vm=np-src')
        ctl(hostd, 'detach', 'vm=np-dst')


def refusals(hostd, work, qemu, src, dst, src_img):
    """Everything hostd refuses before a byte moves."""
    prefetch = prefetch_capable(src) and prefetch_capable(dst)
    if not prefetch:
        no_prefetch_here(hostd, work, qemu, 'the patched QEMU')
    else:
        print('note: this QEMU has postcopy-prefetch: the migration uses it')
        stock = os.environ.get('KVMX_STOCK_QEMU') or kvmxvm.DEFAULT_QEMU
        if os.access(stock, os.X_OK):
            no_prefetch_here(hostd, work, stock, 'stock QEMU')
        else:
            print(f'note: no stock QEMU at {stock}: the refusal of --prefetch '
                  'by a QEMU without it is not checked here')

    rc, out, err = ctl(hostd, 'migrate', 'vm=src', 'dest=dst', '--postcopy',
                       '--shared-storage')
    check(rc == 1 and 'migration-refused' in err and
          "which VM 'src' does not" in err,
          f'--shared-storage with separate files: refused ({err.strip()})')

    rc, out, err = ctl(hostd, 'migrate', 'vm=src', 'dest=dst', '--postcopy',
                       '--transport=rdma')
    check(rc == 1 and 'invalid-request' in err and "needs a tcp: 'uri'" in err,
          f'--transport=rdma over a unix socket: refused ({err.strip()})')

    rc, out, err = ctl(hostd, 'migrate', 'vm=src', 'dest=dst',
                       'uri=exec:touch /tmp/kvmx-exec-uri')
    check(rc == 1 and 'invalid-request' in err and
          not os.path.exists('/tmp/kvmx-exec-uri'),
          f'an exec: URI is refused ({err.strip()})')

    plain = os.path.join(work, 'not-a-socket')
    open(plain, 'w').close()
    rc, out, err = ctl(hostd, 'migrate', 'vm=src', 'dest=dst',
                       f'uri=unix:{plain}')
    check(rc == 1 and 'is not a socket' in err and os.path.exists(plain),
          f'a unix: URI naming a regular file is refused, the file stays '
          f'({err.strip()})')

    # A destination that maps the source's own file.
    with kvmxvm.Vm(qemu, ['-machine', 'q35,accel=tcg'] +
                   vm_args(work, 'same', src_img, True), work, 'same').start():
        if attach(hostd, work, 'same'):
            rc, out, err = ctl(hostd, 'migrate', 'vm=src', 'dest=same')
            check(rc == 1 and 'migration-refused' in err and
                  f"both map '{src_img}'" in err and
                  '--shared-storage' in err,
                  f'a destination mapping the same file without '
                  f'--shared-storage: refused ({err.strip()})')
            ctl(hostd, 'detach', 'vm=same')

    st = src.qmp.cmd('query-status')['status']
    dmig = dst.qmp.cmd('query-migrate')
    check(st == 'running' and dst.qmp.cmd('query-status')['status'] ==
          'inmigrate' and not dmig.get('status'),
          f'after the refusals the source runs ({st}), the destination '
          f'waits untouched ({dmig})')
    return prefetch


# -- a migration by policy --------------------------------------------------------------
def progress_checks(name, lines, elapsed):
    samples = [(float(m[1]), m[2], int(m[3])) for m in
               (SAMPLE_RE.match(l) for l in lines) if m]
    check(len(samples) >= max(3, int(elapsed) - 3),
          f'{name}: a progress line per second ({len(samples)} in '
          f'{elapsed:.1f} s)')
    ts = [t for t, _, _ in samples]
    gaps = sorted(b - a for a, b in zip(ts, ts[1:]))
    med = gaps[len(gaps) // 2] if gaps else 0
    check(gaps and 0.7 <= med <= 1.6 and ts == sorted(ts),
          f'{name}: about one second apart (median {med:.2f} s)')
    states = [s for _, s, _ in samples]
    passes = [p for _, s, p in samples if s == 'precopy']
    # A post-copy phase shorter than a second shows no sample of its own.
    check(states and states[0] == 'precopy',
          f'{name}: precopy lines first ({sorted(set(states))})')
    return passes, states


def policy(hostd, work, src, dst, dst_img, ram, pmem, prefetch):
    t0 = time.monotonic()
    extra = ['--prefetch=pattern'] if prefetch else []
    # --transport=rdma where QEMU has it: this host has no RDMA device, so
    # QEMU falls back to the stream, and hostd must say so.
    rdma = 'postcopy-rdma' in capabilities(src)
    if rdma:
        extra += ['--transport=rdma', f'uri=tcp:127.0.0.1:{kvmxtest.free_port()}']
    # Slow enough that precopy is still running when the policy switches.
    rc, out, err = ctl(hostd, 'migrate', 'vm=src', 'dest=dst', '--postcopy',
                       f'max_bandwidth={32 * MIB}', 'downtime_limit_ms=1',
                       f'max_postcopy_bandwidth={8 * MIB}', *extra)
    elapsed = time.monotonic() - t0
    print(f'--- kvmx-hostctl migrate ({elapsed:.1f} s)\n{out}{err}---')
    lines = out.splitlines()
    if not check(rc == 0 and lines and 'completed' in lines[-1],
                 f'policy: kvmx-hostctl migrate completed ({err.strip()})'):
        return
    passes, _ = progress_checks('policy', lines, elapsed)
    if rdma and not os.path.exists('/dev/infiniband/rdma_cm'):
        note = [l for l in lines if 'RDMA not used' in l]
        check(note and 'post-copy goes on over the migration stream' in
              note[0] and 'RDMA not used' in lines[-1] and
              'post-copy went over the stream' in lines[-1],
              f'policy: --transport=rdma without an RDMA device: QEMU fell '
              f'back to TCP and hostd said why ({note[:1]})')
    elif not rdma:
        print('note: this QEMU has no postcopy-rdma: --transport=rdma not '
              'tried')
    check(passes and passes[0] == 1,
          f'policy: precopy shows its passes ({sorted(set(passes))})')
    sw = [l for l in lines if 'switching to post-copy' in l]
    check(len(sw) == 1 and re.search(r': \d+ precopy pass(es)? complete$',
                                     sw[0]),
          f'policy: switched by the policy once a precopy pass was '
          f'complete ({sw})')
    check(re.search(r"completed: .* post-copy \(\d+ precopy pass(es)? "
                    r"complete\), (\d+) page requests", lines[-1]) is not None,
          f'policy: the outcome line ({lines[-1]})')
    rc, out, _ = ctl(hostd, '--json', 'migrate-status', 'vm=src')
    r = json.loads(out).get('result', {}) if rc == 0 else {}
    check(r.get('state') == 'completed' and r.get('postcopy_requests', 0) > 0
          and r.get('switched') and r.get('prefetch') ==
          ('pattern' if prefetch else 'off'),
          f'policy: migrate-status: completed, the destination faulted pages '
          f'in ({r.get("postcopy_requests")} requests)')
    check(dst.qmp.cmd('query-status')['status'] == 'running',
          'policy: the destination runs')
    flushes = dst.qmp.cmd('query-nvdimm-flush')[0]['guest-flushes']
    if pagecache.available():
        st = pagecache.cachestat(dst_img)
        check(flushes == 0 and st['dirty'] == 0,
              f'policy: the NVDIMM is durable in the destination\'s file '
              f'before any guest flush ({flushes} flushes, {st})')
    check(kvmxtest.file_md5(dst_img, PMEM_OFF_MB, PMEM_MB) == pmem,
          'policy: the flushed NVDIMM data is in the destination\'s file')
    check_guest_after(dst, 'policy', ram, pmem)


# -- recovery -------------------------------------------------------------------------------
def wait_status(vm, want, timeout=120):
    deadline = time.monotonic() + timeout
    while True:
        st = vm.qmp.cmd('query-migrate').get('status')
        if st in want or time.monotonic() > deadline:
            return st
        time.sleep(0.1)


def wait_running(vm, timeout=120):
    """The destination runs the guest: post-copy can pause from now on.
    (Broken earlier, while it still loads the device state, QEMU fails
    the destination: "postcopy_ram_listen_thread: loadvm failed".)"""
    deadline = time.monotonic() + timeout
    while True:
        st = vm.qmp.cmd('query-status')['status']
        if st == 'running' or time.monotonic() > deadline:
            return st
        time.sleep(0.1)


def recover(hostd, work, qemu):
    src_img, dst_img = (kvmxtest.backing_file(work, n, SIZE)
                        for n in ('r-src.img', 'r-dst.img'))
    with kvmxvm.start_guest(qemu, SCRIPT, vm_args(work, 'rsrc', src_img),
                            work, 'rsrc') as src:
        ram, pmem = guest_sums(src)
        with kvmxvm.start_guest(qemu, None,
                                vm_args(work, 'rdst', dst_img, True), work,
                                'rdst') as dst:
            if not (attach(hostd, work, 'rsrc') and attach(hostd, work, 'rdst')):
                return
            t0 = time.monotonic()
            f = Follow(hostd, 'migrate', 'vm=rsrc', 'dest=rdst', '--postcopy',
                       '--switch=manual', 'recover_attempts=1',
                       f'max_bandwidth={32 * MIB}', 'downtime_limit_ms=1',
                       f'max_postcopy_bandwidth={4 * MIB}')
            check(f.wait_line(r'precopy\s+pass 1 ', 60) is not None,
                  'recover: precopy runs')
            time.sleep(2)
            rc, out, err = ctl(hostd, 'migrate-postcopy', 'vm=rsrc')
            check(rc == 0 and '"switching":true' in out,
                  f'recover: migrate-postcopy switches ({out.strip()} '
                  f'{err.strip()})')
            st = wait_status(src, ('postcopy-active', 'completed', 'failed'))
            check(st == 'postcopy-active' and wait_running(dst) == 'running',
                  f'recover: post-copy runs, the guest on the destination '
                  f'({st})')
            # Break the stream: QEMU's own way of losing the connection.
            src.qmp.cmd('migrate-pause')
            line = f.wait_line(r'post-copy resumed \(recovery 1\)', 90)
            check(line is not None,
                  'recover: paused, then hostd recovered it by itself '
                  '(migrate-recover + migrate resume)')
            st = wait_status(src, ('postcopy-active', 'completed', 'failed'))
            if st == 'postcopy-active':
                src.qmp.cmd('migrate-pause')
            else:
                print(f'note: post-copy ended ({st}) before a second pause')
            rc, err = f.finish(120)
            print(f'--- kvmx-hostctl migrate\n{f.text()}\n{err}---')
            check(rc == 1 and 'migration-paused' in err and
                  'kvmx-hostctl migrate-recover vm=rsrc dest=rdst' in err,
                  f'recover: paused again with no attempts left: ends '
                  f'"paused" and says how to recover ({err.strip()})')
            _, states = progress_checks('recover', f.text().splitlines(),
                                        time.monotonic() - t0)
            check('postcopy' in states and 'paused' in states,
                  f'recover: post-copy and paused lines '
                  f'({sorted(set(states))})')
            rc, out, err = ctl(hostd, 'migrate-recover', 'vm=rsrc',
                               'dest=rdst')
            print(f'--- kvmx-hostctl migrate-recover\n{out}{err}---')
            lines = out.splitlines()
            check(rc == 0 and lines and 'completed' in lines[-1] and
                  '2 recoveries' in lines[-1],
                  f'recover: kvmx-hostctl migrate-recover completes it '
                  f'({lines[-1:] + [err.strip()]})')
            print(f'recover: the migration took {time.monotonic() - t0:.1f} s')
            check(dst.qmp.cmd('query-status')['status'] == 'running',
                  'recover: the destination runs')
            check_guest_after(dst, 'recover', ram, pmem)
            dst.kill()
        src.kill()


def main():
    kvmxtest.require_guest_image()
    qemu = kvmxvm.patched_qemu()
    if not os.access(hostd_binary(), os.X_OK):
        kvmxvm.skip(f'{hostd_binary()} is not built')
    work = kvmxtest.workdir('hostd-migrate-')
    # Unix socket paths must fit 107 bytes.
    if len(hostd_qmp(work, 'rsrc')) > 100:
        kvmxvm.skip(f'work directory {work} too long for socket paths')
    hostd = Hostd(work)
    t_start = time.monotonic()
    try:
        hostd.start()
        src_img, dst_img = (kvmxtest.backing_file(work, n, SIZE)
                            for n in ('src.img', 'dst.img'))
        with kvmxvm.start_guest(qemu, SCRIPT, vm_args(work, 'src', src_img),
                                work, 'src') as src:
            ram, pmem = guest_sums(src)
            with kvmxvm.start_guest(qemu, None,
                                    vm_args(work, 'dst', dst_img, True),
                                    work, 'dst') as dst:
                if attach(hostd, work, 'src') and attach(hostd, work, 'dst'):
                    prefetch = refusals(hostd, work, qemu, src, dst, src_img)
                    policy(hostd, work, src, dst, dst_img, ram, pmem, prefetch)
                dst.kill()
            src.kill()
        recover(hostd, work, qemu)
        r = hostd.call('stats')['result']['migrations']
        check(r['completed'] == 2 and r['running'] == 0,
              f'stats: migrations ({r})')
    except (RuntimeError, OSError, subprocess.TimeoutExpired,
            kvmxvm.QmpError) as e:
        check(False, f'{type(e).__name__}: {e}')
    finally:
        hostd.kill()
        if check.failures:
            print(f'--- hostd log tail\n{hostd.tail(6000)}')
    print(f'test_hostd_migrate: {time.monotonic() - t_start:.1f} s')
    return check.finish(work)


if __name__ == '__main__':
    sys.exit(main())
