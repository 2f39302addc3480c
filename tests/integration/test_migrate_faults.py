#!/usr/bin/python3
"""Faults during post-copy migration of a VM with a file-backed,
flush-hinted NVDIMM and DRAM (issue 12, item 4), between patched QEMUs
under TCG with a real Linux guest.

One guest is booted once and moved along a chain of QEMUs, one fault per
hop (a case whose hop does not end with the guest running somewhere makes
the next case boot a fresh one):

 dst-dies   the destination is SIGKILLed during precopy: the source's
            migration fails, query-migrate there says 'failed' with an
            error, the source VM keeps running and the guest keeps printing
            intact checksums; then a second migration (post-copy) to a fresh
            destination completes, with the guest's RAM and NVDIMM data
            intact there.
 link-drop  the migration runs through a TCP relay (this script, run with
            --relay) that is SIGKILLed during post-copy: both sides go
            postcopy-paused (events, query-migrate; the source names the
            error); migrate-recover on the destination on a new port (out of
            band) and migrate resume=true on the source through a new relay
            resume it, and pages move again.  `migrate-pause` on the source
            then breaks it a second time, and a direct connection recovers
            it.  It completes, the bulk of the RAM moving after the second
            recovery; nothing reported 'failed'; the guest reads back the
            RAM it keeps reading, the RAM it left alone (sent after the
            recoveries) and its NVDIMM data, and the destination's backing
            file holds the NVDIMM data.
 src-dies   the source is SIGKILLed during post-copy: the destination goes
            postcopy-paused and says so (MIGRATION event, stderr, and
            query-migrate when its main loop is free, see below), for 5 s
            reports neither 'completed' nor 'failed', and stays up with its
            out-of-band monitor answering.

Post-copy is asked for at once and starts as soon as the NVDIMM (which must
go before post-copy) fits the downtime budget, so most of the guest's RAM
goes post-copy; the background post-copy bandwidth is capped so the phase
lasts until the test has broken it.  Breaks come after the guest runs on
the destination: before that (listening, loading devices, making the NVDIMM
durable) a broken stream fails the destination for good in QEMU 10.0.

Under TCG a vCPU delivers interrupts holding the BQL; while post-copy is
paused, a page it needs for that can block the destination's main loop
(in-band QMP, `quit`) until the page arrives.  The test therefore recovers
through a second, out-of-band monitor, as QEMU intends for migrate-recover.
"""
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'lib'))
import kvmxtest  # noqa: E402
import kvmxvm  # noqa: E402

SIZE = 256 << 20                    # the NVDIMM
PMEM_OFF_MB, PMEM_MB = 16, 16       # what the guest writes and syncs on it
HOT_MB, COLD_MB = 64, 64            # RAM it reads in a loop / leaves alone
MIB = 1 << 20
check = kvmxtest.Checks()

# The guest writes PMEM_MB of random data to the NVDIMM and syncs it (a
# trapped flush), fills HOT_MB of RAM (x) that it reads back in its loop and
# COLD_MB (z) that it leaves alone until asked (a line "cold" on its
# console), so that the post-copy phase has pages nobody faults in.  Each
# loop rewrites 16 MiB (y): the guest dirties memory throughout.
SCRIPT = rf'''
dd if=/dev/urandom of=/tmp/p bs=1M count={PMEM_MB} 2>/dev/null
dd if=/tmp/p of=/dev/pmem0 bs=1M seek={PMEM_OFF_MB} conv=fsync 2>/dev/null
echo "PMEM $(md5sum < /tmp/p | cut -d' ' -f1)"
rm /tmp/p
dd if=/dev/urandom of=/dev/shm/x bs=1M count={HOT_MB} 2>/dev/null
echo "HOT $(md5sum < /dev/shm/x | cut -d' ' -f1)"
dd if=/dev/urandom of=/dev/shm/z bs=1M count={COLD_MB} 2>/dev/null
echo "COLD $(md5sum < /dev/shm/z | cut -d' ' -f1)"
echo READY
i=0
while :; do
  dd if=/dev/zero of=/dev/shm/y bs=1M count=16 conv=notrunc 2>/dev/null
  r=$(md5sum < /dev/shm/x | cut -d' ' -f1)
  p=$(dd if=/dev/pmem0 bs=1M skip={PMEM_OFF_MB} count={PMEM_MB} iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
  echo "CHK $i $r $p"
  # read -t 0 only polls; a timed read could drop half a line (busybox)
  sleep 0.2
  if read -t 0 && read c && [ "$c" = cold ]; then
    echo "CCHK $i $(md5sum < /dev/shm/z | cut -d' ' -f1)"
  fi
  i=$((i+1))
done
'''
CHK_RE = re.compile(r'CHK (\d+) ([0-9a-f]{32}) ([0-9a-f]{32})\n')

