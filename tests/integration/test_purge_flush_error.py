#!/usr/bin/python3
"""A failed host flush on an NVDIMM with purged blocks: 'cont' redoes it
without touching the purged blocks, and a block whose purge is given up
reaches the disk.

The NVDIMM (4 MiB, flush-hint=on, purge-agent) lives on a host disk that
the test fills up (tests/lib/faultystore.py), so its writeback fails with
ENOSPC.  QEMU runs with the qtest accelerator; the test writes guest memory
and the flush hint itself, and plays the purge agent's client (hostd) with
tests/lib/purgeagent.py, so that the blocks' states are exact:

  P  purged:  swapped out and punched from the file (its copy would be on
              hostd's disk);
  M  moving:  the upper 2 MiB, written by the guest, then swapped out
              (a purge in flight);
  R  resident: written by the guest (and 1 MiB more);
  H  a hole of the file from the start, hidden by the agent.

The disk fills, the guest's flush fails, the VM stops (io-error).  Then the
client goes away, as if hostd had died, and the disk gets room again.
'cont' must return promptly and run the VM: recovery re-dirties every page
of the backend, and touching P or M would wait for a client that is not
there, with the BQL held (before this was fixed, 'cont' never returned).
Afterwards R is on the disk, P is still a hole, P and M still swapped out,
and M's data is not on the disk: Linux marked its pages clean when their
writeback failed.  A new client maps M back (hostd giving up its purge):
the agent dirties M's pages as it maps them and syncs the backend, so M's
data is on the disk at once.  The disk is read with O_DIRECT, and only where no
page of the range is dirty.

Then, with the real kvmx-hostd serving the NVDIMM: the disk is full, the
guest reads a purged block, hostd writes it back into the backend and
later syncs the backend to commit it; that sync fails.  The guest's next
flush must fail too.  (hostd got the backend's fd from QEMU; Linux keeps
one writeback-error cursor per open file, so a sync on QEMU's own file
would take the error and QEMU's flush would then report success: hostd
opens the backend again as a file of its own.)  Once there is room,
'cont' makes everything durable: the guest's write and the block hostd
brought back are on the disk.

Before both, without a purge agent: the guest writes into H, a hole of
the backend, and the flush that would allocate it fails.  ext4 leaves the
extent it allocated for the failed write unwritten, and writing the page
again does not convert it: after 'cont', H must be on the disk all the
same (QEMU's recovery rewrites such extents with O_DIRECT).  The block
hostd brings back under a full disk is the same case.

In the same part, 'cont' is tried first while the disk is still full: the
rewrite fails, and H must keep its data (a direct write drops the page
cache before it writes, and the failed writeback left the data nowhere
else: QEMU puts it back with a buffered write).  Before this was fixed, H
read zeros afterwards and the next 'cont' succeeded with them.

Last, ranges that a recovery skips because they are swapped out, over
extents a failed writeback left unwritten: GA and GB share a 2 MiB window
(and may share a page cache folio), GC lies in another.  They are holes of
the file, given back by the client, written by the guest; the flush fails;
the client swaps them out and goes away; 'cont' recovers the rest.  When
the client maps GA back, GA must be on the disk at once (the agent
rewrites and syncs what the recovery skipped) and GB, still swapped out,
must keep its data.  GC is mapped back while the disk is full again: the
map-back succeeds, the NVDIMM reports the failed rewrite as a failed
flush (the VM stops), GC keeps its data, and 'cont' puts it on the disk.

Needs root and loop devices (faultystore); exits 77 otherwise."""
import mmap
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'lib'))
import faultystore  # noqa: E402
import hostdctl  # noqa: E402
import kvmxtest  # noqa: E402
import kvmxvm  # noqa: E402
import pagecache  # noqa: E402
import purgeagent  # noqa: E402
import purgeqemu  # noqa: E402
from purgeqemu import BLOCK, content  # noqa: E402

SIZE = purgeqemu.SIZE
P, R = 5, 13
# H: a hole of the file from the start (never written): hidden by the
# agent like a purged block, and mapped back by hostd as a plain hole.
H = 3
# More than the store's slack (256 KiB) must be dirty for writeback to fail.
BULK = range(16, 32)
# M: the upper 2 MiB, swapped out as one range.  The page cache uses large
# folios (up to 2 MiB, naturally aligned): a folio that straddled M and a
# resident block would be written out again with that block.
M = range(32, 64)
M_OFF, M_LEN = M[0] * BLOCK, len(M) * BLOCK
# Holes of the file from the start, in map_back_unwritten only.
GA, GB, GC = range(32, 48), range(48, 64), range(8, 10)
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 1, 2
check = kvmxtest.Checks()


