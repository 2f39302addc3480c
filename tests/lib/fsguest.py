"""Host-side driver for kvmx-testguest, the freestanding KVM test guest.

The guest (tests/kvm-guest) reads one command per line on its COM1 serial
port and answers each with exactly one line starting with "ok " or "err ".
This module wraps a connected byte stream to that serial port: a socket
(e.g. QEMU's ``-chardev socket,...``) or a file-like object with a real
``fileno()`` (a pty, a pipe).  Python 3 standard library only.

    guest = FsGuest(sock)
    guest.wait_ready(30)
    guest.write(0xff000000, 1000)
    print(guest.timed_write(0xff000000, 1000))   # {'n': 1000, 'min': ..}

Run ``python3 fsguest.py SOCKET CMD...`` to send raw commands to a guest
whose serial port is a listening unix socket (not already in use).
"""

import os
import secrets
import select
import socket
import sys
import time

READY_LINE = "kvmx-testguest ready"
STAT_KEYS = ("n", "min", "p50", "p90", "p99", "max", "avg")


class GuestError(RuntimeError):
    """The guest answered a command with "err ..."."""

    def __init__(self, command, message):
        super().__init__(f"'{command}': {message}")
        self.command = command
        self.message = message


class GuestFault(GuestError):
    """The guest took a CPU exception; it has halted."""


class GuestTimeout(TimeoutError):
    """No complete reply in time; call resync() before the next command."""


