#!/usr/bin/python3
"""kvmx-chan protection and dirty tracking under real KVM, counted with
KVM's own statistics.

Linux guests do not boot under KVM on this machine kind, so a freestanding
guest (tests/kvm-guest) plays the guest driver: it writes request
structures into its RAM and rings the device's doorbell with plain stores,
exactly as kvmx_guest.ko does.  Checked with QMP query-stats (KVM's vCPU
stat mmio_exits) and query-kvmx-chan:

  ro + deny     2000 reads of the page: 0 MMIO exits (a read-only memslot);
                300 writes: exactly 300 exits, 300 violations, and the page
                still holds what it held
  unprotect     a write exits no more and lands
  ro + log      the write exits, is recorded and lands
  none + deny   reads exit and return zeros
  tracking      KVM's dirty log: exactly the pages written since the last
                read, twice in a row, then nothing
  bad requests  short, outside RAM, overlapping, unknown op: negative
                errno in STATUS, counted in `rejected`, the device goes on
  kill-vm       a violating write stops the VM (STOP event, run state
                guest-panicked); QEMU stays up

Exits 77 where /dev/kvm cannot run a VM."""
import os
import struct
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'lib'))
import kvmxtest  # noqa: E402
import kvmxvm  # noqa: E402
from fsguest import FsGuest  # noqa: E402
from test_flush_hint_kvm import guest_elf, kvm_unusable_reason, mmio_exits  # noqa: E402

check = kvmxtest.Checks()

PAGE = 4096
REQ = 0x800000          # request buffer (guest RAM)
OUT = 0x900000          # TRACK_READ bitmap
PROT = 0xA00000         # protected page
TRACK = 0xB00000        # 16 tracked pages

OP_PROTECT, OP_UNPROTECT, OP_TRACK_START, OP_TRACK_READ, OP_TRACK_STOP = \
    2, 3, 4, 5, 6
ACCESS_RO, ACCESS_NONE = 1, 2
DENY, SIGNAL, LOG, KILL_VM = 1, 2, 3, 4
REG_REQ_LO, REG_REQ_HI, REG_DOORBELL, REG_STATUS, REG_MAGIC = \
    0x08, 0x0c, 0x10, 0x14, 0x00
EAGAIN = 11


def find_chan(vm):
    for bus in vm.qmp.cmd('query-pci'):
        for d in bus['devices']:
            if d['id']['vendor'] == 0x1af4 and d['id']['device'] == 0x10f0:
                bar = next(r for r in d['regions'] if r['bar'] == 0)
                return d['bus'], d['slot'], d['function'], bar['address']
    raise RuntimeError('kvmx-chan not on the PCI bus')


class Chan:
    """The guest driver's side of kvmx-chan, done with guest stores."""

    def __init__(self, g, bar):
        self.g, self.bar = g, bar

    def request(self, op, id_=0, access=0, action=0, extents=(), out=(0, 0),
                length=None):
        """One request; like the driver, waits out the device's bounds
        (-EAGAIN: the rate of changes, a TRACK_READ too soon after the
        last one) for up to 5 s."""
        hdr = struct.pack('<IIiIQIIiIQQQ', op, 64 + 16 * len(extents), 0,
                          len(extents), id_, access, action, 0, 0, 0,
                          out[0], out[1])
        body = hdr + b''.join(struct.pack('<QQ', a, n) for a, n in extents)
        for _ in range(50):
            for off in range(0, len(body), 8):
                self.g.poke(REQ + off, 8,
                            struct.unpack_from('<Q', body, off)[0])
            self.g.poke(self.bar + REG_REQ_LO, 4, REQ & 0xffffffff)
            self.g.poke(self.bar + REG_REQ_HI, 4, REQ >> 32)
            self.g.poke(self.bar + REG_DOORBELL, 4,
                        len(body) if length is None else length)
            status = self.g.peek(self.bar + REG_STATUS, 4)
            status = status - (1 << 32) if status & 0x80000000 else status
            if status != -EAGAIN:
                break
            time.sleep(0.1)
        count = self.g.peek(REQ + 12, 4)
        return status, count


