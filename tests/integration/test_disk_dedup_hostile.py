#!/usr/bin/python3
"""A hostile migration destination against the source's disk dedup
(issue 13): malformed MIG_RP_MSG_DISK_DEDUP messages on the return path.

With the disk-dedup capability the source announces its tracked disks in
the `kvmx-disk-dedup` section, and the destination answers on the return
path (docs/specs/disk-dedup-stream.md, "Return path message").  Here a
fake destination (this script) accepts the patched source's migration,
drains its stream, waits for the announcement of the source's one disk
and then answers with a message, one per migration.  A message the source
cannot have asked for must fail that migration with an error that names
the problem, and never abort QEMU: the source stays alive with its VM
state unchanged (`prelaunch`), and the next migration can start.  A
well-formed refusal does not fail the migration: it is recorded in
query-migrate (`images-refused`, `refused-reason`), and so is nothing for
a well-formed `resolved` count of 0.  At the end one real migration to a
patched destination with dedup on completes, and a save to a file is
loaded by a destination whose disk differs: the load fails, and the
destination's query-migrate names the disk and the reason.

No guest runs: the source is a q35 machine kept in `prelaunch` with a
virtio-blk disk on a small raw file tracked by a kvmx-disk-dedup object.
So no page is ever sent as a reference (records come from guest reads),
which is what most cases need.  Not covered here, because they need
references on the wire: a `resolved` count that goes backwards, and a
well-formed `resend` that the source queues (test_disk_dedup.py's
modified/unreadable cases make a real destination send those).
"""
import os
import shutil
import socket
import struct
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'lib'))
import kvmxtest  # noqa: E402
import kvmxvm  # noqa: E402

MSG_DISK_DEDUP = 9          # enum mig_rp_message_type in migration.c
REFUSED, ACCEPTED, FAILED, RESOLVED, RESEND = 0, 1, 2, 3, 4
DISK_SIZE = 1 << 20
RAM = 'pc.ram'
RAM_SIZE = 128 << 20
PAGE = 4096
DONE = ('failed', 'completed', 'cancelled')
check = kvmxtest.Checks()


def rp_msg(body):
    """A return path message of type DISK_DEDUP with `body` as it is."""
    return struct.pack('>HH', MSG_DISK_DEDUP, len(body)) + body


def dd_msg(disk, answer, data=b'', rlen=None, extra=b''):
    """disk, answer, length byte (`rlen`, else len(data)), data."""
    body = bytes([disk, answer, len(data) if rlen is None else rlen])
    return rp_msg(body + data + extra)


def resend_data(block, offset, idlen=None):
    name = block.encode()
    return (bytes([len(name) if idlen is None else idlen]) + name +
            struct.pack('>Q', offset))


class FakeDestination:
    """Accepts one migration and drains what the source sends.  Once the
    source has announced `path` in the kvmx-disk-dedup section (or, with
    path None, once the stream flows) it writes `reply` on the return path
    (the same socket).  It closes the connection when the source does or
    when close() is called."""

    def __init__(self, reply, path):
        self.reply = reply
        self.needle = None if path is None else \
            bytes([len(path)]) + path.encode()
        self.announced_index = None
        self.replied = threading.Event()
        self.stop = threading.Event()
        self.srv = socket.socket()
        self.srv.bind(('127.0.0.1', 0))
        self.srv.listen(1)
        self.port = self.srv.getsockname()[1]
        self.t = threading.Thread(target=self._serve, daemon=True)
        self.t.start()

    def _serve(self):
        self.srv.settimeout(30)
        try:
            c, _ = self.srv.accept()
        except OSError:
            self.srv.close()
            return
        c.settimeout(0.2)
        head = bytearray()          # the stream's beginning, for the needle
        received = 0
        try:
            while not self.stop.is_set():
                try:
                    data = c.recv(1 << 16)
                except socket.timeout:
                    continue
                if not data:
                    break
                received += len(data)
                if self.replied.is_set():
                    continue
                if self.needle is None:
                    ready = received >= 4096
                else:
                    if len(head) < 1 << 20:
                        head += data
                    i = head.find(self.needle)
                    ready = i > 0
                    if ready:
                        self.announced_index = head[i - 1]
                if ready:
                    c.sendall(self.reply)
                    self.replied.set()
        except OSError:
            pass
        finally:
            c.close()
            self.srv.close()

    def close(self):
        self.stop.set()
        self.t.join(10)