class FsGuest:
    """One kvmx-testguest, spoken to over a connected byte stream."""

    def __init__(self, stream, timeout=10.0, log=None):
        self._stream = stream
        self._buf = bytearray()
        self._in_sync = True
        self.timeout = timeout
        self.log = log              # callable(str) for traffic, or None
        self.chatter = []           # lines that were not replies

    # ---- transport -------------------------------------------------------

    def _send(self, data):
        if self.log:
            self.log("> " + data.decode("ascii").rstrip("\n"))
        if hasattr(self._stream, "sendall"):
            self._stream.sendall(data)
        else:
            self._stream.write(data)
            if hasattr(self._stream, "flush"):
                self._stream.flush()

    def _recv(self, timeout):
        """Up to 4 KiB, b"" after timeout seconds; EOFError when closed."""
        s = self._stream
        if hasattr(s, "recv"):
            s.settimeout(max(timeout, 0.001))
            try:
                data = s.recv(4096)
            except socket.timeout:
                return b""
        else:
            fd = s.fileno()
            ready, _, _ = select.select([fd], [], [], max(timeout, 0))
            if not ready:
                return b""
            data = os.read(fd, 4096)
        if not data:
            raise EOFError("guest serial stream closed")
        return data

    def _readline(self, deadline):
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise GuestTimeout("no complete line from the guest")
            self._buf += self._recv(left)
        raw, _, rest = bytes(self._buf).partition(b"\n")
        self._buf = bytearray(rest)
        line = raw.decode("ascii", "replace").strip("\r")
        if self.log and line:
            self.log("< " + line)
        return line

    def _next_reply(self, deadline):
        """Next "ok ..."/"err ..." line; other lines go to self.chatter."""
        while True:
            line = self._readline(deadline)
            if line.startswith(("ok ", "err ")):
                return line
            if line:
                self.chatter.append(line)

    # ---- commands --------------------------------------------------------

    def command(self, line, timeout=None):
        """Send one command line; return the reply text after "ok "."""
        if "\n" in line or "\r" in line:
            raise ValueError("a command is a single line")
        if not self._in_sync:
            raise GuestTimeout("an earlier reply is outstanding; resync()")
        deadline = time.monotonic() + (timeout or self.timeout)
        self._send(line.encode("ascii") + b"\n")
        try:
            reply = self._next_reply(deadline)
        except GuestTimeout:
            self._in_sync = False
            raise
        if reply.startswith("err exception"):
            raise GuestFault(line, reply[4:])
        if reply.startswith("err "):
            raise GuestError(line, reply[4:])
        return reply[3:]

    def resync(self, timeout=None):
        """Discard everything the guest says up to a fresh echo reply.

        An echo sent while the guest is still booting can be lost or cut
        (the guest resets its UART), so the first one is repeated until it
        is answered; a second, final echo then flushes any duplicate reply
        still in flight.
        """
        deadline = time.monotonic() + (timeout or self.timeout)
        self._echo_answered(deadline, repeat=1.0)
        self._echo_answered(deadline, repeat=None)
        self._in_sync = True

    def _echo_answered(self, deadline, repeat):
        token = secrets.token_hex(8)
        next_send = time.monotonic()
        while True:
            now = time.monotonic()
            if now >= deadline:
                raise GuestTimeout("the guest does not answer echo")
            if now >= next_send:
                self._send(f"echo {token}\n".encode("ascii"))
                next_send = now + repeat if repeat else deadline
            try:
                line = self._readline(min(deadline, next_send))
            except GuestTimeout:
                continue
            if line == f"ok echo {token}":
                return
            if line and not line.startswith(("ok ", "err ")):
                self.chatter.append(line)

    def wait_ready(self, timeout=30.0, probe_after=5.0):
        """Wait for the boot banner.

        If it does not come within probe_after seconds (the host may have
        connected after it was printed), fall back to resync().
        """
        start = time.monotonic()
        deadline = start + timeout
        try:
            while True:
                line = self._readline(min(deadline, start + probe_after))
                if line.endswith(READY_LINE):
                    return
                if line:
                    self.chatter.append(line)
        except GuestTimeout:
            pass
        left = deadline - time.monotonic()
        if left <= 0:
            raise GuestTimeout(f"no '{READY_LINE}' within {timeout} s")
        self.resync(left)

    def ping(self):
        if self.command("ping") != "pong":
            raise GuestError("ping", "unexpected reply")

    def info(self):
        """CPU facts the guest found: physbits, rdtscp, pdpe1gb, hv."""
        return _fields(self.command("info"), "info")

    def read(self, addr, n=1, timeout=None):
        """n 8-byte loads from addr; returns the XOR of the values."""
        reply = self.command(f"r {addr:#x} {n}", timeout)
        word, _, value = reply.partition(" ")
        if word != "r":
            raise GuestError("r", f"unexpected reply '{reply}'")
        return int(value, 16)

    def write(self, addr, n=1, timeout=None):
        """n stores of 1 to addr, each followed by sfence."""
        if self.command(f"w {addr:#x} {n}", timeout) != "w":
            raise GuestError("w", "unexpected reply")

    def poke(self, addr, size, value, timeout=None):
        """One store of size (1, 2, 4, 8) bytes of value to addr."""
        if self.command(f"p {addr:#x} {size} {value:#x}", timeout) != "p":
            raise GuestError("p", "unexpected reply")

    def peek(self, addr, size, timeout=None):
        """One load of size bytes from addr."""
        reply = self.command(f"k {addr:#x} {size}", timeout)
        word, _, value = reply.partition(" ")
        if word != "k":
            raise GuestError("k", f"unexpected reply '{reply}'")
        return int(value, 16)

    def out(self, port, size, value, timeout=None):
        """outb/outw/outl of value to an I/O port."""
        if self.command(f"o {port:#x} {size} {value:#x}", timeout) != "o":
            raise GuestError("o", "unexpected reply")

    def batch_read(self, addr, n, timeout=None):
        """n loads in one TSC window: dict with n, cycles (total), avg."""
        return _fields_int(self.command(f"br {addr:#x} {n}", timeout), "br")

    def sweep_read(self, addr, nbytes, timeout=None):
        """One load per 4 KiB page of [addr, addr + nbytes) in one TSC
        window: dict with n (pages), cycles, avg."""
        return _fields_int(self.command(f"sr {addr:#x} {nbytes}", timeout),
                           "sr")

    def batch_write(self, addr, n, timeout=None):
        """n stores+sfence in one TSC window: dict with n, cycles, avg."""
        return _fields_int(self.command(f"bw {addr:#x} {n}", timeout), "bw")

    def timed_write(self, addr, n, timeout=None):
        """Per-store TSC cycles: dict with n, min, p50, p90, p99, max, avg."""
        return _stats(self.command(f"tw {addr:#x} {n}", timeout), "tw")

    def timed_read(self, addr, n, timeout=None):
        """Per-load TSC cycles, like timed_write()."""
        return _stats(self.command(f"tr {addr:#x} {n}", timeout), "tr")

    def timed_nothing(self, n, timeout=None):
        """Empty TSC windows: the fixed cost included in each tr/tw sample."""
        return _stats(self.command(f"tn {n}", timeout), "tn")

    def tsc_khz(self, force_pit=False):
        """(kHz, source) with source "cpuid" or "pit"."""
        f = _fields(self.command("tsc pit" if force_pit else "tsc", 15),
                    "tsc")
        return int(f["khz"]), f["src"]

    def quit(self, code=0):
        """Exit QEMU through isa-debug-exit with status (code << 1) | 1."""
        if self.command(f"q {code}") != "q":
            raise GuestError("q", "unexpected reply")


def _fields(reply, word):
    head, *rest = reply.split()
    if head != word:
        raise GuestError(word, f"unexpected reply '{reply}'")
    return dict(item.partition("=")[::2] for item in rest)


def _fields_int(reply, word, keys=("n", "cycles", "avg")):
    f = _fields(reply, word)
    try:
        return {k: int(f[k]) for k in keys}
    except (KeyError, ValueError):
        raise GuestError(word, f"malformed statistics '{reply}'") from None


def _stats(reply, word):
    return _fields_int(reply, word, STAT_KEYS)


def main(argv):
    if len(argv) < 3:
        print(f"usage: {argv[0]} UNIX_SOCKET COMMAND...", file=sys.stderr)
        return 2
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(argv[1])
    guest = FsGuest(sock, timeout=60)
    guest.resync(30)
    for cmd in argv[2:]:
        try:
            print("ok", guest.command(cmd))
        except GuestError as e:
            print("err", e.message)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