# Migration parameters.  The switch to post-copy is allowed once what must
# go before it (the NVDIMM's dirty pages, 256 MiB at first) fits
# avail-switchover-bandwidth x downtime-limit = 300 MiB, which the whole of
# RAM (1.25 GiB pending at the start) does not: precopy cannot complete
# first, and post-copy starts within the first iterations.
PRECOPY_BW = 32 * MIB
POSTCOPY_PARAMS = {'max-bandwidth': PRECOPY_BW, 'downtime-limit': 1000,
                   'avail-switchover-bandwidth': 300 * MIB}
# Plain precopy, long: ~250 MiB of guest data at 32 MiB/s, and it may stop
# the guest for 300 ms at most (about 10 MiB), which the guest's writes
# keep it from reaching for a while.
PRECOPY_PARAMS = {'max-bandwidth': PRECOPY_BW, 'downtime-limit': 300,
                  'avail-switchover-bandwidth': 0}
SLOW_POSTCOPY_BW = 2 * MIB          # COLD_MB takes >= 30 s at this rate
DONE = ('completed', 'failed', 'cancelled')


# -- a TCP relay whose death is a real network failure -----------------------
def relay_main(host, port):
    """Listen on a free port of 127.0.0.1 (printed on stdout) and relay each
    connection to host:port until killed."""
    ls = socket.create_server(('127.0.0.1', 0))
    print(ls.getsockname()[1], flush=True)

    def pump(a, b):
        try:
            while data := a.recv(1 << 16):
                b.sendall(data)
            b.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    while True:
        c, _ = ls.accept()
        d = socket.create_connection((host, int(port)))
        for a, b in ((c, d), (d, c)):
            threading.Thread(target=pump, args=(a, b), daemon=True).start()


