#!/usr/bin/python3
"""Disk-backed page dedup (issue 13, item 6 and the fault tests of item 5)
between patched QEMUs under TCG, with the Debian test guest on a
virtio-blk disk that both QEMUs open from one image file (shared storage
on one host: the destination, started with -incoming, keeps its image
inactive and takes no lock until the migration completes).

The host builds an ext4 image without root (`mkfs.ext4 -d`) holding
DATA_MIB of random files whose md5s it knows, and a qcow2 copy of it.
The guest mounts it, reads every file into its page cache and then
answers commands on its serial port (md5 of every file, overwrite rounds).
Each case is one migration of that guest ("a hop"); a chain of hops moves
one booted guest from QEMU to QEMU, so the page cache it read on the first
one travels the whole chain (and with dedup the destination's own records
for the pages it placed from the disk serve the next hop).

Every completed hop checks, with the destination still paused: pmemsave
of the whole guest RAM on the paused source equals that of the
destination, byte for byte; then the destination runs and the guest's md5
of every file equals the host's.

 raw chain, in this order
  base        precopy (max-bandwidth BW), unix socket; a third QEMU cannot
              open the image meanwhile (locking is on)
  modified    blocks of a cached file changed in the image behind QEMU's
              back (host pwrite) after the guest read them: the migration
              either completes with identical memory or fails with an
              error naming the block (QEMU 07-disk-dedup fails it), never
              a wrong page; the blocks are restored afterwards
  modified-postcopy  the same with another file, switched to post-copy
              once the source was asked to send a page again: the page
              comes through post-copy's discard and fault path
  file-modified  blocks of another cached file changed in the image, then
              `stop` and save to a file (no return path), restore: the
              source checks each reference against its own disk and saves
              the changed pages in full; the restore completes with
              identical memory (the blocks are restored afterwards)
  unreadable  the destination reads its image through blkdebug, which fails
              the first read of each of 64 blocks of a cached file (EIO):
              the same outcomes
              (these two come right after base, while the source holds a
              record of every cached block: a destination has records of
              the pages it placed from references and of what its guest
              read since)
  overwrite   the guest rewrites ~10% of its cached pages through the page
              cache and ~10% of the disk blocks with O_DIRECT while the
              migration runs
  multifd     the same (another round of writes) with multifd, two
              channels: references on the main channel, pages in full on
              the others; a page sent in one form and then, rewritten, in
              the other must end up as the guest left it
  postcopy    the same (another round of writes) with postcopy-ram and
              migrate-start-postcopy once POSTCOPY_AFTER bytes or
              POSTCOPY_AFTER_REFS references went (references stop at
              the switch); the destination stays paused (-S), so its RAM
              can be compared when post-copy completes
  different   the destination opens another image of the same size with
              other contents: with dedup the disk is refused and the
              migration goes on without it (a dead end: that destination
              is dropped)
 qcow2 chain
  qcow2       precopy of a guest on the qcow2 image
  file        the guest reads 10 files (f1*) with O_DIRECT, swabbing each 1 MiB
              buffer at once (records fingerprinted late take the changed
              page), then `stop`, migrate to file:PATH, restore into a new
              QEMU (-incoming defer, migrate-incoming file:PATH): the
              restore completes
  src-killed  the source SIGKILLed mid-migration (with dedup: references
              on the way): the destination, which would run the guest on
              completion, fails or exits with an error and never runs
 scsi chain (the raw image as the raw chain left it)
  scsi        precopy of a guest whose disk is a scsi-hd on virtio-scsi
              (tracked through the same disk-dedup property)
  scsi-overwrite  the same while the guest rewrites ~10% of its cached
              pages and ~10% of the disk (another round)

A failed hop (allowed only where said) leaves the guest on its source,
and the chain goes on from there.

Usage: test_disk_dedup.py [--dedup=on|off] [--chains=raw,qcow2,scsi]
  on (default)  migrations use the `disk-dedup` capability and a
                kvmx-disk-dedup object tracks the disk's reads; the test
                skips (77) when this QEMU lacks either
  off           the same cases with plain migrations: the baseline (bytes
                on the wire to compare with), and everything but the dedup
                assertions, which are marked `[dedup]` below
  --chains      which chains of cases to run (default: all three)
"""
import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
import traceback

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'lib'))
import kvmxtest  # noqa: E402
import kvmxvm  # noqa: E402
import dedupdisk  # noqa: E402
from dedupdisk import dedup_support, run, tracking  # noqa: E402
from migwork import wait_status  # noqa: E402

MIB = 1 << 20
PAGE = 4096
DATA_MIB = 256                  # random files on the disk (CI size)
PAT_MIB = 8                     # /p/pat: the bytes overwrite rounds write
IMAGE_MIB = DATA_MIB + DATA_MIB // 4 + PAT_MIB + 32
FILE_SIZES_MIB = (1, 2, 3, 4, 5, 6, 7, 8, 12, 16)   # cycled; every 3rd - 1234
SWAB_MIB = sum(FILE_SIZES_MIB)   # the file case's O_DIRECT reads: f10-f19
GUEST_MEM = 768 * MIB           # all below 4 GiB on q35: one pmemsave
DEDUP_MEM = '16M'               # kvmx-disk-dedup max-memory
BW = 64 * MIB                   # precopy max-bandwidth
POSTCOPY_BW = 32 * MIB          # precopy part of the post-copy case
POSTCOPY_AFTER = 128 * MIB      # switch after this much was sent,
MODIFIED_POSTCOPY_REFS = 60000  # modified-postcopy: switch after these
POSTCOPY_AFTER_REFS = 8192      # or this many pages went as references
MULTIFD_CHANNELS = 2            # multifd case
KILL_BW = 16 * MIB              # src-killed: slow enough to kill mid-way,
KILL_REFS = 4096                # and with dedup, references on the way
AIO = 'threads'                 # with cache.direct=on (cache=none)
DONE = ('completed', 'failed', 'cancelled')

INVERT = bytes(255 - b for b in range(256))     # the other image's bytes