def wait_end(vm, timeout=30):
    deadline = time.monotonic() + timeout
    while True:
        info = vm.qmp.cmd('query-migrate')
        if info.get('status') in DONE or time.monotonic() > deadline:
            return info
        time.sleep(0.05)


def set_caps(vm, dedup=True):
    vm.qmp.cmd('migrate-set-capabilities', capabilities=[
        {'capability': 'return-path', 'state': True},
        {'capability': 'disk-dedup', 'state': dedup}])


def source_alive(vm, what):
    st = vm.qmp.cmd('query-status')
    check(vm.proc.poll() is None and st['status'] == 'prelaunch',
          f'{what}: the source is alive, its VM untouched ({st["status"]})')


def attempt(vm, disk, reply, what, expect, dedup=True):
    """One migration to a fake destination that answers `reply`; it must
    fail with `expect` in error-desc."""
    set_caps(vm, dedup)
    dest = FakeDestination(reply, disk['device'] if dedup else None)
    vm.qmp.cmd('migrate', uri=f'tcp:127.0.0.1:{dest.port}')
    info = wait_end(vm)
    err = info.get('error-desc', '')
    if not dest.replied.is_set():
        check(False, f'{what}: the fake destination saw the announcement '
                     f'and answered ({info.get("status")}: {err!r})')
    elif dedup:
        check(dest.announced_index == disk['index'],
              f'{what}: the source announced disk {disk["index"]} '
              f'(stream: {dest.announced_index})')
    check(info.get('status') == 'failed' and expect in err,
          f'{what}: the migration fails naming it '
          f'({info.get("status")}: {err!r})')
    if info.get('status') not in DONE:
        vm.qmp.cmd('migrate_cancel')
        wait_end(vm)
    dest.close()
    source_alive(vm, what)


def attempt_accepted(vm, disk, reply, what, recorded):
    """A well-formed message: the migration goes on.  `recorded(dd)` says
    whether query-migrate's disk-dedup shows it.  Then the fake destination
    hangs up, which fails the migration for that reason."""
    set_caps(vm)
    dest = FakeDestination(reply, disk['device'])
    vm.qmp.cmd('migrate', uri=f'tcp:127.0.0.1:{dest.port}')
    dest.replied.wait(20)
    check(dest.replied.is_set() and dest.announced_index == disk['index'],
          f'{what}: the source announced disk {disk["index"]} and the fake '
          f'destination answered (stream: {dest.announced_index})')
    # The source handles the message on its return path thread; the
    # migration itself may go on to wait for the destination's SHUT.  A
    # moment for a message that leaves no trace in query-migrate.
    time.sleep(0.5)
    deadline = time.monotonic() + 10
    while True:
        info = vm.qmp.cmd('query-migrate')
        dd = info.get('disk-dedup', {})
        if recorded(dd) or info.get('status') in DONE or \
                time.monotonic() > deadline:
            break
        time.sleep(0.05)
    check(info.get('status') not in DONE and recorded(dd),
          f'{what}: accepted and recorded, the migration goes on '
          f'({info.get("status")}: {info.get("error-desc", "")!r}, '
          f'disk-dedup {dd})')
    dest.close()
    info = wait_end(vm)
    err = info.get('error-desc', '')
    check(info.get('status') == 'failed' and 'DISK_DEDUP' not in err and
          'destination failed' not in err,
          f'{what}: the migration then fails because the fake destination '
          f'hung up, not on the message ({info.get("status")}: {err!r})')
    source_alive(vm, what)


def vm_args(img):
    return ['-machine', 'q35,accel=tcg', '-m', f'{RAM_SIZE >> 20}M', '-S',
            '-object', 'kvmx-disk-dedup,id=dd0,max-memory=16M',
            '-blockdev', f'driver=file,filename={img},node-name=f0',
            '-blockdev', 'driver=raw,file=f0,node-name=d0',
            '-device', 'virtio-blk-pci,drive=d0,id=vd0,disk-dedup=dd0']