def punch(fd, off, length):
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.fallocate(fd, FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE,
                      ctypes.c_long(off), ctypes.c_long(length)):
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def on_disk(fs, block):
    """What the disk holds for a block, or None while some of its pages are
    dirty.  An O_DIRECT read: QEMU keeps the pages mapped, so they cannot
    be dropped from the page cache, and an O_DIRECT read would write dirty
    pages out first (hence the check): what it returns is what an earlier
    flush left on the disk."""
    cs = pagecache.cachestat(fs.path, block * BLOCK, BLOCK)
    if cs['dirty'] or cs['writeback']:
        return None
    buf = mmap.mmap(-1, BLOCK)
    fd = os.open(fs.path, os.O_RDONLY | os.O_DIRECT)
    try:
        n = os.preadv(fd, [buf], block * BLOCK)
        return bytes(buf[:n])
    finally:
        os.close(fd)
        buf.close()


def check_on_disk(fs, block, want, what):
    """Check that the disk holds `want` for a block (and that it is no
    hole); the message says what a reader of a failure needs: what the
    disk holds instead, the block's page-cache state, whether it is a
    hole."""
    got = on_disk(fs, block)
    hole = is_hole(fs.path, block)
    cs = pagecache.cachestat(fs.path, block * BLOCK, BLOCK)
    if got is None:
        state = 'pages still dirty or under writeback'
    elif got == want:
        state = 'right bytes'
    elif got == bytes(len(got)):
        state = 'zeros'
    else:
        bad = sum(got[i:i + 4096] != want[i:i + 4096]
                  for i in range(0, len(want), 4096))
        state = f'{bad} of {len(want) // 4096} pages differ'
    return check(got == want and not hole,
                 f'{what}: {state}; cache {cs}, hole {hole}')


def is_hole(path, block):
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            nxt = os.lseek(fd, block * BLOCK, os.SEEK_DATA)
        except OSError:
            return True     # ENXIO: no data after it
        return nxt >= (block + 1) * BLOCK
    finally:
        os.close(fd)


def write_bulk(q):
    for b in BULK:
        q.write(b, content(b, 2))


def bulk_on_disk(fs):
    return all(on_disk(fs, b) == content(b, 2) for b in BULK)


def flush(q, addr):
    q.cmd(f'writeq {addr:#x} 0x1')


