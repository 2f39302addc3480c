#!/usr/bin/env python3
"""Smoke test and exit-count measurement for kvmx-testguest.

Boots the guest in QEMU (default: -accel kvm, q35, 5 GiB so that RAM exists
above 4 GiB, pc-testdev for an MMIO region at 0xff000000), drives it over
its serial socket with tests/lib/fsguest.py, checks every command, and
reports how many user-space MMIO exits (QMP query-stats, KVM stat
"mmio_exits") N loads and N stores cause on RAM and on MMIO, plus the
per-access latency from tr/tw.

Exit status: 0 pass, 1 fail, 77 skip (no usable /dev/kvm or no QEMU).
"""

import argparse
import fcntl
import glob
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "tests", "lib"))
from fsguest import FsGuest, GuestError, GuestFault  # noqa: E402
from kvmxvm import Qmp, QmpError, default_qemu, kvm_cpu_model  # noqa: E402

SKIP = 77
KVM_GET_API_VERSION = 0xAE00
RAM_LOW = 0x8000000             # 128 MiB, well above the guest image
RAM_HIGH = 0x140000000          # 5 GiB: RAM with -m 5G on q35
TESTDEV_MMIO = 0xff000000       # pc-testdev "iomem", 64 KiB
COMMANDS = {"ping", "info", "echo", "r", "w", "br", "bw", "tr", "tw", "tn",
            "tsc", "q", "ud2"}
STATS = ("exits", "mmio_exits", "io_exits", "insn_emulation")


class Failure(Exception):
    pass


def check(cond, what):
    if not cond:
        raise Failure(what)
    print(f"  ok: {what}")


def kvm_problem():
    """None if /dev/kvm answers KVM_GET_API_VERSION, else the reason."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return f"cannot open /dev/kvm: {e.strerror}"
    try:
        version = fcntl.ioctl(fd, KVM_GET_API_VERSION)
    except OSError as e:
        return f"KVM_GET_API_VERSION failed: {e.strerror}"
    finally:
        os.close(fd)
    return None if version == 12 else f"unexpected KVM API {version}"


def phys_u64(qmp, addr):
    """Read guest-physical memory the host's way, bypassing the guest."""
    out = qmp.cmd("human-monitor-command", {"command-line":
                                            f"xp /1gx {addr:#x}"})
    return int(out.split(":")[1].split()[0], 16)


def vcpu_stats(qmp):
    """Sums of the STATS KVM per-vCPU statistics, or None."""
    try:
        res = qmp.cmd("query-stats", target="vcpu",
                      providers=[{"provider": "kvm", "names": list(STATS)}])
    except QmpError:
        return None
    if not res:                         # e.g. TCG: no KVM provider
        return None
    total = dict.fromkeys(STATS, 0)
    for vcpu in res:
        for s in vcpu["stats"]:
            total[s["name"]] += s["value"]
    return total


class Vm:
    def __init__(self, args, tmp):
        self.ser_path = os.path.join(tmp, "serial.sock")
        self.qmp_path = os.path.join(tmp, "qmp.sock")
        self.err_path = os.path.join(tmp, "qemu.stderr")
        cmd = [args.qemu, "-accel", args.accel, "-machine", "q35",
               "-cpu", args.cpu, "-smp", "1", "-m", args.mem,
               "-nodefaults", "-nographic", "-no-reboot", "-S",
               "-kernel", args.elf,
               "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
               "-device", "pc-testdev",
               "-chardev", f"socket,id=s0,path={self.ser_path},"
                           "server=on,wait=off",
               "-serial", "chardev:s0",
               "-qmp", f"unix:{self.qmp_path},server=on,wait=off"]
        print("+ " + " ".join(cmd))
        if shutil.which("setpriv"):     # QEMU dies with this script
            cmd = ["setpriv", "--pdeathsig", "KILL", "--"] + cmd
        self.err = open(self.err_path, "wb")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL,
                                     stdout=self.err, stderr=self.err)
        self.guest = self.qmp = None

    def boot(self, timeout):
        deadline = time.monotonic() + 30
        while True:
            try:
                sock = socket.socket(socket.AF_UNIX)
                sock.connect(self.ser_path)
                self.qmp = Qmp(self.qmp_path)
                break
            except (OSError, QmpError):
                sock.close()
                if self.proc.poll() is not None:
                    raise Failure("QEMU did not start: "
                                  + self.stderr()) from None
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.guest = FsGuest(sock, timeout=timeout)
        self.qmp.cmd("cont")            # connected before the banner
        self.guest.wait_ready(timeout)

    def stderr(self):
        with open(self.err_path, "rb") as f:
            return f.read().decode(errors="replace").strip()

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        if self.qmp:
            self.qmp.close()
            self.qmp = None
        self.err.close()


