#!/usr/bin/python3
"""A hostile migration destination against the source's post-copy
prefetch (issue 12, item 4: "a malformed prefetch stream").

The destination asks for predicted pages with MIG_RP_MSG_PREFETCH_PAGES on
the return path (docs/specs/migration-stream.md).  Here a fake destination
(this script) accepts the patched source's migration, reads its stream
and answers with malformed prefetch messages, one per migration.  Each
must fail that migration with an error that names the problem, and never
abort QEMU, read or queue beyond a RAM block, or touch the guest: the
source stays alive with its VM state unchanged, and the next migration can
start.  A well-formed message (before post-copy has started) is accepted
and does nothing.  A source without the postcopy-prefetch capability
refuses the message.
"""
import os
import socket
import struct
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'lib'))
import kvmxtest  # noqa: E402
import kvmxvm  # noqa: E402

MSG_PREFETCH_PAGES = 8      # enum mig_rp_message_type in migration.c
NV_SIZE = 16 << 20
check = kvmxtest.Checks()


def prefetch_msg(block, offsets, count=None, idlen=None, extra=b''):
    name = block.encode()
    body = struct.pack('>HB', len(offsets) if count is None else count,
                       len(name) if idlen is None else idlen)
    body += name + b''.join(struct.pack('>Q', o) for o in offsets) + extra
    return struct.pack('>HH', MSG_PREFETCH_PAGES, len(body)) + body


class FakeDestination:
    """Accepts one migration, drains what the source sends, and writes
    `reply` on the return path (the same socket) once the stream flows."""

    def __init__(self, reply):
        self.reply = reply
        self.srv = socket.socket()
        self.srv.bind(('127.0.0.1', 0))
        self.srv.listen(1)
        self.port = self.srv.getsockname()[1]
        self.received = 0
        self.t = threading.Thread(target=self._serve, daemon=True)
        self.t.start()

    def _serve(self):
        c, _ = self.srv.accept()
        c.settimeout(30)
        sent = False
        try:
            while True:
                data = c.recv(1 << 16)
                if not data:
                    break
                self.received += len(data)
                if not sent and self.received >= 1 << 16:
                    c.sendall(self.reply)
                    sent = True
        except OSError:
            pass
        finally:
            c.close()
            self.srv.close()


def wait_end(vm, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = vm.qmp.cmd('query-migrate')
        if info.get('status') in ('failed', 'completed', 'cancelled'):
            return info
        time.sleep(0.1)
    return vm.qmp.cmd('query-migrate')


def attempt(vm, reply, what, expect, prefetch=True):
    vm.qmp.cmd('migrate-set-capabilities', capabilities=[
        {'capability': 'postcopy-ram', 'state': True},
        {'capability': 'postcopy-prefetch', 'state': prefetch}])
    # Slow, so that the stream is still flowing when the reply lands.
    vm.qmp.cmd('migrate-set-parameters', **{'max-bandwidth': 4 << 20})
    dest = FakeDestination(reply)
    vm.qmp.cmd('migrate', uri=f'tcp:127.0.0.1:{dest.port}')
    info = wait_end(vm)
    err = info.get('error-desc', '')
    if expect is None:
        # Accepted: whatever ends this migration (the fake destination
        # never completes one), it is not the message.
        check('PREFETCH' not in err,
              f'{what}: accepted ({info.get("status")}: {err})')
        if info.get('status') not in ('failed', 'completed', 'cancelled'):
            vm.qmp.cmd('migrate_cancel')
            wait_end(vm)
    else:
        check(info.get('status') == 'failed' and expect in err,
              f'{what}: the migration fails naming it '
              f'({info.get("status")}: {err!r})')
    st = vm.qmp.cmd('query-status')
    check(vm.proc.poll() is None and st['status'] == 'prelaunch',
          f'{what}: the source is alive, its VM untouched ({st["status"]})')
    dest.t.join(30)


def main():
    qemu = kvmxvm.patched_qemu()
    work = kvmxtest.workdir('prefetch-hostile-')
    img = kvmxtest.backing_file(work, 'nv.img', NV_SIZE)
    args = ['-machine', 'accel=tcg', '-S'] + kvmxtest.nvdimm_args(
        img, NV_SIZE, device='nvdimm,id=nv0,memdev=mem1',
        mem='128M,slots=2,maxmem=1G')
    with kvmxvm.Vm(qemu, args, work, 'src') as vm:
        vm.start()
        ram = 'pc.ram'
        page = 4096
        cases = [
            ('no pages', prefetch_msg(ram, [], count=0), 'with 0 pages'),
            ('31 pages (limit 30)', prefetch_msg(ram, [0] * 31),
             'with 31 pages'),
            ('length does not match the count',
             prefetch_msg(ram, [0, page], count=3), 'with 3 pages'),
            ('name longer than the message',
             prefetch_msg(ram, [0], idlen=200), 'byte name'),
            ('unknown block', prefetch_msg('no-such-block', [0]),
             "has no block 'no-such-block'"),
            ('misaligned offset', prefetch_msg(ram, [page + 1]),
             'outside it or misaligned'),
            ('offset beyond the block', prefetch_msg(ram, [1 << 40]),
             'outside it or misaligned'),
            ('the NVDIMM (migrated before post-copy)',
             prefetch_msg('mem1', [0]), 'is not fetched on demand'),
        ]
        for what, reply, expect in cases:
            attempt(vm, reply, what, expect)
        attempt(vm, prefetch_msg(ram, [0, page, 2 * page]),
                'a well-formed request before post-copy', None)
        attempt(vm, prefetch_msg(ram, [0]),
                'prefetch capability off on the source',
                'capability is off on the source', prefetch=False)
    return check.finish(work)


if __name__ == '__main__':
    sys.exit(main())