def main():
    why = faultystore.unavailable()
    if why:
        kvmxvm.skip(why)
    qemu = kvmxvm.patched_qemu()
    work = kvmxtest.workdir('purge-flusherr-')
    for part in (sparse, agent_gone, hostd_sync, map_back_unwritten):
        print(f'-- {part.__name__}', flush=True)
        d = os.path.join(work, part.__name__)
        os.makedirs(d)
        with faultystore.FaultyStore(d, SIZE) as fs:
            with open(fs.path, 'r+b') as f:
                for b in range(SIZE // BLOCK):
                    f.write(content(b, 1))
                f.flush()
                os.fsync(f.fileno())
            fs.rearm()
            fd = os.open(fs.path, os.O_RDWR)
            punch(fd, H * BLOCK, BLOCK)
            if part is map_back_unwritten:
                for r in (GA, GB, GC):
                    punch(fd, r[0] * BLOCK, len(r) * BLOCK)
            os.close(fd)
            test_qmp = os.path.join(d, 'test.qmp')
            q = purgeqemu.Qemu(
                qemu, d, fs.path, 0,
                device='nvdimm,id=nv0,memdev=mem1,flush-hint=on',
                extra=['-qmp', f'unix:{test_qmp},server=on,wait=off'],
                agent=part is not sparse)
            qmp = None
            try:
                qmp = kvmxvm.Qmp(test_qmp)
                addr = qmp.cmd('query-nvdimm-flush')[0]['addresses'][0]
                part(q, qmp, fs, addr, d)
            finally:
                if qmp:
                    qmp.close()
                q.kill()
    return check.finish(work)


def fail_flush(q, qmp, fs, addr, what, slack_kib=256):
    """Fill the disk, flush: the flush must fail and stop the VM."""
    fs.fill(slack_kib)
    flush(q, addr)
    return wait_flush_error(qmp, what)


def try_cont(qmp):
    """'cont': the error (None when it succeeded) and the seconds taken."""
    t0 = time.monotonic()
    try:
        qmp.cmd('cont', timeout=30)
        err = None
    except (kvmxvm.QmpError, TimeoutError, OSError) as e:
        err = f'{type(e).__name__}: {e}'
    return err, time.monotonic() - t0


def cont(qmp, what):
    err, took = try_cont(qmp)
    check(err is None and took < 20,
          f"'cont' returned in {took:.1f} s {what} ({err or 'ok'})")
    if err is None:
        st = qmp.cmd('query-status')
        check(st['running'], f'the VM runs again ({st["status"]})')
    return err is None


def cont_refused(qmp, what):
    """'cont' must fail promptly and leave the VM stopped."""
    err, took = try_cont(qmp)
    st = qmp.cmd('query-status')
    check(err is not None and 'QmpError' in err and took < 20 and
          not st['running'],
          f"'cont' {what} is refused in {took:.1f} s ({err}); the VM "
          f"stays stopped ({st['status']})")


def wait_flush_error(qmp, what):
    try:
        ev = qmp.wait_event('NVDIMM_FLUSH_ERROR', 30)['data']
    except Exception as e:      # noqa: BLE001 (any way of not seeing it)
        ev = f'none ({type(e).__name__})'
    ok = check(isinstance(ev, dict) and ev['id'] == 'nv0' and
               ev['action'] == 'stop', f'{what}: NVDIMM_FLUSH_ERROR ({ev})')
    if ok:
        qmp.wait_event('STOP', 30)
        check(qmp.cmd('query-status')['status'] == 'io-error',
              'the VM stopped with io-error')
    return ok


def sparse(q, qmp, fs, addr, work):
    """No purge agent: the guest writes into H, a hole of the backend, and
    the flush that would allocate it fails.  ext4 allocates the block as
    an unwritten extent and leaves it so when the write fails; dirtying
    the page again is not enough (its next writeback leaves the extent
    unwritten, and the data reads back as zeros).  'cont' must make H's
    data durable all the same."""
    q.write(H, content(H, 2))
    write_bulk(q)
    # No slack: H's writeback fails for certain.
    if not fail_flush(q, qmp, fs, addr, 'the disk is full', slack_kib=0):
        return
    # The rewrite of H fails too while the disk is full; its direct write
    # dropped H's only copy from the page cache, and QEMU must put it back.
    cont_refused(qmp, 'while the disk is still full')
    check(q.read(H) == content(H, 2),
          'H keeps its data after the failed rewrite')
    fs.free()
    if not cont(qmp, 'once there is room'):
        return
    check(bulk_on_disk(fs), "the guest's writes are on the disk")
    check_on_disk(fs, H, content(H, 2),
                  'H, a hole the guest wrote into, is on the disk')


def agent_gone(q, qmp, fs, addr, work):
    agent = purgeagent.Agent(q.agent)
    hello = agent.request(purgeagent.HELLO)
    check(hello.status == 0 and hello.fds, 'agent HELLO gives the backend fd')
    bfd = hello.fds[0]

    # P: purged.  Its copy would be durable on hostd's disk; here the test
    # keeps it.  Swapped out first, then punched (hostd's order).
    r = agent.request(purgeagent.SWAP_OUT, P * BLOCK, BLOCK)
    punch(bfd, P * BLOCK, BLOCK)
    check(r.status == 0 and is_hole(fs.path, P), 'P swapped out and punched')
    # M and R: new data from the guest, not yet on the disk.
    for blk in M:
        q.write(blk, content(blk, 2))
    q.write(R, content(R, 2))
    write_bulk(q)
    r = agent.request(purgeagent.SWAP_OUT, M_OFF, M_LEN)
    dirty = [pagecache.cachestat(fs.path, M_OFF, M_LEN)['dirty'],
             pagecache.cachestat(fs.path, R * BLOCK, BLOCK)['dirty']]
    check(r.status == 0 and dirty == [M_LEN // 4096, BLOCK // 4096],
          f'M swapped out with unflushed data (purge in flight); M and R '
          f'dirty in the page cache ({dirty})')

    if not fail_flush(q, qmp, fs, addr, 'the disk is full'):
        return
    agent.close()           # hostd is gone: nobody answers a fault now
    fs.free()
    if not cont(qmp, 'with nobody serving the purged blocks'):
        return
    swapped = qmp.cmd('qom-get', path='/objects/mem1',
                      property='x-purge-swapped')
    check(swapped == 2 * BLOCK + M_LEN,
          f'H, P and M are still swapped out ({swapped} bytes)')
    check(is_hole(fs.path, P), 'P is still a hole: recovery did not write it')
    check(on_disk(fs, R) == content(R, 2) and bulk_on_disk(fs),
          'R and the rest written before the failed flush are on the disk')
    lost = [blk for blk in M if on_disk(fs, blk) != content(blk, 2)]
    check(len(lost) == len(M), f"M's writeback failed: none of its {len(M)} "
          f'blocks is on the disk ({len(M) - len(lost)} are)')

    # hostd comes back and gives up M's purge: the range is mapped back.
    agent = purgeagent.Agent(q.agent)
    agent.request(purgeagent.HELLO)
    r = agent.request(purgeagent.MAP_BACK, M_OFF, M_LEN)
    lost = [blk for blk in M if on_disk(fs, blk) != content(blk, 2)]
    check(r.status == 0 and not lost,
          f"M mapped back ({r.status}), and its data is on the disk at once: "
          f"the agent wrote out what the recovery skipped (blocks not: {lost})")
    check(all(q.read(blk) == content(blk, 2) for blk in M),
          'M reads its data')
    flush(q, addr)
    check(qmp.cmd('query-status')['running'] and
          not qmp.cmd('query-nvdimm-flush')[0].get('error'),
          'the next guest flush succeeds')
    lost = [blk for blk in M if on_disk(fs, blk) != content(blk, 2)]
    check(not lost, f"after it, M's data is on the disk (blocks not: {lost})")
    # H was skipped by recovery too; mapped back, it must stay a hole: a
    # sparse backend is not to be allocated by the rewrite.
    r = agent.request(purgeagent.MAP_BACK, H * BLOCK, BLOCK)
    check(r.status == 0 and is_hole(fs.path, H) and
          q.read(H) == bytes(BLOCK),
          'H, a hole, mapped back: still a hole, reads as zeros')
    agent.close()


def file_bytes(fs, blocks):
    """What a buffered read of the file gives (the page cache first)."""
    fd = os.open(fs.path, os.O_RDONLY)
    try:
        return os.pread(fd, len(blocks) * BLOCK, blocks[0] * BLOCK)
    finally:
        os.close(fd)


def want(blocks):
    return b''.join(content(b, 2) for b in blocks)


def map_back_unwritten(q, qmp, fs, addr, work):
    agent = purgeagent.Agent(q.agent)
    agent.request(purgeagent.HELLO)
    # The holes are hidden at start; given back, they are plain holes.
    for r in (GA, GB, GC):
        rep = agent.request(purgeagent.MAP_BACK, r[0] * BLOCK, len(r) * BLOCK)
        check(rep.status == 0 and is_hole(fs.path, r[0]),
              f'blocks {r[0]}-{r[-1]}, a hole, given back')
    for r in (GA, GB, GC):
        for b in r:
            q.write(b, content(b, 2))
    write_bulk(q)
    if not fail_flush(q, qmp, fs, addr, 'the disk is full', slack_kib=0):
        return
    # A purge in flight: the ranges are swapped out while the VM is stopped.
    for r in (GA, GB, GC):
        rep = agent.request(purgeagent.SWAP_OUT, r[0] * BLOCK, len(r) * BLOCK)
        check(rep.status == 0, f'blocks {r[0]}-{r[-1]} swapped out')
    agent.close()
    fs.free()
    if not cont(qmp, 'with GA, GB and GC swapped out'):
        return
    swapped = qmp.cmd('qom-get', path='/objects/mem1',
                      property='x-purge-swapped')
    check(swapped == BLOCK * (1 + len(GA) + len(GB) + len(GC)),
          f'H, GA, GB and GC are still swapped out ({swapped} bytes)')
    lost = [b for r in (GA, GB, GC) for b in r
            if on_disk(fs, b) != content(b, 2)]
    check(len(lost) == len(GA) + len(GB) + len(GC),
          f'their writeback failed and the recovery skipped them: none of '
          f'their blocks is on the disk ({len(lost)} are not)')

    agent = purgeagent.Agent(q.agent)
    agent.request(purgeagent.HELLO)
    rep = agent.request(purgeagent.MAP_BACK, GA[0] * BLOCK, len(GA) * BLOCK)
    check(rep.status == 0, f'GA mapped back ({rep.status})')
    for b in GA:
        if not check_on_disk(fs, b, content(b, 2),
                             f'GA block {b} is on the disk right after '
                             f'its map-back'):
            break
    check(file_bytes(fs, GB) == want(GB),
          'GB, still swapped out, keeps its data')
    check(all(q.read(b) == content(b, 2) for b in GA), 'GA reads its data')
    st = qmp.cmd('query-status')
    check(st['running'], f"the VM still runs ({st['status']})")
    rep = agent.request(purgeagent.MAP_BACK, GB[0] * BLOCK, len(GB) * BLOCK)
    check(rep.status == 0 and all(on_disk(fs, b) == content(b, 2)
                                  for b in GB),
          f'GB mapped back ({rep.status}) and on the disk')

    # GC, with the disk full: its rewrite fails.
    fs.fill(slack_kib=0)
    rep = agent.request(purgeagent.MAP_BACK, GC[0] * BLOCK, len(GC) * BLOCK)
    check(rep.status == 0, f'GC mapped back with the disk full '
          f'({rep.status}): the vCPUs that wait on it go on')
    if not wait_flush_error(qmp, 'the failed rewrite of GC is reported as '
                            'a failed flush'):
        return
    check(all(q.read(b) == content(b, 2) for b in GC),
          'GC keeps its data after the failed rewrite')
    fs.free()
    if not cont(qmp, 'once there is room'):
        return
    for b in GC:
        check_on_disk(fs, b, content(b, 2), f'GC block {b} is on the disk')
    check(not qmp.cmd('query-nvdimm-flush')[0].get('error'),
          'the NVDIMM has no flush error left')
    agent.close()


def hostd_sync(q, qmp, fs, addr, work):
    hostd = hostdctl.Hostd(work)
    hostd.start()
    try:
        hostd_sync_run(hostd, q, qmp, fs, addr, work)
    finally:
        hostd.kill()


def status(hostd):
    r = hostd.call('purge-status', vm='fe', nvdimm='mem1')
    return (r.get('result', {}).get('nvdimms') or [{}])[0]


def hostd_sync_run(hostd, q, qmp, fs, addr, work):
    r = hostd.call('attach', vm='fe', qmp=q.hostd_qmp)
    check('result' in r, f'hostd attaches the VM ({r})')
    hostd.wait_vm('fe', lambda v: v['state'] == 'attached', 60)
    r = hostd.call('purge-policy', vm='fe', nvdimm='mem1', block_size=BLOCK,
                   table_dir=work)
    check('result' in r, f'purging enabled, table off the full disk ({r})')
    r = hostd.call('purge-now', vm='fe', nvdimm='mem1', first=P, count=1,
                   ignore_idle=True)
    check(r.get('result', {}).get('blocks') == 1 and is_hole(fs.path, P),
          f'hostd purged P ({r})')
    q.write(R, content(R, 2))
    write_bulk(q)

    # No slack: the writeback of P, which allocates its blocks, fails for
    # certain (with some, it may land before the store is full).
    fs.fill(slack_kib=0)
    before = status(hostd).get('errors', {}).get('commit', 0)
    # The guest reads P: hostd writes it back into the backend and, within
    # seconds, syncs the backend to commit it; the sync fails.
    got = q.read(P)
    check(got == content(P, 1), 'the guest reads P right after its '
          'fault-back')
    deadline = time.monotonic() + 30
    while (status(hostd).get('errors', {}).get('commit', 0) == before and
           time.monotonic() < deadline):
        time.sleep(0.2)
    after = status(hostd).get('errors', {}).get('commit', 0)
    check(after > before, f"hostd's sync of the backend failed and was "
          f'counted (commit errors {before} -> {after})')
    if not fail_flush(q, qmp, fs, addr,
                      "after hostd's sync saw the write error, the guest's "
                      "flush still fails"):
        return
    fs.free()
    if not cont(qmp, 'once there is room'):
        return
    check(on_disk(fs, R) == content(R, 2) and bulk_on_disk(fs),
          "the guest's writes are on the disk")
    check_on_disk(fs, P, content(P, 1),
                  'the block hostd brought back is on the disk')


if __name__ == '__main__':
    sys.exit(main())