def test_protocol(vm):
    g, q = vm.guest, vm.qmp
    print("protocol:")
    g.ping()
    check(True, "ping")
    info = g.info()
    print(f"  guest cpu: {info}")
    for bad in ("bogus", "r", "r 0x8000004 1", "r zz 1", "r 0x1000 1 2",
                "w 0x100000 1", "tw 0x8000000 0", "tw 0x8000000 65537",
                "r 0x10000000000000000 1", "q", "x" * 300, "tsc foo"):
        try:
            g.command(bad)
            raise Failure(f"'{bad[:20]}' was accepted")
        except GuestFault:
            raise
        except GuestError as e:
            check(True, f"'{bad[:20]}' rejected: {e.message}")
    # Hostile input: random ASCII lines (no valid command word) must each
    # get one "err"/"ok" line and leave the guest alive.
    rng = random.Random(1)
    alphabet = [chr(c) for c in range(128) if chr(c) not in "\r\n"]
    for _ in range(300):
        line = "".join(rng.choice(alphabet)
                       for _ in range(rng.randrange(1, 60)))
        words = line.replace("\t", " ").split(" ")
        words = [w for w in words if w]
        if not words or words[0] in COMMANDS:
            continue                    # blank lines get no answer
        try:
            g.command(line)
        except GuestFault:
            raise
        except GuestError:
            pass
    g.ping()
    check(True, "random lines answered, guest alive")

    phys_bits = int(info["physbits"])
    for addr in (1 << phys_bits, 1 << 47):
        try:
            g.read(addr)
            raise Failure(f"read beyond physbits at {addr:#x} accepted")
        except GuestError as e:
            check(True, f"{addr:#x} rejected: {e.message}")
    g.ping()
    check(True, "still alive after bad input")

    for addr in (RAM_LOW, RAM_HIGH):
        check(phys_u64(q, addr) == 0, f"{addr:#x} starts as 0 (host view)")
        g.write(addr, 3)
        check(g.read(addr, 1) == 1, f"guest reads back 1 at {addr:#x}")
        check(g.read(addr, 2) == 0, f"xor of 2 reads at {addr:#x} is 0")
        check(phys_u64(q, addr) == 1, f"host sees 1 at {addr:#x}: identity")

    # Enough distinct 1 GiB regions to exhaust the page-table pool.
    for i in range(40):
        g.read(0x200000000 + (i << 30))
    check(g.read(RAM_HIGH) == 1, "high RAM still right after pool reuse")
    if phys_bits >= 41:
        g.read(0xff00000000)
        check(True, "read at 1020 GiB (second PML4 entry)")

    g.write(TESTDEV_MMIO, 1)
    check(g.read(TESTDEV_MMIO) == 1, "pc-testdev iomem keeps the store")

    khz, src = g.tsc_khz()
    check(khz > 0, f"tsc {khz} kHz from {src}")
    pit_khz, _ = g.tsc_khz(force_pit=True)
    check(pit_khz > 0, f"tsc {pit_khz} kHz from pit")
    return khz


def measure(vm, n, k, khz):
    g, q = vm.guest, vm.qmp
    slow = max(60, n / 1000)

    def delta(before, after):
        return None if before is None else {
            s: after[s] - before[s] for s in STATS}

    def timed(fn, *a):
        s0 = vcpu_stats(q)
        t = fn(*a, k, timeout=slow)
        t["exits"] = delta(s0, vcpu_stats(q))
        return t

    base = timed(g.timed_nothing)
    rows = []
    for name, addr in (("ram<4G", RAM_LOW), ("ram>4G", RAM_HIGH),
                       ("mmio", TESTDEV_MMIO)):
        s0 = vcpu_stats(q)
        g.read(addr, n, timeout=slow)
        s1 = vcpu_stats(q)
        g.write(addr, n, timeout=slow)
        s2 = vcpu_stats(q)
        batch = (g.batch_read(addr, n, timeout=slow),
                 g.batch_write(addr, n, timeout=slow))
        rows.append((name, addr, delta(s0, s1), delta(s1, s2),
                     timed(g.timed_read, addr), timed(g.timed_write, addr),
                     batch))

    def show(word, t):
        net = t["p50"] - base["p50"]
        line = " ".join(f"{key}={t[key]}" for key in
                        ("min", "p50", "p90", "p99", "max", "avg"))
        print(f"          {word}: {line} cycles; p50 - tn p50 = {net} "
              f"cycles = {net * 1000 / khz:.2f} us")
        if t["exits"]:
            print(f"              during {k} timed: " + " ".join(
                f"{s} +{v}" for s, v in t["exits"].items()))

    print(f"\nmeasurement: {n} loads and {n} stores per region, {k} timed "
          f"of each, TSC {khz} kHz")
    show("tn", base)
    for name, addr, dr, dw, tr, tw, (br, bw) in rows:
        if dr is None:
            print(f"  {name:7} {addr:#x}: query-stats unavailable")
        else:
            print(f"  {name:7} {addr:#x}: loads: mmio_exits +"
                  f"{dr['mmio_exits']} exits +{dr['exits']}; stores: "
                  f"mmio_exits +{dw['mmio_exits']} exits +{dw['exits']}")
        print(f"          br/bw (one window for all {n}): load "
              f"{br['avg']} cycles = {br['avg'] * 1000 / khz:.3f} us, store "
              f"{bw['avg']} cycles = {bw['avg'] * 1000 / khz:.3f} us")
        show("tr", tr)
        show("tw", tw)
    for name, addr, dr, dw, *_ in rows:
        if dr is None:
            continue
        if name == "mmio":
            check(n <= dr["mmio_exits"] <= n + 5, f"{name}: a load exits")
            check(n <= dw["mmio_exits"] <= n + 5, f"{name}: a store exits")
        else:
            check(dr["mmio_exits"] <= 5, f"{name}: loads do not exit")
            check(dw["mmio_exits"] <= 5, f"{name}: stores do not exit")