class Relay:
    """This script as a relay process to 127.0.0.1:port; kill() SIGKILLs it,
    so the kernel closes both of its connections as for any dead peer."""

    def __init__(self, port):
        cmd = [sys.executable, os.path.abspath(__file__), '--relay',
               '127.0.0.1', str(port)]
        if shutil.which('setpriv'):
            cmd = ['setpriv', '--pdeathsig', 'KILL', '--'] + cmd
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE,
                                     stdin=subprocess.DEVNULL)
        self.port = int(self.proc.stdout.readline())

    def kill(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.proc.stdout.close()


# -- migration helpers -------------------------------------------------------
def set_caps(vm, **caps):
    vm.qmp.cmd('migrate-set-capabilities', capabilities=[
        {'capability': k.replace('_', '-'), 'state': v}
        for k, v in caps.items()])


class Events:
    """The MIGRATION events of one VM, in order, as (status, wall time),
    with its RESUME events (the VM starts running) as ('RESUME', time)."""

    def __init__(self, vm):
        self.vm = vm
        self.seen = []
        vm.qmp.events()             # those of an earlier migration

    def statuses(self):
        """The MIGRATION statuses so far."""
        self._drain()
        return [s for s, _ in self.seen if s != 'RESUME']

    def _drain(self):
        for ev in self.vm.qmp.events():
            ts = ev['timestamp']
            t = ts['seconds'] + ts['microseconds'] / 1e6
            if ev['event'] == 'MIGRATION':
                self.seen.append((ev['data']['status'], t))
            elif ev['event'] == 'RESUME':
                self.seen.append(('RESUME', t))

    def wait(self, want, timeout, after=0.0):
        """Wait for a MIGRATION status (or RESUME) in `want` at or after
        wall time `after`; returns (status, time) or (None, None)."""
        deadline = time.monotonic() + timeout
        while True:
            self._drain()
            for st, t in self.seen:
                if st in want and t >= after:
                    return st, t
            if time.monotonic() > deadline or self.vm.returncode is not None:
                return None, None
            time.sleep(0.05)


def incoming(qemu, work, name, img):
    """A destination QEMU listening on a free TCP port; (vm, port).  It has
    a second QMP monitor, vm.oob, for out-of-band commands: under TCG a
    vCPU delivers interrupts holding the BQL, so while post-copy is paused
    a page-table page that has not arrived yet can block QEMU's main loop
    (and every in-band command) until it does."""
    oob = os.path.join(work, f'{name}.oob')
    vm = kvmxvm.start_guest(qemu, None, nvdimm_args(img) + [
        '-chardev', f'socket,id=oobmon,path={oob},server=on,wait=off',
        '-mon', 'chardev=oobmon,mode=control', '-incoming', 'defer'],
        work, name)
    try:
        vm.oob = kvmxvm.Qmp(oob, oob=True)
        set_caps(vm, postcopy_ram=True, events=True)
        vm.qmp.cmd('migrate-incoming', uri='tcp:127.0.0.1:0')
        addrs = vm.qmp.cmd('query-migrate').get('socket-address', [])
        return vm, int(addrs[0]['port'])
    except BaseException:
        vm.shutdown()
        raise


def stop(vm, timeout=10.0):
    """Quit (or kill) a VM and close its out-of-band monitor if it has one."""
    rc = vm.shutdown(timeout)
    if getattr(vm, 'oob', None):
        vm.oob.close()
        vm.oob = None
    return rc


def nvdimm_args(img):
    return kvmxtest.nvdimm_args(
        img, SIZE, device='nvdimm,id=nv0,memdev=mem1,flush-hint=on')


def prepare_source(vm, postcopy_bw, params=POSTCOPY_PARAMS):
    set_caps(vm, postcopy_ram=True, events=True)
    vm.qmp.cmd('migrate-set-parameters', params,
               **{'max-postcopy-bandwidth': postcopy_bw})


def sent(info):
    """RAM bytes sent so far, from a source's query-migrate."""
    return info.get('ram', {}).get('transferred', 0)



class Guest:
    """The guest's checksums, taken once on the VM that booted it."""

    def __init__(self, vm):
        self.pmem = vm.wait_console(r'PMEM ([0-9a-f]{32})\n', 300)[1]
        self.hot = vm.wait_console(r'HOT ([0-9a-f]{32})\n', 300)[1]
        self.cold = vm.wait_console(r'COLD ([0-9a-f]{32})\n', 300)[1]
        vm.wait_console(r'CHK 1 ', 300)

    def last_chk(self, vm):
        """The number of the last CHK line the guest printed on `vm`."""
        return int(CHK_RE.findall(vm.console_text())[-1][0])

    def next_chk(self, vm, timeout=120):
        """The next CHK line the guest prints on `vm` from now."""
        m = vm.wait_console(CHK_RE, timeout, start=len(vm.console_text()))
        return int(m[1]), m[2], m[3]

    def intact(self, vm, img, what):
        """The guest on `vm` reads its hot RAM, cold RAM and NVDIMM data
        back intact, and `img` holds the NVDIMM data."""
        _, hot, pmem = self.next_chk(vm)
        check(hot == self.hot and pmem == self.pmem,
              f'{what}: the guest reads its RAM and NVDIMM data intact')
        start = len(vm.console_text())
        vm.send_serial(b'cold\n')
        m = vm.wait_console(r'CCHK \d+ ([0-9a-f]{32})\n', 120, start=start)
        check(m[1] == self.cold,
              f'{what}: the guest reads the RAM it left alone intact')
        check(kvmxtest.file_md5(img, PMEM_OFF_MB, PMEM_MB) == self.pmem,
              f'{what}: the destination\'s backing file holds the NVDIMM data')


def boot(qemu, work, name):
    img = kvmxtest.backing_file(work, f'{name}.img', SIZE)
    vm = kvmxvm.start_guest(qemu, SCRIPT, nvdimm_args(img), work, name)
    return vm, img, Guest(vm)


def postcopy_until_active(src, dst, uri, timings=None, timeout=120):
    """Start a migration, ask for post-copy at once; wait until both sides
    are in post-copy and the guest runs on the destination.  Returns the
    source's Events, the destination's and the source's query-migrate then,
    or None if it never got there.

    The destination's MIGRATION event says postcopy-active when it starts
    listening for post-copy pages, before it has loaded the device state
    (and, with kvmx, made the NVDIMM durable) and started the guest; until
    then a broken stream fails it for good (QEMU 10.0 recovers post-copy
    only once the destination runs), so wait for its RESUME event."""
    sev, dev = Events(src), Events(dst)
    src.qmp.cmd('migrate', uri=uri)
    src.qmp.cmd('migrate-start-postcopy')
    st, _ = sev.wait(('postcopy-active',) + DONE, timeout)
    if st == 'postcopy-active':
        st, t_listen = dev.wait(('postcopy-active',) + DONE, 30)
    if st == 'postcopy-active':
        st, t_run = dev.wait(('RESUME',) + DONE, 30)
    if st != 'RESUME':
        check(False, f'post-copy starts and the guest runs on the '
                     f'destination ({src.name}: {sev.statuses()}, '
                     f'{dst.name}: {dev.statuses()})')
        return None
    if timings is not None:
        key = 'destination: listening -> guest runs (a break is fatal)'
        timings[key] = max(timings.get(key, 0), t_run - t_listen)
    return sev, dev, src.qmp.cmd('query-migrate')


# -- the cases ---------------------------------------------------------------
def dst_dies(qemu, work, timings):
    """Destination SIGKILLed during precopy; then a fresh one succeeds.
    Returns (vm, img, guest) now running the guest, or None."""
    a, _, guest = boot(qemu, work, 'a')
    d2 = None
    try:
        d1_img = kvmxtest.backing_file(work, 'd1.img', SIZE)
        d1, port = incoming(qemu, work, 'd1', d1_img)
        try:
            prepare_source(a, 0, PRECOPY_PARAMS)
            sev = Events(a)
            a.qmp.cmd('migrate', uri=f'tcp:127.0.0.1:{port}')
            # Well into precopy (the guest's ~250 MiB of data take several
            # seconds at 32 MiB/s): kill once 8 MiB are through.
            deadline = time.monotonic() + 60
            while True:
                info = a.qmp.cmd('query-migrate')
                if (info.get('status') not in ('setup', 'active') or
                        sent(info) >= 8 * MIB or
                        time.monotonic() > deadline):
                    break
                time.sleep(0.05)
            dinfo = d1.qmp.cmd('query-migrate')
            check(info.get('status') == 'active' and
                  dinfo.get('status') == 'active',
                  f'dst-dies: both sides in precopy when the destination '
                  f'is killed (source {info.get("status")} with '
                  f'{sent(info) >> 20} MiB sent, '
                  f'destination {dinfo.get("status")})')
            chk_before = guest.last_chk(a)
            t_kill = time.time()
            d1.kill()
            st, t_fail = sev.wait(DONE + ('postcopy-active',), 60)
            check(st == 'failed', f'dst-dies: the source\'s migration fails '
                  f'({sev.statuses()})')
            if t_fail:
                timings['dst-dies: destination killed -> source failed'] = \
                    t_fail - t_kill
            info = a.qmp.cmd('query-migrate')
            check(info.get('status') == 'failed' and info.get('error-desc'),
                  f'dst-dies: query-migrate on the source says failed, with '
                  f'an error ({info.get("status")}: '
                  f'{info.get("error-desc")!r})')
            check(a.qmp.cmd('query-status')['status'] == 'running',
                  'dst-dies: the source VM keeps running')
            # The guest makes progress: two more checks, each intact.
            n, hot, pmem = guest.next_chk(a, 60)
            n2, hot2, pmem2 = guest.next_chk(a, 60)
            check(n2 > n > chk_before and
                  (hot, pmem) == (hot2, pmem2) == (guest.hot, guest.pmem),
                  f'dst-dies: the guest keeps going on the source (CHK '
                  f'{chk_before} before the kill, {n} and {n2} after, intact)')
        finally:
            d1.kill()
            stop(d1)

        # A second migration, to a fresh destination, succeeds.
        d2_img = kvmxtest.backing_file(work, 'd2.img', SIZE)
        d2, port = incoming(qemu, work, 'd2', d2_img)
        prepare_source(a, 0)
        t0 = time.time()
        got = postcopy_until_active(a, d2, f'tcp:127.0.0.1:{port}', timings)
        if got is None:
            return None
        sev, dev, _ = got
        st, t_done = sev.wait(DONE, 180)
        info = a.qmp.cmd('query-migrate')
        check(st == 'completed', f'dst-dies: a second migration, to a fresh '
              f'destination, completes ({sev.statuses()}, '
              f'{info.get("error-desc", "")})')
        if st != 'completed':
            return None
        timings['dst-dies: second migration, start -> completed'] = \
            t_done - t0
        check(d2.qmp.cmd('query-status')['status'] == 'running',
              'dst-dies: the guest runs on the second destination')
        guest.intact(d2, d2_img, 'dst-dies')
        hop, d2 = (d2, d2_img, guest), None
        return hop
    finally:
        if d2 is not None:
            stop(d2)
        a.kill()
        stop(a)


def paused(what, sev, dev, t0):
    """Wait until both sides are postcopy-paused (events after wall time
    t0); (destination's delay, source's) if they are, else None."""
    st_d, t_d = dev.wait(('postcopy-paused',) + DONE, 30, after=t0)
    st_s, t_s = sev.wait(('postcopy-paused',) + DONE, 30, after=t0)
    ok = check(st_d == 'postcopy-paused' and st_s == 'postcopy-paused',
               f'link-drop: {what} pauses both sides (destination {st_d}, '
               f'source {st_s})')
    return (t_d - t0, t_s - t0) if ok else None


def link_drop(qemu, work, src, guest, timings):
    """The connection dies during post-copy (relay killed); recovery;
    migrate-pause; recovery again.  Returns (vm, img, guest) or None."""
    img = kvmxtest.backing_file(work, 'd3.img', SIZE)
    relays = []
    dst = None
    try:
        dst, port = incoming(qemu, work, 'd3', img)
        prepare_source(src, SLOW_POSTCOPY_BW)
        relays.append(Relay(port))
        got = postcopy_until_active(src, dst,
                                    f'tcp:127.0.0.1:{relays[0].port}', timings)
        if got is None:
            return None
        sev, dev, info = got
        remaining = info['ram']['remaining']
        t_kill = time.time()
        relays[0].kill()
        took = paused(f'the relay\'s death with {remaining >> 20} MiB to go',
                      sev, dev, t_kill)
        if not took:
            return None
        timings['link-drop: relay killed -> destination paused'] = took[0]
        timings['link-drop: relay killed -> source paused'] = took[1]
        sinfo = src.qmp.cmd('query-migrate')
        check(sinfo.get('status') == 'postcopy-paused' and
              sinfo.get('error-desc'),
              f'link-drop: query-migrate on the source says postcopy-paused, '
              f'with the error ({sinfo.get("status")}: '
              f'{sinfo.get("error-desc")!r})')
        dst_says(dst, 'link-drop')
        check('Detected IO failure for postcopy' in dst.stderr_text(),
              'link-drop: the destination logs the failure')

        # Recovery 1: a new port on the destination, a new relay.
        before = sent(sinfo)
        if not recover(src, dst, sev, dev, relays, timings):
            return None
        time.sleep(1)
        now = src.qmp.cmd('query-migrate')
        check(now['status'] == 'postcopy-active' and sent(now) > before,
              f'link-drop: pages move after the first recovery '
              f'({(sent(now) - before) >> 10} KiB in 1 s)')

        # Break 2: migrate-pause on the source (it shuts its socket down).
        t_pause = time.time()
        src.qmp.cmd('migrate-pause')
        took = paused('migrate-pause', sev, dev, t_pause)
        if not took:
            return None
        timings['link-drop: migrate-pause -> destination paused'] = took[0]
        before = sent(src.qmp.cmd('query-migrate'))
        if not recover(src, dst, sev, dev, None, timings):
            return None

        # Let it finish at full speed.
        t_fast = time.time()
        src.qmp.cmd('migrate-set-parameters', **{'max-postcopy-bandwidth': 0})
        st, t_done = sev.wait(DONE, 120, after=t_fast)
        info = src.qmp.cmd('query-migrate')
        check(st == 'completed', f'link-drop: the migration completes after '
              f'two recoveries (source: {sev.statuses()})')
        if st != 'completed':
            return None
        timings['link-drop: full speed -> completed'] = t_done - t_fast
        check(sent(info) - before >= COLD_MB * MIB,
              f'link-drop: the bulk of the guest\'s RAM moves after the '
              f'second recovery '
              f'({(sent(info) - before) >> 20} MiB)')
        st_d, _ = dev.wait(DONE, 30, after=t_fast)
        check(st_d == 'completed' and 'failed' not in dev.statuses() and
              'failed' not in sev.statuses(),
              f'link-drop: the destination completes too, nothing failed '
              f'(destination: {dev.statuses()})')
        check(dst.qmp.cmd('query-status')['status'] == 'running',
              'link-drop: the guest runs on the destination')
        guest.intact(dst, img, 'link-drop')
        hop, dst = (dst, img, guest), None
        return hop
    finally:
        for r in relays:
            r.kill()
        if dst is not None:
            stop(dst)
        src.kill()
        stop(src)


def dst_says(dst, what):
    """The destination's own view while paused.  Its out-of-band monitor
    must answer.  query-migrate is in band: under TCG a vCPU delivers
    interrupts holding the BQL, so a page that has not arrived can block
    the main loop for as long as post-copy is paused; if it answers, it must
    say postcopy-paused."""
    dst.oob.cmd('query-yank', oob=True, timeout=10)
    try:
        st = dst.qmp.cmd('query-migrate', timeout=5).get('status')
    except TimeoutError:
        print(f'note  {what}: in-band query-migrate on the paused '
              'destination: no answer in 5 s (main loop blocked)')
        return
    check(st == 'postcopy-paused', f'{what}: query-migrate on the '
          f'destination says postcopy-paused ({st})')


def recover(src, dst, sev, dev, relays, timings):
    """migrate-recover on the destination (out of band, on a new port),
    migrate resume=true on the source, through a new relay (appended to
    `relays`) or, with relays None, directly; True once both sides are in
    post-copy again."""
    how = 'new relay' if relays is not None else 'direct'
    t0 = time.time()
    for _ in range(5):
        port = kvmxtest.free_port()
        try:
            dst.oob.cmd('migrate-recover', oob=True,
                        uri=f'tcp:127.0.0.1:{port}')
            break
        except kvmxvm.QmpError as e:    # taken meanwhile
            err = e
    else:
        raise err
    if relays is not None:
        relays.append(Relay(port))
        port = relays[-1].port
    src.qmp.cmd('migrate', uri=f'tcp:127.0.0.1:{port}', resume=True)
    want = ('postcopy-active', 'postcopy-paused') + DONE
    st_s, t_s = sev.wait(want, 60, after=t0)
    st_d, t_d = dev.wait(want, 60, after=t0)
    if not check(st_s == 'postcopy-active' and st_d == 'postcopy-active',
                 f'link-drop: recovery ({how}) resumes post-copy (source '
                 f'{st_s}, destination {st_d}; source: {sev.statuses()})'):
        return False
    timings[f'link-drop: recovery ({how}) -> post-copy again'] = \
        max(t_s, t_d) - t0
    return True


def src_dies(qemu, work, src, guest, timings):
    """The source is SIGKILLed during post-copy."""
    img = kvmxtest.backing_file(work, 'd4.img', SIZE)
    dst = None
    try:
        dst, port = incoming(qemu, work, 'd4', img)
        prepare_source(src, SLOW_POSTCOPY_BW)
        got = postcopy_until_active(src, dst, f'tcp:127.0.0.1:{port}', timings)
        if got is None:
            return
        sev, dev, info = got
        t_kill = time.time()
        src.kill()
        remaining = info['ram']['remaining']
        st, t_p = dev.wait(('postcopy-paused',) + DONE, 30, after=t_kill)
        check(st == 'postcopy-paused',
              f'src-dies: the destination goes postcopy-paused when the '
              f'source dies with {remaining >> 20} MiB to go '
              f'({dev.statuses()})')
        if t_p:
            timings['src-dies: source killed -> destination paused'] = \
                t_p - t_kill
        check('Detected IO failure for postcopy' in dst.stderr_text(),
              'src-dies: the destination logs the failure')
        dst_says(dst, 'src-dies')
        # It stays so for 5 s: nothing claims success or gives up, QEMU
        # stays up, its out-of-band monitor answers.
        time.sleep(5)
        evs = dev.statuses()
        check(evs[-1:] == ['postcopy-paused'] and 'completed' not in evs and
              'failed' not in evs,
              f'src-dies: 5 s later the destination is still paused and has '
              f'never reported completed or failed (events: {evs})')
        alive = dst.returncode is None
        if alive:
            dst.oob.cmd('query-yank', oob=True, timeout=10)
        check(alive, f'src-dies: the destination QEMU is up and answers '
              f'(exit {dst.returncode})')
        # What management can do with it: quit works only if no vCPU waits
        # for a page (under TCG one always ends up waiting); else SIGKILL.
        t0 = time.monotonic()
        try:
            dst.qmp.cmd('quit', timeout=5)
            dst.wait(5)
            how = f'quit: exit {dst.returncode}'
        except (TimeoutError, kvmxvm.QmpError, subprocess.TimeoutExpired):
            how = 'quit did not end it'
        print(f'note  src-dies: {how} after {time.monotonic() - t0:.1f} s')
    finally:
        src.kill()
        stop(src)
        if dst is not None:
            dst.kill()
            stop(dst)


def main():
    if len(sys.argv) == 4 and sys.argv[1] == '--relay':
        relay_main(sys.argv[2], sys.argv[3])
        return 0
    kvmxtest.require_guest_image()
    qemu = kvmxvm.patched_qemu()
    work = kvmxtest.workdir('migfaults-')
    timings = {}
    t_start = time.monotonic()
    hop = dst_dies(qemu, work, timings) or boot(qemu, work, 'b')
    hop = link_drop(qemu, work, hop[0], hop[2], timings) or \
        boot(qemu, work, 'c')
    src_dies(qemu, work, hop[0], hop[2], timings)
    for k, v in timings.items():
        print(f'time  {k}: {v:.3f} s')
    print(f'time  whole test: {time.monotonic() - t_start:.0f} s')
    return check.finish(work)


if __name__ == '__main__':
    sys.exit(main())