def real_migration(qemu, work, vm, dst_img):
    """The same source to a patched destination with dedup on."""
    with kvmxvm.Vm(qemu, vm_args(dst_img) + ['-incoming', 'defer'], work,
                   'dst') as dst:
        dst.start()
        set_caps(dst)
        port = kvmxtest.free_port()
        dst.qmp.cmd('migrate-incoming', uri=f'tcp:127.0.0.1:{port}')
        set_caps(vm)
        vm.qmp.cmd('migrate', uri=f'tcp:127.0.0.1:{port}')
        info = wait_end(vm, 60)
        dd = info.get('disk-dedup', {})
        check(info.get('status') == 'completed',
              f'real destination: the migration completes '
              f'({info.get("status")}: {info.get("error-desc", "")!r})')
        check(dd.get('images-refused') == 0 and 'refused-reason' not in dd,
              f'real destination: it accepted the disk ({dd})')
        dinfo = wait_end(dst, 30)
        check(dinfo.get('status') == 'completed' and
              dst.proc.poll() is None,
              f'real destination: completed there too '
              f'({dinfo.get("status")})')
        check(vm.proc.poll() is None, 'real destination: the source is alive')


def file_to_other_disk(qemu, work):
    """A save to a file, loaded where the disk is not the same (here: its
    size differs).  There is no return path to refuse the disk on, so the
    load fails, and the destination's query-migrate says why (it used to
    say only 'load of migration failed: Invalid argument')."""
    path = os.path.join(work, 'save.mig')
    img = kvmxtest.backing_file(work, 'disk-file.raw', DISK_SIZE)
    other = kvmxtest.backing_file(work, 'disk-other.raw', 2 * DISK_SIZE)
    with kvmxvm.Vm(qemu, vm_args(img), work, 'src-file') as vm:
        vm.start()
        vm.qmp.cmd('migrate-set-capabilities', capabilities=[
            {'capability': 'return-path', 'state': False},
            {'capability': 'disk-dedup', 'state': True}])
        vm.qmp.cmd('migrate', uri=f'file:{path}')
        info = wait_end(vm, 60)
        check(info.get('status') == 'completed',
              f'file: saved ({info.get("status")}: '
              f'{info.get("error-desc", "")!r})')
    with kvmxvm.Vm(qemu, vm_args(other) + ['-incoming', 'defer'], work,
                   'dst-other') as dst:
        dst.start()
        dst.qmp.cmd('migrate-set-capabilities', capabilities=[
            {'capability': 'disk-dedup', 'state': True}])
        dst.qmp.cmd('migrate-incoming', uri=f'file:{path}',
                    **{'exit-on-error': False})
        dinfo = wait_end(dst, 60)
        err = dinfo.get('error-desc', '')
        check(dinfo.get('status') == 'failed' and
              'cannot be used here' in err and 'size differs' in err,
              f'file, other disk: the load fails, and query-migrate on the '
              f'destination names the disk and why ({err!r})')
        check(dst.proc.poll() is None, 'file, other disk: the destination '
              'is alive')