check = kvmxtest.Checks()
DEDUP = True                    # --dedup=on|off
BUS = 'virtio-blk'              # the disk's device; the scsi chain: 'scsi'


def dd_check(cond, what):
    """A dedup-specific assertion: only with --dedup=on."""
    if DEDUP:
        return check(cond, f'[dedup] {what}')
    return True


# -- the disk -----------------------------------------------------------------
class Disk:
    """The images and what the host knows about their files."""

    def __init__(self, work):
        self.work = work
        self.data = {}          # name -> bytearray: the guest's view
        self.raw = os.path.join(work, 'disk.raw')
        self.qcow2 = os.path.join(work, 'disk.qcow2')
        self.other = os.path.join(work, 'other.raw')

    def build(self, qemu_img):
        t0 = time.monotonic()
        root = os.path.join(self.work, 'root')
        other = os.path.join(self.work, 'other-root')
        for r in (root, other):
            for d in ('d', 'p'):
                os.makedirs(os.path.join(r, d))
        total, i = 0, 0
        while total < DATA_MIB * MIB:
            size = FILE_SIZES_MIB[i % len(FILE_SIZES_MIB)] * MIB
            if i % 3 == 1:
                size -= 1234            # a partial last page
            size = min(size, DATA_MIB * MIB - total)
            name = f'f{i:02d}'
            self.data[name] = bytearray(os.urandom(size))
            for r, content in ((root, self.data[name]),
                               (other, self.data[name].translate(INVERT))):
                with open(os.path.join(r, 'd', name), 'wb') as f:
                    f.write(content)
            total += size
            i += 1
        self.pat = os.urandom(PAT_MIB * MIB)
        for r, content in ((root, self.pat), (other, self.pat.translate(INVERT))):
            with open(os.path.join(r, 'p', 'pat'), 'wb') as f:
                f.write(content)
        for r, img in ((root, self.raw), (other, self.other)):
            run(['mkfs.ext4', '-q', '-F', '-b', '4096', '-L', 'kvmxdedup',
                 '-E', 'lazy_itable_init=0,lazy_journal_init=0', '-d', r,
                 img, f'{IMAGE_MIB}M'])
            shutil.rmtree(r)
        run([qemu_img, 'convert', '-f', 'raw', '-O', 'qcow2', self.raw,
             self.qcow2])
        self.pristine = {n: hashlib.md5(d).hexdigest()
                         for n, d in self.data.items()}
        print(f'note  images: {len(self.data)} files, {total / MIB:.0f} MiB '
              f'of random data, raw {IMAGE_MIB} MiB, qcow2 '
              f'{os.path.getsize(self.qcow2) / MIB:.0f} MiB, built in '
              f'{time.monotonic() - t0:.1f} s', flush=True)

    def md5s(self):
        return {n: hashlib.md5(d).hexdigest() for n, d in self.data.items()}

    def blocks(self, img, name):
        """Block numbers (4 KiB) of /d/NAME in the ext4 image, in file order."""
        out = run(['debugfs', '-R', f'blocks /d/{name}', img]).stdout
        return [int(b) for b in out.split()]

    # The overwrite rounds: ~10% of each file's pages through the page cache
    # (4 KiB dd, first half of the file), and 1 MiB with O_DIRECT near the
    # end of every file of 4 MiB or more (~10% of the blocks), each from
    # /p/pat; 8 MiB into /dev/shm for anonymous memory.
    def overwrite_ops(self, rnd):
        ops = []
        for i, (name, d) in enumerate(sorted(self.data.items())):
            pages = len(d) // PAGE
            n = max(1, pages // 10)
            skip = (i * 13 + rnd * 7) % (PAT_MIB * MIB // PAGE - n)
            ops.append((name, PAGE, skip, (rnd - 1) * n, n, False))
            mibs = len(d) // MIB
            if mibs >= 4:
                ops.append((name, MIB, (i + rnd) % PAT_MIB,
                            mibs - rnd, 1, True))
        return ops

    def overwrite_shell(self, rnd):
        lines = [f'overwrite_{rnd}() {{']
        for name, bs, skip, seek, count, direct in self.overwrite_ops(rnd):
            lines.append(f'  dd if=/mnt/p/pat of=/mnt/d/{name} bs={bs} '
                         f'skip={skip} seek={seek} count={count} conv=notrunc'
                         f'{" oflag=direct" if direct else ""} 2>/dev/null '
                         f'|| echo "OVERWRITE-FAILED {name}"')
        lines.append(f'  dd if=/mnt/p/pat of=/dev/shm/anon{rnd} bs=1M '
                     f'count={PAT_MIB} 2>/dev/null')
        lines.append('}')
        return '\n'.join(lines) + '\n'

    def apply_overwrite(self, rnd):
        """The host's copy of what round `rnd` did; returns (cached pages,
        disk blocks) it wrote as fractions of the data."""
        buffered = direct = 0
        for name, bs, skip, seek, count, is_direct in self.overwrite_ops(rnd):
            d = self.data[name]
            src = self.pat[skip * bs:(skip + count) * bs]
            d[seek * bs:seek * bs + len(src)] = src
            if is_direct:
                direct += len(src)
            else:
                buffered += len(src)
        total = sum(len(d) for d in self.data.values())
        return buffered / total, direct / total


# -- the guest ----------------------------------------------------------------
def guest_script(disk):
    dev = '/dev/sda' if BUS == 'scsi' else '/dev/vda'
    return ''.join(disk.overwrite_shell(r) for r in (1, 2, 3, 4)) + f'''
mount -o noatime {dev} /mnt || {{ echo "MOUNT-FAILED"; exit 1; }}''' + r'''
t=$(date +%s)
cat /mnt/d/* > /dev/null
echo "CACHED $(( $(date +%s) - t )) s, $(grep '^Cached' /proc/meminfo | tr -s ' ')"
echo READY
while read -r cmd arg; do
  case "$cmd" in
    md5) (cd /mnt/d && md5sum *) | sed 's/^/MD5 /'; echo "MD5-END $arg" ;;
    overwrite)
      echo "OVERWRITE-START $arg"
      overwrite_$arg
      sync
      echo "OVERWRITE-DONE $arg" ;;
    swab)
      # O_DIRECT reads of 1 MiB, each swabbed in its buffer at once (a
      # database reusing its buffer): reads of more than 32 blocks are
      # fingerprinted later by the tracker's thread, so some records take
      # the changed page as the block's content.
      for f in /mnt/d/f1*; do
        dd if=$f of=/dev/null bs=1M iflag=direct conv=swab 2>/dev/null
      done
      echo "SWAB-DONE $arg" ;;
  esac
done
'''


def image_args(img, fmt, blkdebug=None):
    """-blockdev for the disk (node d0); blkdebug: its inject-error list."""
    f = (f'{{"driver":"file","filename":"{img}","cache":{{"direct":true}},'
         f'"aio":"{AIO}"}}')
    if blkdebug is not None:
        f = ('{"driver":"blkdebug","inject-error":[' + ','.join(
            f'{{"event":"read_aio","iotype":"read","errno":5,"sector":{s},'
            f'"once":true}}'
            for s in blkdebug) + f'],"image":{f}}}')
    return ['-blockdev', f'{{"driver":"{fmt}","node-name":"d0",'
                         f'"cache":{{"direct":true}},"file":{f}}}']


def disk_id():
    return 'sd0' if BUS == 'scsi' else 'vd0'


def vm_args(img, fmt, blkdebug=None):
    if BUS == 'scsi':
        hba = ['-device', 'virtio-scsi-pci,id=scsi0']
        dev = 'scsi-hd,drive=d0,id=sd0'
    else:
        hba = []
        dev = 'virtio-blk-pci,drive=d0,id=vd0'
    args = image_args(img, fmt, blkdebug)
    if DEDUP:
        args = ['-object', f'kvmx-disk-dedup,id=dd0,max-memory={DEDUP_MEM}'] \
            + args
        dev += ',disk-dedup=dd0'
    return args + hba + ['-device', dev]


def boot(qemu, work, name, disk, img, fmt):
    vm = kvmxvm.start_guest(qemu, guest_script(disk), vm_args(img, fmt),
                            work, name, mem=f'{GUEST_MEM // MIB}M',
                            append_extra='kvmx.modules=' +
                            ('virtio_scsi,sd_mod,ext4' if BUS == 'scsi'
                             else 'virtio_blk,ext4'))
    t0 = time.monotonic()
    m = vm.wait_console(r'CACHED (.*)\n', 300)
    vm.wait_console(r'READY\n', 30)
    print(f'note  {name}: booted and read {DATA_MIB} MiB into the page cache '
          f'({m[1]}; {time.monotonic() - t0:.0f} s after the start)',
          flush=True)
    if DEDUP:
        # --- dedup-specific: the reads were tracked --------------------------
        st = tracking(vm)
        print(f'note  {name}: tracking {st}')
        dd_check(st.get('records', 0) >= DATA_MIB * MIB // PAGE // 2,
                 f'{name}: the guest\'s reads were recorded '
                 f'({st.get("records")} records, {st.get("recorded")} '
                 f'recorded, capacity {st.get("capacity")})')
        # Every page read reaches the table or is counted as dropped (the
        # log of completed reads was full): none is lost on the way.
        dd_check(st.get('recorded', 0) + st.get('dropped', 0) >=
                 DATA_MIB * MIB // PAGE,
                 f'{name}: every page the guest read was recorded or counted '
                 f'as dropped ({st.get("recorded")} recorded, '
                 f'{st.get("dropped")} dropped, {DATA_MIB * MIB // PAGE} '
                 f'pages of files)')
        imgs = st.get('images', [])
        dd_check(any(disk_id() in i.get('device', '') for i in imgs),
                 f'{name}: the disk is listed ({imgs})')
    return vm


def incoming(qemu, work, name, img, fmt, paused=True, blkdebug=None):
    args = vm_args(img, fmt, blkdebug) + ['-incoming', 'defer']
    if paused:
        args.append('-S')
    return kvmxvm.start_guest(qemu, None, args, work, name,
                              mem=f'{GUEST_MEM // MIB}M')


def set_caps(vm, caps):
    vm.qmp.cmd('migrate-set-capabilities', capabilities=[
        {'capability': k, 'state': v} for k, v in caps.items()])


def live_caps(postcopy=False, return_path=True, multifd=False):
    """Every capability a hop uses, on or off: a QEMU that was the
    destination of an earlier hop keeps what was set there."""
    caps = {'return-path': return_path, 'postcopy-ram': postcopy,
            'multifd': multifd, 'events': True}
    if DEDUP:
        caps['disk-dedup'] = True
    return caps


def guest_md5(vm, tag, timeout=180):
    """Ask the guest for the md5 of every file; returns {name: md5}."""
    mark = len(vm.console_text())
    vm.send_serial(f'md5 {tag}\n')
    vm.wait_console(rf'MD5-END {tag}\n', timeout, start=mark)
    text = vm.console_text()[mark:]
    return dict((m[2], m[1]) for m in
                re.finditer(r'^MD5 ([0-9a-f]{32})\s+(\S+)$', text, re.M))


def md5_check(vm, disk, what, tag):
    t0 = time.monotonic()
    got = guest_md5(vm, tag)
    want = disk.md5s()
    bad = sorted(n for n in want if got.get(n) != want[n])
    check(not bad and len(got) == len(want),
          f'{what}: the guest reads all {len(want)} files with the host\'s '
          f'md5 ({len(got)} reported, wrong: {bad[:8]}; '
          f'{time.monotonic() - t0:.0f} s)')


def pmemsave(vm, path):
    vm.qmp.cmd('pmemsave', val=0, size=GUEST_MEM, filename=path, timeout=120)


def mem_dir(work):
    """Where the pmemsave files go: /dev/shm when it has room (nothing
    to write back), else the work directory."""
    try:
        st = os.statvfs('/dev/shm')
        if st.f_bavail * st.f_frsize > 4 * GUEST_MEM:
            return '/dev/shm'
    except OSError:
        pass
    return work


def same_memory(src, dst, work, what):
    """pmemsave of the whole RAM of both (paused) QEMUs, compared."""
    a, b = (os.path.join(mem_dir(work), f'kvmx-dedup-{os.getpid()}-{n}.bin')
            for n in ('src', 'dst'))
    t0 = time.monotonic()
    for vm, path in ((src, a), (dst, b)):
        st = vm.qmp.cmd('query-status')['status']
        if st == 'running':
            check(False, f'{what}: {vm.name} is paused for pmemsave ({st})')
            return False
        pmemsave(vm, path)
    diff = []
    with open(a, 'rb') as fa, open(b, 'rb') as fb:
        off = 0
        while True:
            x, y = fa.read(MIB), fb.read(MIB)
            if not x and not y:
                break
            if x != y:
                for p in range(0, max(len(x), len(y)), PAGE):
                    if x[p:p + PAGE] != y[p:p + PAGE]:
                        diff.append(off + p)
            off += MIB
    ok = check(not diff and off == GUEST_MEM,
               f'{what}: the destination\'s RAM equals the source\'s, byte '
               f'for byte ({off // MIB} MiB compared in '
               f'{time.monotonic() - t0:.1f} s, {len(diff)} pages differ{": " + ", ".join(hex(d) for d in diff[:8]) if diff else ""})')
    for p in (a, b):
        os.unlink(p)
    return ok


def dedup_stats(src_info, dst_info):
    s = src_info.get('disk-dedup') or {}
    d = dst_info.get('disk-dedup') or {}
    out = {k: s.get(k) for k in ('pages-as-reference', 'bytes-saved',
                                 'images-refused', 'refused-reason')}
    # The destination's own numbers (the source's query-migrate carries
    # those of its own last incoming migration, if any).
    out.update({k: d.get(k) for k in (
        'references-resolved', 'mismatches', 'read-errors', 'read-time-ms',
        'disk-reads')})
    return out


def numbers(what, info, dd=None, extra=''):
    ram = info.get('ram', {})
    s = (f'numbers {what}: {info.get("status")}, '
         f'{ram.get("transferred", 0) / MIB:.1f} MiB on the wire, '
         f'{ram.get("normal", 0)} pages in full, '
         f'{ram.get("duplicate", 0)} zero pages, '
         f'total {info.get("total-time", 0)} ms, '
         f'downtime {info.get("downtime", 0)} ms')
    if dd is not None:
        s += (f'; pages as reference {dd.get("pages-as-reference")}, '
              f'bytes saved {dd.get("bytes-saved")}, images refused '
              f'{dd.get("images-refused")}'
              + (f' ({dd["refused-reason"]})' if dd.get('refused-reason')
                 else '') +
              f', resolved '
              f'{dd.get("references-resolved")}, mismatches '
              f'{dd.get("mismatches")}, read errors {dd.get("read-errors")}, '
              f'read time {dd.get("read-time-ms")} ms in '
              f'{dd.get("disk-reads")} reads')
    print(s + extra, flush=True)


# -- one hop ------------------------------------------------------------------
class Hop:
    """A live migration from `src` to a fresh destination; run() returns
    the source's final query-migrate."""

    def __init__(self, qemu, work, name, src, img, fmt, paused=True,
                 blkdebug=None):
        self.name = name
        self.src = src
        self.sock = os.path.join(work, f'{name}.sock')
        self.dst = incoming(qemu, work, f'{name}-dst', img, fmt, paused,
                            blkdebug)
        self.t0 = None

    def start(self, caps, params):
        set_caps(self.dst, caps)
        self.dst.qmp.cmd('migrate-incoming', uri=f'unix:{self.sock}')
        set_caps(self.src, caps)
        self.src.qmp.cmd('migrate-set-parameters', **params)
        self.t0 = time.monotonic()
        self.src.qmp.cmd('migrate', uri=f'unix:{self.sock}')

    def finish(self, timeout=300):
        st, sinfo = wait_status(self.src, DONE, timeout)
        dinfo = {}
        if self.dst.returncode is None:
            try:
                _, dinfo = wait_status(self.dst, DONE, 60)
            except (kvmxvm.QmpError, OSError):
                pass
        dd = dedup_stats(sinfo, dinfo) if DEDUP else {}
        numbers(self.name, sinfo, dd if DEDUP else None,
                f', {time.monotonic() - self.t0:.1f} s wall')
        return st, sinfo, dinfo, dd


def stop_vm(vm):
    if vm is not None:
        vm.kill()
        vm.shutdown(timeout=5)


# -- the cases ----------------------------------------------------------------
def case_base(qemu, work, disk, src, img, fmt, name):
    """Plain precopy.  Returns the destination (running) or None."""
    hop = Hop(qemu, work, name, src, img, fmt)
    if name == 'base':
        locking_check(qemu, work, img, fmt)
    hop.start(live_caps(), {'max-bandwidth': BW})
    st, sinfo, dinfo, dd = hop.finish()
    return conclude(hop, st, sinfo, disk, name, dd)


def conclude(hop, st, sinfo, disk, name, dd, md5=True, min_refs=None,
             max_mismatches=0):
    """The checks every completed hop makes; the old source is stopped.
    min_refs: pages that must have gone as references (default: half of
    the data; 0: no check).  max_mismatches: references the destination
    may find not matching (a block the guest rewrote after the source sent
    its reference: the page is sent again in full)."""
    check(st == 'completed', f'{name}: migration {st} '
          f'({sinfo.get("error-desc", "")})')
    if st != 'completed':
        # The chain goes on from the source if it still runs.
        stop_vm(hop.dst)
        if hop.src.returncode is None and \
                hop.src.qmp.cmd('query-status')['status'] == 'running':
            return hop.src
        return None
    if DEDUP and min_refs != 0:
        # --- dedup-specific: the cached files went as references -------------
        data_pages = DATA_MIB * MIB // PAGE
        if min_refs is None:
            min_refs = data_pages // 2
        refs = dd.get('pages-as-reference') or 0
        dd_check(refs >= min_refs,
                 f'{name}: the cached data went as references ({refs} pages '
                 f'of {data_pages}, want >= {min_refs})')
        mism = dd.get('mismatches') or 0
        dd_check((dd.get('references-resolved') or 0) + mism == refs and
                 mism <= max_mismatches and
                 (dd.get('bytes-saved') or 0) > 0 and
                 not dd.get('read-errors'),
                 f'{name}: the destination resolved every one, or found it '
                 f'changed where the guest wrote (at most {max_mismatches}) '
                 f'({dd.get("references-resolved")} resolved, '
                 f'{dd.get("mismatches")} mismatches, '
                 f'{dd.get("read-errors")} read errors, '
                 f'{dd.get("bytes-saved")} bytes saved)')
    same_memory(hop.src, hop.dst, os.path.dirname(hop.sock), name)
    stop_vm(hop.src)
    hop.dst.qmp.cmd('cont')
    if md5:
        md5_check(hop.dst, disk, name, name)
    return hop.dst


def locking_check(qemu, work, img, fmt):
    """QEMU's image locking is on: a third QEMU cannot open the image the
    running source and the (inactive) incoming destination share."""
    p = subprocess.run([qemu, '-machine', 'q35', '-nodefaults', '-display',
                        'none', '-S', '-qmp', 'stdio'] + image_args(img, fmt) +
                       ['-device', 'virtio-blk-pci,drive=d0'],
                       input='{"execute":"qmp_capabilities"}\n'
                             '{"execute":"quit"}\n',
                       capture_output=True, text=True, timeout=30)
    check(p.returncode != 0 and 'lock' in p.stderr,
          f'base: the image is locked by the source while the inactive '
          f'incoming destination has it open too (a third QEMU: exit '
          f'{p.returncode}: {p.stderr.strip()[:120]})')


def case_overwrite(qemu, work, disk, src, img, fmt, name, rnd, postcopy,
                   multifd=False):
    """The guest rewrites ~10% of its cached pages and ~10% of the disk's
    blocks while the migration runs (with postcopy: switched to post-copy
    a moment in; with multifd: over two channels besides the main one)."""
    hop = Hop(qemu, work, name, src, img, fmt)
    mark = len(src.console_text())
    src.send_serial(f'overwrite {rnd}\n')
    src.wait_console(rf'OVERWRITE-START {rnd}\n', 60, start=mark)
    caps = live_caps(postcopy, multifd=multifd)
    params = {'max-bandwidth': POSTCOPY_BW if postcopy else BW}
    if multifd:
        params['multifd-channels'] = MULTIFD_CHANNELS
    if postcopy:
        params['max-postcopy-bandwidth'] = BW
    hop.start(caps, params)
    if postcopy:
        # Switch once the first pass is past the kernel and the initramfs
        # and into the page cache (with dedup: references went; they stop
        # at the switch).
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            info = src.qmp.cmd('query-migrate')
            sent = info.get('ram', {}).get('transferred', 0)
            refs = (info.get('disk-dedup') or {}).get('pages-as-reference', 0)
            if info.get('status') not in ('setup', 'active') or \
                    sent >= POSTCOPY_AFTER or refs >= POSTCOPY_AFTER_REFS:
                break
            time.sleep(0.05)
        print(f'note  {name}: switching to post-copy with '
              f'{sent / MIB:.1f} MiB sent'
              + (f', {refs} pages as reference' if DEDUP else ''))
        if info.get('status') == 'active':
            src.qmp.cmd('migrate-start-postcopy')
    st, sinfo, dinfo, dd = hop.finish()
    if postcopy:
        evs = [e['data']['status'] for e in src.qmp.events()
               if e['event'] == 'MIGRATION']
        check('postcopy-active' in evs,
              f'{name}: the source went post-copy ({evs})')
    buffered, direct = disk.apply_overwrite(rnd)
    print(f'note  {name}: round {rnd} rewrote {buffered:.1%} of the data '
          f'through the page cache and {direct:.1%} with O_DIRECT')
    # In post-copy, references stop at the switch: only some go as
    # references.
    # A reference the source sent just before the guest rewrote its block
    # with O_DIRECT (or its page, between the fingerprint check and the
    # hash) does not match at the destination, which has the page sent
    # again: allowed, up to the pages this round wrote.
    written = int((buffered + direct) * DATA_MIB * MIB / PAGE) + 1
    dst = conclude(hop, st, sinfo, disk, name, dd, md5=False,
                   min_refs=1 if postcopy else None, max_mismatches=written)
    if dst is None or dst is hop.src:
        return dst
    # The round may still be running when the destination takes over.
    text = src_console = hop.src.console_text()[mark:] + dst.console_text()
    if f'OVERWRITE-DONE {rnd}' not in text:
        dst.wait_console(rf'OVERWRITE-DONE {rnd}\n', 120)
        text = src_console + dst.console_text()
    check('OVERWRITE-FAILED' not in text,
          f'{name}: every write of round {rnd} succeeded in the guest')
    where = 'source' if f'OVERWRITE-DONE {rnd}' in src_console else \
        'destination'
    print(f'note  {name}: the round ended on the {where}')
    md5_check(dst, disk, name, name)
    return dst


def failed_naming(hop, st, sinfo, dinfo, blocks, name):
    """A hop that dedup may fail: the error (the source's, the
    destination's, or its stderr) names one of `blocks` (4 KiB block
    numbers of the image), the source runs on, the destination never ran.
    Returns the source for the next hop."""
    err = '\n'.join((sinfo.get('error-desc', ''),
                     dinfo.get('error-desc', ''), hop.dst.stderr_text()))
    named = [b for b in blocks if f'{b * PAGE:#x}' in err]
    lines = [ln for ln in err.splitlines() if 'disk-dedup' in ln]
    check(DEDUP and named, f'{name}: the migration failed with an error '
          f'naming the block: {(lines or [err.strip()])[0][:300]!r}')
    # The destination sends its reason back on the return path; the source
    # shows it unless its own error (the channel closing) came first.
    print(f'note  {name}: the source says: '
          f'{sinfo.get("error-desc", "")[:300]!r}')
    dst_st = None
    if hop.dst.returncode is None:
        dst_st = hop.dst.qmp.cmd('query-status')['status']
    check(dst_st != 'running', f'{name}: the destination does not run '
          f'(exit {hop.dst.returncode}, state {dst_st})')
    src_st = hop.src.qmp.cmd('query-status')['status']
    check(src_st == 'running', f'{name}: the source runs on ({src_st})')
    stop_vm(hop.dst)
    return hop.src


def change_blocks(disk, img, fname, name):
    """Change 32 blocks of a cached file in the (raw) image behind QEMU's
    back; returns the blocks and a function that puts them back."""
    blocks = disk.blocks(img, fname)[16:48]
    restore = dedupdisk.change_blocks(img, blocks, PAGE)
    print(f'note  {name}: {len(blocks)} blocks of /d/{fname} changed in the '
          f'image (blocks {blocks[0]}..{blocks[-1]}, byte offset '
          f'{blocks[0] * PAGE:#x})')
    return blocks, restore


def case_modified(qemu, work, disk, src, img, fmt, name, fname='f05',
                  postcopy=False):
    """Blocks of a cached file changed in the image behind QEMU's back.
    With postcopy: switched to post-copy once the source has been asked to
    send such a page again, so that the page must reach the destination
    through post-copy's discard and fault path."""
    blocks, restore = change_blocks(disk, img, fname, name)
    hop = Hop(qemu, work, name, src, img, fmt)
    if postcopy:
        hop.start(live_caps(True), {'max-bandwidth': POSTCOPY_BW,
                                    'max-postcopy-bandwidth': BW})
        deadline = time.monotonic() + 120
        resent = 0
        while time.monotonic() < deadline:
            info = src.qmp.cmd('query-migrate')
            dd = info.get('disk-dedup') or {}
            resent = dd.get('pages-resent', 0)
            # Late, so that the destination (the next hop's source) holds
            # records of nearly every cached page, as after a precopy.
            if info.get('status') not in ('setup', 'active') or (
                    resent and dd.get('pages-as-reference', 0) >=
                    MODIFIED_POSTCOPY_REFS):
                break
            time.sleep(0.05)
        print(f'note  {name}: {resent} pages to send again before the '
              f'switch to post-copy (status {info.get("status")})')
        if info.get('status') == 'active':
            src.qmp.cmd('migrate-start-postcopy')
    else:
        hop.start(live_caps(), {'max-bandwidth': BW})
    st, sinfo, dinfo, dd = hop.finish()
    if postcopy:
        evs = [e['data']['status'] for e in src.qmp.events()
               if e['event'] == 'MIGRATION']
        check('postcopy-active' in evs,
              f'{name}: the source went post-copy ({evs})')

    if st == 'failed':
        # With dedup: a reference to a changed block fails the migration.
        src = failed_naming(hop, st, sinfo, dinfo, blocks, name)
        restore()
        return src
    # Completed: no wrong page (a destination that fetches the page on a
    # mismatch instead of failing would count it).
    dd_check((dd.get('mismatches') or 0) >= 1,
             f'{name}: the destination saw the changed blocks '
             f'({dd.get("mismatches")} mismatches) and fetched them')
    # Memory first (with the image still changed), then the guest's view.
    dst = conclude(hop, st, sinfo, disk, name, dd, md5=False, min_refs=0)
    restore()
    if dst is not None:
        md5_check(dst, disk, name, name)
    return dst


def case_unreadable(qemu, work, disk, src, img, fmt, name):
    """The destination's image fails reads of one cached file's blocks."""
    fname = 'f07'
    blocks = disk.blocks(img, fname)[:64]
    hop = Hop(qemu, work, name, src, img, fmt,
              blkdebug=[b * (PAGE // 512) for b in blocks])
    hop.start(live_caps(), {'max-bandwidth': BW})
    st, sinfo, dinfo, dd = hop.finish()
    if st == 'failed':
        # With dedup: a reference whose block cannot be read fails it.
        return failed_naming(hop, st, sinfo, dinfo, blocks, name)
    # Completed: the read errors were seen (and the pages fetched), or the
    # disk was refused when a sample block could not be read.
    dd_check((dd.get('read-errors') or 0) + (dd.get('images-refused') or 0)
             >= 1, f'{name}: the destination\'s read errors were seen '
             f'({dd.get("read-errors")} read errors, '
             f'{dd.get("images-refused")} images refused)')
    return conclude(hop, st, sinfo, disk, name, dd, min_refs=0)


def case_different(qemu, work, disk, src, name):
    """The destination opens another image of the same size (a dead end)."""
    check(os.path.getsize(disk.other) == os.path.getsize(disk.raw),
          f'{name}: the other image has the same size')
    hop = Hop(qemu, work, name, src, disk.other, 'raw')
    hop.start(live_caps(), {'max-bandwidth': BW})
    st, sinfo, dinfo, dd = hop.finish()
    check(st == 'completed', f'{name}: migration {st} '
          f'({sinfo.get("error-desc", "")})')
    # --- dedup-specific: refused, and no reference sent ---------------------
    dd_check((dd.get('images-refused') or 0) >= 1,
             f'{name}: the source reports the image refused '
             f'({dd.get("images-refused")})')
    dd_check(not (dd.get('pages-as-reference')),
             f'{name}: no page went as a reference '
             f'({dd.get("pages-as-reference")})')
    if st == 'completed':
        same_memory(hop.src, hop.dst, work, name)
    stop_vm(hop.dst)
    stop_vm(src)


def case_file(qemu, work, disk, src, img, fmt, name, fname=None):
    """Save to a file with the VM stopped, restore into a new QEMU.
    fname: first change blocks of that cached file in the (raw) image
    behind QEMU's back.  A file has no return path: nobody can ask for a
    page again, so the source must check each reference against its own
    disk and send the changed pages in full; otherwise the restore fails
    and the snapshot is lost."""
    path = os.path.join(work, f'{name}.mig')
    restore_blocks = None
    if fname:
        _, restore_blocks = change_blocks(disk, img, fname, name)
    else:
        # Records fingerprinted late, after the guest changed the page
        # (session 15 found a snapshot unrestorable this way, 1 run in 4).
        mark = len(src.console_text())
        src.send_serial(f'swab {name}\n')
        src.wait_console(rf'SWAB-DONE {name}\n', 120, start=mark)
    src.qmp.cmd('stop')
    # No return path to a file.
    caps = live_caps(return_path=False)
    set_caps(src, caps)
    t0 = time.monotonic()
    src.qmp.cmd('migrate', uri=f'file:{path}')
    # A client keeps trying device_add while the save runs: QEMU refuses
    # it and then waits for an RCU grace period in the main loop
    # (drain_call_rcu), while the migration thread, inside its RCU read
    # section, reads the disk for its check.  QEMU must keep answering.
    refused = 0
    deadline = time.monotonic() + 300
    while True:
        info = src.qmp.cmd('query-migrate', timeout=30)
        st = info.get('status')
        if st in DONE or time.monotonic() > deadline:
            break
        try:
            src.qmp.cmd('device_add', driver='virtio-rng-pci',
                        id=f'rng{refused}', timeout=30)
            check(False, f'{name}: device_add was accepted during the save')
            break
        except kvmxvm.QmpError:
            refused += 1
    sinfo = info
    print(f'note  {name}: {refused} device_add refused while saving')
    size = os.path.getsize(path) if os.path.exists(path) else 0
    dd = dedup_stats(sinfo, {}) if DEDUP else {}
    numbers(f'{name} (save)', sinfo, dd if DEDUP else None, f', file {size / MIB:.1f} MiB, '
            f'{time.monotonic() - t0:.1f} s wall')
    check(st == 'completed', f'{name}: saved to a file: {st} '
          f'({sinfo.get("error-desc", "")})')
    if st != 'completed':
        if restore_blocks:
            restore_blocks()
        return None
    # --- dedup-specific -----------------------------------------------------
    sdd = sinfo.get('disk-dedup') or {}
    checked, unlike = sdd.get('pages-checked', 0), sdd.get('pages-unlike-disk', 0)
    print(f'note  {name}: the source checked {checked} pages against its '
          f'disk, {unlike} unlike their block')
    # The swabbed reads moved their blocks' records from the page cache to
    # the buffer (one page per block), so only the other files count.
    want = DATA_MIB * MIB // PAGE // 2
    if not fname:
        want -= SWAB_MIB * MIB // PAGE // 2
    dd_check((dd.get('pages-as-reference') or 0) >= want,
             f'{name}: most of the cached data saved as references '
             f'({dd.get("pages-as-reference")}, want >= {want}; file '
             f'{size / MIB:.1f} MiB)')
    dd_check(checked >= (dd.get('pages-as-reference') or 0) + unlike,
             f'{name}: every reference was checked against the source\'s '
             f'disk ({checked} checked, {dd.get("pages-as-reference")} '
             f'references, {unlike} unlike)')
    if fname:
        dd_check(unlike >= 1, f'{name}: the source found the pages whose '
                 f'blocks changed ({unlike} unlike their block) and saved '
                 f'them in full')
    dst = incoming(qemu, work, f'{name}-dst', img, fmt)
    set_caps(dst, caps)
    t0 = time.monotonic()
    dst.qmp.cmd('migrate-incoming', uri=f'file:{path}')
    dst_st, dinfo = wait_status(dst, DONE, 300)
    d = dedup_stats({}, dinfo) if DEDUP else {}
    print(f'numbers {name} (restore): {dst_st}, '
          f'{time.monotonic() - t0:.1f} s wall'
          + (f'; resolved {d.get("references-resolved")}, mismatches '
             f'{d.get("mismatches")}, read errors {d.get("read-errors")}, '
             f'read time {d.get("read-time-ms")} ms' if DEDUP else ''),
          flush=True)
    check(dst_st == 'completed', f'{name}: restored from the file: {dst_st}'
          + ('' if dst_st == 'completed' else
             f' ({dinfo.get("error-desc", "")}; '
             f'{dst.stderr_text().strip()[-200:]})'))
    if dst_st != 'completed':
        stop_vm(dst)
        if restore_blocks:
            restore_blocks()
        return None
    # --- dedup-specific -----------------------------------------------------
    if DEDUP:
        dd_check((d.get('references-resolved') or 0) > 0 and
                 not d.get('mismatches') and not d.get('read-errors'),
                 f'{name}: the restore resolved the references ({d})')
    # Memory first (with the image still changed), then the guest's view.
    same_memory(src, dst, work, name)
    if restore_blocks:
        restore_blocks()
    stop_vm(src)
    os.unlink(path)
    dst.qmp.cmd('cont')
    md5_check(dst, disk, name, name)
    return dst


def case_src_killed(qemu, work, disk, src, img, fmt, name):
    """The source dies mid-migration: the destination (autostart: it would
    run the guest on completion) must not run."""
    hop = Hop(qemu, work, name, src, img, fmt, paused=False)
    set_caps(hop.dst, {'events': True})
    hop.start(live_caps(), {'max-bandwidth': KILL_BW})
    # Until a good part of the RAM (and, with dedup, some references) is
    # across.
    seen = set()            # the destination's run states
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        seen.add(hop.dst.qmp.cmd('query-status')['status'])
        info = src.qmp.cmd('query-migrate')
        sent = info.get('ram', {}).get('transferred', 0)
        refs = (info.get('disk-dedup') or {}).get('pages-as-reference', 0)
        if info.get('status') not in ('setup', 'active'):
            break
        if sent >= 32 * MIB and (not DEDUP or refs >= KILL_REFS):
            break
        time.sleep(0.1)
    print(f'note  {name}: source killed in {info.get("status")} with '
          f'{sent / MIB:.1f} MiB sent'
          + (f', {refs} pages as reference' if DEDUP else ''))
    check(info.get('status') == 'active',
          f'{name}: the source is killed mid-migration '
          f'({info.get("status")})')
    src.kill()
    src.wait(10)
    dst = hop.dst
    deadline = time.monotonic() + 60
    st = None
    while time.monotonic() < deadline and dst.returncode is None:
        try:
            seen.add(dst.qmp.cmd('query-status', timeout=5)['status'])
            st = dst.qmp.cmd('query-migrate', timeout=5).get('status')
        except (kvmxvm.QmpError, OSError, TimeoutError):
            break
        if st in DONE:
            break
        time.sleep(0.05)
    time.sleep(1)
    rc = dst.returncode
    if rc is None:
        try:
            seen.add(dst.qmp.cmd('query-status', timeout=5)['status'])
        except (kvmxvm.QmpError, OSError, TimeoutError):
            pass
    err = dst.stderr_text().strip()
    check('running' not in seen and st != 'completed',
          f'{name}: the destination never ran the guest (states {seen}, '
          f'migration {st})')
    check((rc is not None and rc != 0) or st == 'failed',
          f'{name}: the destination failed cleanly (exit {rc}, migration '
          f'{st}): {err.splitlines()[-1] if err else ""!r}')
    check(rc is None or rc > 0, f'{name}: the destination did not crash '
          f'(exit {rc})')
    stop_vm(dst)


# -- main -----------------------------------------------------------------------
def main():
    global DEDUP
    chains = ('raw', 'qcow2', 'scsi')
    for a in sys.argv[1:]:
        if a in ('--dedup=on', '--dedup=off'):
            DEDUP = a.endswith('on')
        elif a.startswith('--chains='):
            chains = a.split('=', 1)[1].split(',')
            if not chains or not set(chains) <= set(CHAINS):
                print(f'unknown chain in {a}', file=sys.stderr)
                return 2
        else:
            print(__doc__.split('Usage:')[1], file=sys.stderr)
            return 2
    kvmxtest.require_guest_image()
    qemu = kvmxvm.patched_qemu()
    for tool in ('mkfs.ext4', 'debugfs'):
        if not shutil.which(tool):
            kvmxvm.skip(f'{tool} not found (e2fsprogs; scripts/setup)')
    qemu_img = os.path.join(os.path.dirname(qemu), 'qemu-img')
    if not os.access(qemu_img, os.X_OK):
        kvmxvm.skip(f'{qemu_img} not found (scripts/build)')
    if DEDUP:
        lacks = dedup_support(qemu)
        if lacks:
            kvmxvm.skip(f'this QEMU has no disk dedup yet: {lacks} '
                        f'({qemu}; --dedup=off runs the baseline)')
    print(f'note  dedup {"on" if DEDUP else "off"}', flush=True)
    t_start = time.monotonic()
    work = kvmxtest.workdir('dedup-')
    disk = Disk(work)
    disk.build(qemu_img)
    times = {}

    def timed(label, fn, *args):
        t0 = time.monotonic()
        r = fn(*args)
        times[label] = time.monotonic() - t0
        return r

    for chain in chains:
        vms = []
        try:
            CHAINS[chain](qemu, work, disk, timed, vms)
        except Exception as e:      # noqa: B902 (report, go on)
            traceback.print_exc()
            check(False, f'{chain} chain: {type(e).__name__}: {e}')
        finally:
            for vm in vms:
                stop_vm(vm)
    for k, v in times.items():
        print(f'time  {k}: {v:.1f} s')
    print(f'time  whole test: {time.monotonic() - t_start:.0f} s')
    return check.finish(work)


def raw_chain(qemu, work, disk, timed, vms):
    img = disk.raw
    vm = timed('boot raw', boot, qemu, work, 'raw', disk, img, 'raw')
    vms.append(vm)
    # modified and unreadable right after base, while the source holds a
    # record of every cached block (placed from references: after the
    # overwrite rounds it has records only of what the guest read since).
    for label, fn, args in (
            ('base', case_base, ('base',)),
            ('modified', case_modified, ('modified',)),
            ('modified-postcopy', case_modified,
             ('modified-postcopy', 'f06', True)),
            ('file-modified', case_file, ('file-modified', 'f04')),
            ('unreadable', case_unreadable, ('unreadable',)),
            ('overwrite', case_overwrite, ('overwrite', 1, False)),
            ('multifd', case_overwrite, ('multifd', 3, False, True)),
            ('postcopy', case_overwrite, ('postcopy', 2, True))):
        vm = timed(label, fn, qemu, work, disk, vm, img, 'raw', *args)
        if vm is None:
            return
        vms.append(vm)
    timed('different', case_different, qemu, work, disk, vm, 'different')


def qcow2_chain(qemu, work, disk, timed, vms):
    """The files as they were before the raw chain changed them."""
    qdisk = PristineView(disk)
    img = disk.qcow2
    vm = timed('boot qcow2', boot, qemu, work, 'qcow2', qdisk, img, 'qcow2')
    vms.append(vm)
    for label, fn in (('qcow2', case_base), ('file', case_file)):
        vm = timed(label, fn, qemu, work, qdisk, vm, img, 'qcow2', label)
        if vm is None:
            return
        vms.append(vm)
    timed('src-killed', case_src_killed, qemu, work, qdisk, vm, img, 'qcow2',
          'src-killed')


def scsi_chain(qemu, work, disk, timed, vms):
    """The raw image, read and migrated through virtio-scsi."""
    global BUS
    BUS = 'scsi'
    try:
        vm = timed('boot scsi', boot, qemu, work, 'scsi', disk, disk.raw,
                   'raw')
        vms.append(vm)
        vm = timed('scsi', case_base, qemu, work, disk, vm, disk.raw, 'raw',
                   'scsi')
        if vm is None:
            return
        vms.append(vm)
        vm = timed('scsi-overwrite', case_overwrite, qemu, work, disk, vm,
                   disk.raw, 'raw', 'scsi-overwrite', 4, False)
        if vm is not None:
            vms.append(vm)
    finally:
        BUS = 'virtio-blk'


CHAINS = {'raw': raw_chain, 'qcow2': qcow2_chain, 'scsi': scsi_chain}


class PristineView:
    """The disk as built (for the qcow2 image, converted before the raw
    chain changed the raw one)."""

    def __init__(self, disk):
        self._disk = disk

    def md5s(self):
        return dict(self._disk.pristine)

    def overwrite_shell(self, rnd):
        return self._disk.overwrite_shell(rnd)


if __name__ == '__main__':
    sys.exit(main())