def test_quit(vm):
    vm.guest.quit(5)
    rc = vm.proc.wait(30)
    check(rc == (5 << 1) | 1, f"q 5 made QEMU exit with {rc}")


def test_exception(vm):
    print("exception path:")
    try:
        vm.guest.command("ud2")
        raise Failure("ud2 did not fault")
    except GuestFault as e:
        check(e.message.startswith("exception 6 rip="), f"'{e.message}'")
    check(vm.proc.poll() is None, "QEMU still running, guest halted")


def default_elf():
    if os.environ.get("KVMX_TESTGUEST"):
        return os.environ["KVMX_TESTGUEST"]
    found = glob.glob(os.path.join(ROOT, "build", "**", "tests", "kvm-guest",
                                   "kvmx-testguest.elf"), recursive=True)
    found.sort(key=os.path.getmtime)
    return found[-1] if found else os.path.join(
        ROOT, "build", "tests", "kvm-guest", "kvmx-testguest.elf")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--qemu", default=default_qemu(),
                    help="default: $KVMX_QEMU or the stock Debian QEMU")
    ap.add_argument("--elf", default=default_elf(),
                    help="default: $KVMX_TESTGUEST or the newest build")
    ap.add_argument("--accel", default="kvm", choices=("kvm", "tcg"))
    ap.add_argument("--mem", default="5G")
    ap.add_argument("-n", type=int, default=10000,
                    help="loads/stores per region for exit counting")
    ap.add_argument("-k", type=int, default=2000,
                    help="timed loads/stores per region (max 65536)")
    ap.add_argument("--timeout", type=float, default=60.0)
    args = ap.parse_args()

    if args.accel == "kvm":
        problem = kvm_problem()
        if problem:
            print(f"SKIP: {problem}")
            return SKIP
    if not shutil.which(args.qemu):
        print(f"SKIP: QEMU '{args.qemu}' not found")
        return SKIP
    args.cpu = "max"
    if args.accel == "kvm":
        try:
            args.cpu = kvm_cpu_model(args.qemu)
        except RuntimeError as e:
            print(f"SKIP: {e}")
            return SKIP
        print(f"KVM CPU model on this machine: {args.cpu}")
    if not os.path.exists(args.elf):
        print(f"FAIL: guest '{args.elf}' not built")
        return 1

    with tempfile.TemporaryDirectory(prefix="kvmx-fsguest-") as tmp:
        vm = None
        try:
            vm = Vm(args, tmp)
            vm.boot(args.timeout)
            khz = test_protocol(vm)
            measure(vm, args.n, args.k, khz)
            test_quit(vm)
            vm.close()
            vm = Vm(args, tmp)
            vm.boot(args.timeout)
            test_exception(vm)
        except (Failure, GuestError, QmpError, TimeoutError, EOFError,
                OSError) as e:
            print(f"FAIL: {type(e).__name__}: {e}")
            if vm and vm.guest and vm.guest.chatter:
                print("guest also said: " + " | ".join(vm.guest.chatter))
            if vm:
                print("QEMU stderr: " + (vm.stderr() or "(empty)"))
            return 1
        finally:
            if vm:
                vm.close()
    print("PASS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