def main():
    reason = kvm_unusable_reason()
    if reason:
        kvmxvm.skip(reason)
    qemu = kvmxvm.patched_qemu()
    elf = guest_elf()
    work = kvmxtest.workdir('protkvm-')
    args = ['-accel', 'kvm', '-machine', 'q35', '-cpu', kvmxvm.kvm_cpu_model_or_skip(qemu), '-m', '64M',
            '-no-reboot', '-kernel', elf,
            '-device', 'isa-debug-exit,iobase=0xf4,iosize=0x04',
            '-device', 'kvmx-chan,id=chan0']
    with kvmxvm.Vm(qemu, args, work, 'protkvm') as vm:
        vm.start()
        g = FsGuest(vm.serial_stream(), timeout=120)
        g.wait_ready(60)
        bus, slot, fn, bar = find_chan(vm)
        # Memory decoding and bus mastering (the driver's pci_set_master).
        g.out(0xcf8, 4, 0x80000000 | bus << 16 | slot << 11 | fn << 8 | 4)
        g.out(0xcfc, 2, 0x0006)
        check(g.peek(bar + REG_MAGIC, 4) == 0x584d564b, 'BAR0 reads KVMX')
        chan = Chan(g, bar)

        def exits_of(fn_):
            before = mmio_exits(vm)
            fn_()
            return mmio_exits(vm) - before

        def info():
            return vm.qmp.cmd('query-kvmx-chan')[0]

        # ---- ro + deny --------------------------------------------------
        g.poke(PROT, 8, 0x1111111111111111)
        st, _ = chan.request(OP_PROTECT, 7, ACCESS_RO, DENY, [(PROT, PAGE)])
        check(st == 0, f'PROTECT ro+deny: status {st}')
        e = info()['entries']
        check(len(e) == 1 and e[0]['id'] == 7 and e[0]['access'] == 'ro' and
              e[0]['action'] == 'deny', f'query-kvmx-chan lists it: {e}')
        n = exits_of(lambda: g.read(PROT, 2000))
        check(n == 0, f'2000 reads of the protected page: {n} MMIO exits '
                      '(want 0: a read-only memslot)')
        v0 = info()['violations']
        n = exits_of(lambda: g.write(PROT, 300))
        check(n == 300, f'300 writes: {n} MMIO exits (want 300)')
        check(info()['violations'] - v0 == 300,
              f'300 violations counted: {info()["violations"] - v0}')
        val = g.peek(PROT, 8)
        check(val == 0x1111111111111111,
              f'the page is unchanged after denied writes: {val:#x}')
        events = [ev for ev in vm.qmp.events()
                  if ev['event'] == 'KVMX_VIOLATION']
        check(len(events) == 300 and events[0]['data']['gpa'] == PROT and
              events[0]['data']['access'] == 'write',
              f'KVMX_VIOLATION events: {len(events)}, first '
              f'{events[0]["data"] if events else None}')

        st, _ = chan.request(OP_UNPROTECT, 7)
        check(st == 0, f'UNPROTECT: status {st}')
        n = exits_of(lambda: g.write(PROT, 1))
        check(n == 0 and g.peek(PROT, 8) == 1,
              f'after unprotect a write lands without an exit ({n} exits)')

        # ---- ro + log ---------------------------------------------------
        g.poke(PROT, 8, 0x2222)
        st, _ = chan.request(OP_PROTECT, 8, ACCESS_RO, LOG, [(PROT, PAGE)])
        v0 = info()['violations']
        n = exits_of(lambda: g.write(PROT, 1))
        check(st == 0 and n == 1 and g.peek(PROT, 8) == 1 and
              info()['violations'] - v0 == 1,
              f'ro+log: the write exits ({n}), is recorded and lands')
        chan.request(OP_UNPROTECT, 8)

        # ---- none + deny ------------------------------------------------
        g.poke(PROT, 8, 0x3333)
        st, _ = chan.request(OP_PROTECT, 9, ACCESS_NONE, DENY, [(PROT, PAGE)])
        x = None

        def rd():
            nonlocal x
            x = g.read(PROT, 50)
        n = exits_of(rd)
        check(st == 0 and n == 50 and x == 0,
              f'none+deny: 50 reads exit ({n}) and see zeros ({x:#x})')
        chan.request(OP_UNPROTECT, 9)
        check(g.peek(PROT, 8) == 0x3333, 'none+deny: the data is intact')

        # ---- dirty tracking (KVM dirty log) ------------------------------
        st, _ = chan.request(OP_TRACK_START, 10, extents=[(TRACK, 16 * PAGE)])
        check(st == 0, f'TRACK_START 16 pages: status {st}')
        for pg in (0, 3, 15):
            g.write(TRACK + pg * PAGE, 1)
        st, cnt = chan.request(OP_TRACK_READ, 10, out=(OUT, 8))
        bm = g.peek(OUT, 2)
        check(st == 0 and cnt == 3 and bm == 0x8009,
              f'TRACK_READ: pages 0, 3, 15 (count {cnt}, bitmap {bm:#06x})')
        st, cnt = chan.request(OP_TRACK_READ, 10, out=(OUT, 8))
        check(st == 0 and cnt == 0 and g.peek(OUT, 2) == 0,
              f'TRACK_READ again without writes: nothing (count {cnt})')
        g.write(TRACK + 7 * PAGE, 3)
        st, cnt = chan.request(OP_TRACK_READ, 10, out=(OUT, 8))
        bm = g.peek(OUT, 2)
        check(st == 0 and cnt == 1 and bm == 0x0080,
              f'TRACK_READ after writing page 7: {bm:#06x} (count {cnt})')
        st, _ = chan.request(OP_TRACK_STOP, 10)
        check(st == 0, f'TRACK_STOP: status {st}')

        # ---- bad requests -----------------------------------------------
        r0 = info()['rejected']
        st, _ = chan.request(OP_PROTECT, 20, ACCESS_RO, DENY, [(PROT, PAGE)],
                             length=3)
        check(st == -22, f'a 3-byte request: {st} (want -EINVAL)')
        st, _ = chan.request(OP_PROTECT, 21, ACCESS_RO, DENY, [(bar, PAGE)])
        check(st == -14, f'protecting the device\'s own BAR: {st} '
                         '(want -EFAULT)')
        st, _ = chan.request(OP_PROTECT, 22, ACCESS_RO, DENY,
                             [(PROT, PAGE), (PROT, PAGE)])
        check(st == -22, f'overlapping extents: {st} (want -EINVAL)')
        st, _ = chan.request(OP_PROTECT, 23, ACCESS_RO, DENY, [(PROT + 1, PAGE)])
        check(st == -22, f'unaligned extent: {st} (want -EINVAL)')
        st, _ = chan.request(99, 24)
        check(st == -22, f'unknown op: {st} (want -EINVAL)')
        st, _ = chan.request(OP_PROTECT, 25, 7, DENY, [(PROT, PAGE)])
        check(st == -22, f'unknown access: {st} (want -EINVAL)')
        st, _ = chan.request(OP_PROTECT, 26, ACCESS_RO, DENY,
                             [(0x100000000000, PAGE)])
        check(st == -14, f'far outside RAM: {st} (want -EFAULT)')
        check(info()['rejected'] - r0 == 7 and info()['entries'] == [],
              f'all 7 counted as rejected, nothing created '
              f'({info()["rejected"] - r0})')

        # ---- kill-vm ----------------------------------------------------
        st, _ = chan.request(OP_PROTECT, 30, ACCESS_RO, KILL_VM, [(PROT, PAGE)])
        check(st == 0, f'PROTECT ro+kill-vm: status {st}')
        vm.qmp.events()
        try:
            g.command(f'w {PROT:#x} 1', timeout=10)
        except Exception:   # the vCPU stops before it answers
            pass
        try:
            stop = vm.qmp.wait_event('STOP', timeout=30)
        except Exception:
            stop = None
        alive = vm.returncode is None
        status = vm.qmp.cmd('query-status') if alive else {}
        check(stop is not None and alive and
              status.get('status') == 'guest-panicked',
              f'kill-vm: the VM stops (STOP event, guest-panicked) and QEMU '
              f'stays up for management: {status}')
        check('kill-vm' in vm.stderr_text(),
              'kill-vm: QEMU said why it stopped the VM')
    return check.finish(work)


if __name__ == '__main__':
    sys.exit(main())