def main():
    qemu = kvmxvm.patched_qemu()
    work = kvmxtest.workdir('dedup-hostile-')
    img = kvmxtest.backing_file(work, 'disk.raw', DISK_SIZE)
    dst_img = os.path.join(work, 'disk-dst.raw')
    shutil.copyfile(img, dst_img)
    t0 = time.monotonic()
    with kvmxvm.Vm(qemu, vm_args(img), work, 'src') as vm:
        vm.start()
        caps = {c['capability'] for c in
                vm.qmp.cmd('query-migrate-capabilities')}
        if 'disk-dedup' not in caps:
            kvmxvm.skip('this QEMU has no disk-dedup migration capability')
        objs = vm.qmp.cmd('query-kvmx-disk-dedup')
        disks = objs[0]['images'] if objs else []
        if not check(len(disks) == 1 and 'vd0' in disks[0]['device'],
                     f'the source tracks its one disk ({disks})'):
            return check.finish(work)
        disk = disks[0]
        n = disk['index']
        bad = 7 if n != 7 else 8
        why = 'the block at offset 0x1000 of disk vd0 does not match'
        cases = [
            ('message of 2 bytes', rp_msg(bytes([n, ACCEPTED])),
             'MIG_RP_MSG_DISK_DEDUP too short: 2'),
            ('message of 0 bytes', rp_msg(b''),
             'MIG_RP_MSG_DISK_DEDUP too short: 0'),
            ('length byte 5, 2 bytes of data',
             dd_msg(n, REFUSED, b'no', rlen=5),
             'MIG_RP_MSG_DISK_DEDUP of 5 bytes with a 5 byte reason'),
            ('length byte 0, 4 bytes of data',
             dd_msg(n, ACCEPTED, rlen=0, extra=b'junk'),
             'MIG_RP_MSG_DISK_DEDUP of 7 bytes with a 0 byte reason'),
            ('answer 5', dd_msg(n, 5), 'MIG_RP_MSG_DISK_DEDUP with answer 5'),
            ('answer 255', dd_msg(n, 255),
             'MIG_RP_MSG_DISK_DEDUP with answer 255'),
            (f'acceptance for disk {bad} (not announced)',
             dd_msg(bad, ACCEPTED),
             f'for disk {bad}, which the source did not announce'),
            ('refusal for disk 64 (beyond the limit)',
             dd_msg(64, REFUSED, b'x'),
             'for disk 64, which the source did not announce'),
            ('second acceptance of the disk',
             dd_msg(n, ACCEPTED) + dd_msg(n, ACCEPTED),
             f'disk {n} answered twice'),
            ('refusal after an acceptance',
             dd_msg(n, ACCEPTED) + dd_msg(n, REFUSED, b'changed my mind'),
             f'disk {n} answered twice'),
            ('resolved 1, 0 references sent',
             dd_msg(0, RESOLVED, struct.pack('>Q', 1)),
             'says it handled 1 references, 0 were sent'),
            ('resolved with a 4 byte count',
             dd_msg(0, RESOLVED, struct.pack('>I', 0)),
             'a count of references handled of 4 bytes, not 8'),
            ('resolved with no count', dd_msg(0, RESOLVED),
             'a count of references handled of 0 bytes, not 8'),
            ('resend with no data', dd_msg(n, RESEND),
             'a malformed request to send a page again (0 bytes)'),
            ('resend with idlen 0',
             dd_msg(n, RESEND, resend_data('', 0)),
             'a malformed request to send a page again (9 bytes)'),
            ('resend with a 4 byte offset',
             dd_msg(n, RESEND, bytes([len(RAM)]) + RAM.encode() +
                    struct.pack('>I', 0)),
             'a malformed request to send a page again (11 bytes)'),
            ('resend with idlen longer than the data',
             dd_msg(n, RESEND, resend_data(RAM, 0, idlen=200)),
             'a malformed request to send a page again (15 bytes)'),
            ('resend of an unknown RAM block',
             dd_msg(n, RESEND, resend_data('no-such-block', 0)),
             "RAM block 'no-such-block' to send again, but it is not "
             "being migrated"),
            ('resend past the block\'s end',
             dd_msg(n, RESEND, resend_data(RAM, RAM_SIZE)),
             f"send again at {RAM_SIZE:#x} of RAM block '{RAM}', past its "
             f"end or not aligned"),
            ('resend far past the block\'s end',
             dd_msg(n, RESEND, resend_data(RAM, 1 << 62)),
             f"send again at {1 << 62:#x} of RAM block '{RAM}', past its "
             f"end or not aligned"),
            ('resend of a misaligned offset',
             dd_msg(n, RESEND, resend_data(RAM, PAGE + 1)),
             f"send again at {PAGE + 1:#x} of RAM block '{RAM}', past its "
             f"end or not aligned"),
            ('resend of a valid page, 0 references sent',
             dd_msg(n, RESEND, resend_data(RAM, PAGE)),
             'more pages to send again than references sent (0)'),
            ('failed, with the reason',
             dd_msg(n, FAILED, why.encode()),
             f'the destination failed: {why}'),
        ]
        for what, reply, expect in cases:
            attempt(vm, disk, reply, what, expect)
        attempt(vm, disk, dd_msg(n, ACCEPTED),
                'disk-dedup capability off on the source',
                'MIG_RP_MSG_DISK_DEDUP but the disk-dedup capability is off',
                dedup=False)

        reason = 'size differs: 1048576 vs 2097152'
        attempt_accepted(
            vm, disk, dd_msg(n, REFUSED, reason.encode()),
            'a refusal of the disk with a reason',
            lambda dd: dd.get('images-refused') == 1 and
            dd.get('refused-reason') == reason)
        attempt_accepted(
            vm, disk, dd_msg(n, ACCEPTED) + dd_msg(0, RESOLVED,
                                                   struct.pack('>Q', 0)),
            'an acceptance, then resolved 0 (0 references sent)',
            lambda dd: dd.get('images-refused') == 0 and
            dd.get('pages-as-reference') == 0)

        real_migration(qemu, work, vm, dst_img)
    file_to_other_disk(qemu, work)
    print(f'note  {len(cases) + 5} migrations in '
          f'{time.monotonic() - t0:.1f} s', flush=True)
    return check.finish(work)


if __name__ == '__main__':
    sys.exit(main())
