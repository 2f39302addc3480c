"""kvmx test harness: start QEMU, talk QMP, capture the serial console and
boot the test guest built by scripts/mkguest.  Python 3 standard library only.

    rc, console = run_guest_script(qemu, "cat /proc/cpuinfo", [], workdir, "t1")
    with start_guest(qemu, script, extra_args, workdir, "t2") as vm:
        vm.wait_console(r"ready", 120); vm.qmp.cmd("query-status")
        rc = wait_guest_exit(vm, 300)

QEMU runs under `setpriv --pdeathsig KILL` (when available): it dies with the
thread that started it, even if the test process is killed hard.
"""
import atexit
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

# Kernel command line for the guest (documented in scripts/mkguest).
GUEST_APPEND = "console=ttyS0 panic=-1 quiet"
# Match the whole line: console output arrives in arbitrary chunks.
GUEST_EXIT_RE = re.compile(r"KVMX-GUEST-EXIT (\d+)\r?\n")
DEFAULT_QEMU = "/usr/bin/qemu-system-x86_64"
REPO_ROOT = Path(__file__).resolve().parents[2]

_live_vms = set()           # Vm objects whose QEMU may still run (atexit)


def skip(reason):
    """Tell meson (and humans) that this test is skipped: exit code 77."""
    print(f"SKIP: {reason}", flush=True)
    sys.exit(77)


def default_qemu():
    """The QEMU binary to test: $KVMX_QEMU, else the stock Debian one."""
    return os.environ.get("KVMX_QEMU") or DEFAULT_QEMU


def _unix_connect(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(str(path))
    except OSError:
        s.close()
        raise
    return s


def _close_sock(s):
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    s.close()


def _opt_path(path):
    """Escape a path for a QEMU -opt value (a comma is written as ',,')."""
    return str(path).replace(",", ",,")


class QmpError(Exception):
    """A QMP command answered with an error (desc is QEMU's description)."""

    def __init__(self, desc, cls=None):
        super().__init__(desc)
        self.desc = desc
        self.cls = cls


class QemuExited(RuntimeError):
    """QEMU ended while we were waiting for something."""


class Qmp:
    """A QMP client on a unix socket.  A reader thread files replies by id
    and queues asynchronous events.  With oob=True it asks for out-of-band
    execution, and cmd(..., oob=True) runs a command that allows it
    (migrate-recover, migrate-pause, yank, query-yank) on the monitor's own
    thread, even while QEMU's main loop is blocked."""

    def __init__(self, path, timeout=10.0, oob=False):
        self.sock = _unix_connect(path)
        self.sock.settimeout(timeout)       # for the greeting
        self._rfile = self.sock.makefile("rb")
        greeting = json.loads(self._rfile.readline() or b"{}")
        if "QMP" not in greeting:
            raise QmpError(f"bad QMP greeting: {greeting!r}")
        self.sock.settimeout(None)
        self._cond = threading.Condition()
        self._replies = {}
        self._events = []
        self._closed = False
        self._next_id = 0
        self._thread = threading.Thread(target=self._reader, daemon=True,
                                        name=f"qmp-{path}")
        self._thread.start()
        if oob:
            if "oob" not in greeting["QMP"].get("capabilities", []):
                raise QmpError("this monitor does not offer out-of-band "
                               "execution")
            self.cmd("qmp_capabilities", enable=["oob"])
        else:
            self.cmd("qmp_capabilities")

    def _reader(self):
        try:
            for line in self._rfile:
                try:
                    msg = json.loads(line)
                except ValueError:
                    continue
                with self._cond:
                    if "event" in msg:
                        self._events.append(msg)
                    elif "id" in msg:
                        self._replies[msg["id"]] = msg
                    self._cond.notify_all()
        except (OSError, ValueError):
            pass
        finally:
            with self._cond:
                self._closed = True
                self._cond.notify_all()

    def cmd(self, name, args=None, timeout=60.0, oob=False, **kwargs):
        """Run a QMP command; return its 'return' value or raise QmpError.
        Arguments come from the dict `args` (for names with '-', e.g.
        {"mem-path": ...}) and/or keyword arguments.  oob=True executes it
        out of band (the client must have been made with oob=True)."""
        arguments = dict(args or {}, **kwargs)
        with self._cond:
            self._next_id += 1
            cid = self._next_id
        msg = {"exec-oob" if oob else "execute": name, "id": cid}
        if arguments:
            msg["arguments"] = arguments
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        reply = self._wait_for(lambda: self._replies.pop(cid, None),
                               f"the reply to {name}", timeout)
        if "error" in reply:
            err = reply["error"]
            raise QmpError(err.get("desc", str(err)), err.get("class"))
        return reply.get("return")

    def events(self, clear=True):
        """The events received so far (and forget them unless clear=False)."""
        with self._cond:
            evs = list(self._events)
            if clear:
                self._events.clear()
        return evs

    def wait_event(self, name, timeout=60.0):
        """Remove and return the first queued event called `name`, waiting
        up to `timeout` seconds for it."""
        def take():
            for i, ev in enumerate(self._events):
                if ev["event"] == name:
                    return self._events.pop(i)
            return None
        return self._wait_for(take, f"event {name}", timeout)

    def _wait_for(self, take, what, timeout):
        """Wait until take() (called with the lock held) returns non-None."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while (got := take()) is None:
                left = deadline - time.monotonic()
                if self._closed:
                    raise QmpError(f"QMP connection closed waiting for {what}")
                if left <= 0:
                    raise TimeoutError(f"no QMP {what} in {timeout}s")
                self._cond.wait(left)
        return got

    def close(self):
        _close_sock(self.sock)
        self._thread.join(5)


class Vm:
    """One QEMU process with QMP at <workdir>/<name>.qmp and the first serial
    port at <workdir>/<name>.serial; console output is appended to
    <workdir>/<name>.console and kept in memory, stderr goes to
    <workdir>/<name>.stderr.  QEMU is started paused (-S) and continued
    once the console is connected so no output is lost; put -S in `args`
    to keep it paused.  Use as a context manager: QEMU never outlives it."""

    def __init__(self, qemu_binary, args, workdir, name="vm", prefix=()):
        self.qemu = str(qemu_binary)
        # A command QEMU runs under, e.g. ["ip", "netns", "exec", NS].
        self.prefix = [str(a) for a in prefix]
        self.args = [str(a) for a in args]
        self.workdir = Path(workdir)
        self.name = name
        self.workdir.mkdir(parents=True, exist_ok=True)
        sockdir = self.workdir
        # sun_path is limited to 108 bytes: use a short directory if needed.
        self._sockdir_tmp = None
        if len(str(self.workdir / f"{name}.serial")) > 100:
            self._sockdir_tmp = sockdir = Path(tempfile.mkdtemp(prefix="kvmx-"))
        self.qmp_path = sockdir / f"{name}.qmp"
        self.serial_path = sockdir / f"{name}.serial"
        self.console_path = self.workdir / f"{name}.console"
        self.stderr_path = self.workdir / f"{name}.stderr"
        self.proc = self._qmp = self._serial = self._reader = None
        self._console_file = None
        self._buf = bytearray()             # console output so far
        self._cond = threading.Condition()  # guards _buf, _serial_eof
        self._serial_eof = False

    # -- lifecycle ---------------------------------------------------------
    def start(self, timeout=30.0):
        """Start QEMU, connect console and QMP; returns self."""
        for p in (self.qmp_path, self.serial_path):
            p.unlink(missing_ok=True)
        keep_paused = "-S" in self.args
        cmd = [self.qemu, "-S", "-nographic", "-nodefaults",
               "-qmp", f"unix:{_opt_path(self.qmp_path)},server=on,wait=off",
               "-chardev", f"socket,id=ser0,path={_opt_path(self.serial_path)},"
                           "server=on,wait=off",
               "-serial", "chardev:ser0"] + self.args
        cmd = self.prefix + cmd
        if shutil.which("setpriv"):
            cmd = ["setpriv", "--pdeathsig", "KILL", "--"] + cmd
        self.cmdline = cmd
        self._console_file = open(self.console_path, "wb")
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL,
                                         stdout=err, stderr=err)
        _live_vms.add(self)
        try:
            self._serial = self._retry("connecting to the serial socket", timeout,
                                       _unix_connect, self.serial_path)
            self._reader = threading.Thread(target=self._read_serial, daemon=True,
                                            name=f"serial-{self.name}")
            self._reader.start()
            self._qmp = self._retry("connecting to QMP", timeout, Qmp, self.qmp_path)
            if not keep_paused:
                self._qmp.cmd("cont")
        except BaseException:
            self.shutdown(timeout=0)
            raise
        return self

    def _retry(self, what, timeout, fn, *args):
        """fn(*args) until it stops failing (the socket is not there at once);
        give up if QEMU ends or after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return fn(*args)
            except (OSError, QmpError):
                self._check_alive(what)
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def _check_alive(self, what):
        if self.proc.poll() is not None:
            raise QemuExited(f"QEMU exited with {self.proc.returncode} while "
                             f"{what}; stderr:\n{self.stderr_text()}")

    def _read_serial(self):
        try:
            while True:
                data = self._serial.recv(65536)
                if not data:
                    break
                with self._cond:
                    self._buf += data
                    self._console_file.write(data)
                    self._console_file.flush()
                    self._cond.notify_all()
        except (OSError, ValueError):   # socket closed / file closed
            pass
        finally:
            with self._cond:
                self._serial_eof = True
                self._cond.notify_all()

    @property
    def qmp(self):
        if self._qmp is None:
            raise RuntimeError(f"VM {self.name} is not running")
        return self._qmp

    @property
    def returncode(self):
        return None if self.proc is None else self.proc.poll()

    def kill(self, sig=signal.SIGKILL):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout=None):
        """QEMU's exit code (raises subprocess.TimeoutExpired)."""
        return self.proc.wait(timeout)

    def shutdown(self, timeout=10.0):
        """Quit through QMP, kill QEMU if it is still there after `timeout`,
        and release everything.  Safe to call more than once."""
        if self.proc is None:
            return None
        if self.proc.poll() is None and self._qmp is not None and timeout > 0:
            try:
                self._qmp.cmd("quit", timeout=min(timeout, 5))
            except (QmpError, OSError, TimeoutError):
                pass
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            self.proc.wait()
        if self._qmp is not None:
            self._qmp.close()
            self._qmp = None
        if self._serial is not None:
            _close_sock(self._serial)
        if self._reader is not None:
            self._reader.join(5)
        if self._console_file is not None and not self._console_file.closed:
            with self._cond:
                self._console_file.close()
        for p in (self.qmp_path, self.serial_path):
            p.unlink(missing_ok=True)
        if self._sockdir_tmp is not None:
            shutil.rmtree(self._sockdir_tmp, ignore_errors=True)
        _live_vms.discard(self)
        return self.proc.returncode

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self._report_on_failure(exc_type)
        self.shutdown()
        return False

    def _report_on_failure(self, exc_type):
        """A test is leaving with an exception while this QEMU is up (or
        after it died): print what a CI log reader needs, since the work
        files stay on a machine nobody can see."""
        rc = self.proc.poll() if self.proc is not None else None
        state = "running" if rc is None else f"exited with {rc}"
        tail = "\n".join(self.stderr_text().splitlines()[-30:])
        con = "\n".join(self.console_text().splitlines()[-15:])
        print(f"--- {self.name}: {exc_type.__name__} raised; QEMU {state}\n"
              f"--- {self.name} stderr (last 30 lines):\n{tail}\n"
              f"--- {self.name} console (last 15 lines):\n{con}\n---",
              file=sys.stderr, flush=True)

    # -- console -----------------------------------------------------------
    def console_text(self):
        """Everything the guest printed on its serial console so far."""
        with self._cond:
            data = bytes(self._buf)
        return data.decode("utf-8", "replace").replace("\r\n", "\n")

    def stderr_text(self):
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    def send_serial(self, data):
        """Write bytes (or str) to the guest's serial port."""
        if isinstance(data, str):
            data = data.encode()
        self._serial.sendall(data)

    def serial_stream(self):
        """A socket-like view of the serial port (sendall/recv/settimeout)
        for protocol drivers such as fsguest.FsGuest.  It reads what the
        console reader captured, from the moment it is made."""
        return _SerialStream(self)

    def wait_console(self, regex, timeout=60.0, start=0):
        """Wait until `regex` matches the console text (from offset `start`)
        and return the re.Match.  Raises TimeoutError, or QemuExited at once
        if QEMU ends first; both messages carry the console tail.  The text
        may end mid-line: end the pattern with \n if the line must be whole."""
        rx = re.compile(regex) if isinstance(regex, str) else regex
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self.console_text(), start)
            if m:
                return m
            if self.proc.poll() is not None:
                # QEMU is gone: let the reader drain what is left, look again.
                with self._cond:
                    self._cond.wait_for(lambda: self._serial_eof, 2)
                m = rx.search(self.console_text(), start)
                if m:
                    return m
                raise QemuExited(
                    f"QEMU exited with {self.proc.returncode} before the console "
                    f"matched {rx.pattern!r}; stderr:\n{self.stderr_text()}\n"
                    f"console tail:\n{self.console_text()[-3000:]}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(
                    f"console did not match {rx.pattern!r} in {timeout}s; "
                    f"console tail:\n{self.console_text()[-3000:]}")
            with self._cond:
                self._cond.wait(min(left, 0.2))


class _SerialStream:
    """Reads the bytes a Vm's console reader captured, in order, from the
    point the stream was made; writes go straight to the serial socket."""

    def __init__(self, vm):
        self._vm = vm
        with vm._cond:
            self._pos = len(vm._buf)
        self._timeout = None

    def settimeout(self, t):
        self._timeout = t

    def sendall(self, data):
        self._vm.send_serial(data)

    def recv(self, n):
        vm = self._vm
        with vm._cond:
            ok = vm._cond.wait_for(
                lambda: len(vm._buf) > self._pos or vm._serial_eof,
                self._timeout)
            if not ok:
                raise socket.timeout("no serial data")
            data = bytes(vm._buf[self._pos:self._pos + n])
            self._pos += len(data)
            return data


@atexit.register
def _kill_leftovers():
    for vm in list(_live_vms):
        vm.kill()
        vm.shutdown(timeout=0)


# -- the test guest ----------------------------------------------------------
class GuestImageMissing(FileNotFoundError):
    """build/guest is incomplete: run scripts/mkguest (tests skip)."""


def build_dir():
    """The build directory: $KVMX_BUILD_DIR (meson sets it for every test;
    a git worktree without a build of its own points it at one), else
    <repo>/build."""
    return Path(os.environ.get("KVMX_BUILD_DIR") or REPO_ROOT / "build")


def guest_image(repo_root=None):
    """(vmlinuz, initrd) built by scripts/mkguest ($KVMX_GUEST_DIR overrides
    <build>/guest; with repo_root, <repo_root>/build/guest)."""
    d = Path(os.environ.get("KVMX_GUEST_DIR") or
             (Path(repo_root) / "build" if repo_root else build_dir()) /
             "guest")
    kernel, initrd = d / "vmlinuz", d / "initramfs.cpio.gz"
    for f in (kernel, initrd):
        if not f.is_file():
            raise GuestImageMissing(f"guest image missing: {f} (run scripts/mkguest)")
    return kernel, initrd


def start_guest(qemu, script_text, extra_args=(), workdir=".", name="guest",
                accel="tcg", mem="1G", append_extra="", repo_root=None,
                prefix=()):
    """Boot the test guest and return the running Vm (the caller owns it;
    use `with`).  script_text is handed to the guest's /init through fw_cfg
    (None: no script; then /init uses kvmx.script= or a shell).  extra_args
    may add -machine options, -object, -device, or its own -m/-cpu."""
    kernel, initrd = guest_image(repo_root)
    extra = [str(a) for a in extra_args]
    args = ["-machine", f"q35,accel={accel}"]
    if "-cpu" not in extra:
        args += accel_cpu_args(accel, qemu)
    if "-m" not in extra:
        args += ["-m", mem]
    append = f"{GUEST_APPEND} {append_extra}".strip()
    args += ["-kernel", str(kernel), "-initrd", str(initrd),
             "-append", append, "-no-reboot"]
    if script_text is not None:
        script = Path(workdir) / f"{name}.script"
        script.parent.mkdir(parents=True, exist_ok=True)
        script.write_text(script_text)
        args += ["-fw_cfg", f"name=opt/kvmx/script,file={_opt_path(script)}"]
    return Vm(qemu, args + extra, workdir, name, prefix=prefix).start()


def wait_guest_exit(vm, timeout=300.0):
    """Wait for the guest's "KVMX-GUEST-EXIT <rc>" line and for QEMU to end;
    returns the guest script's exit code."""
    t0 = time.monotonic()
    rc = int(vm.wait_console(GUEST_EXIT_RE, timeout).group(1))
    try:
        vm.wait(max(timeout - (time.monotonic() - t0), 30))
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"guest reported exit {rc} but QEMU did not end; "
                           f"stderr:\n{vm.stderr_text()}") from None
    return rc


def run_guest_script(qemu, script_text, extra_args=(), workdir=".", name="guest",
                     timeout=300, accel="tcg", mem="1G", append_extra=""):
    """Boot the test guest, run script_text in it; returns (guest_rc, console)."""
    with start_guest(qemu, script_text, extra_args, workdir, name,
                     accel=accel, mem=mem, append_extra=append_extra) as vm:
        rc = wait_guest_exit(vm, timeout)
        return rc, vm.console_text()


def vhost_user_blk():
    """QEMU's contrib/vhost-user-blk (a vhost-user backend process):
    $KVMX_VHOST_USER_BLK, else the one scripts/build puts next to the
    patched QEMU; None if there is none."""
    p = os.environ.get("KVMX_VHOST_USER_BLK") or str(build_dir() / "qemu" /
                                                      "vhost-user-blk")
    return p if os.access(p, os.X_OK) else None


def patched_qemu():
    """The patched QEMU under test: $KVMX_QEMU, else the one scripts/build
    made.  Skips the test if there is none."""
    q = os.environ.get("KVMX_QEMU") or str(build_dir() / "qemu" /
                                           "qemu-system-x86_64")
    if not os.access(q, os.X_OK):
        skip(f"patched QEMU not found at {q} (run scripts/build)")
    return q


def stock_qemu():
    """Debian's unpatched QEMU, for side-by-side checks."""
    q = os.environ.get("KVMX_STOCK_QEMU") or DEFAULT_QEMU
    if not os.access(q, os.X_OK):
        skip(f"stock QEMU not found at {q} (run scripts/setup)")
    return q


def scratch_dir():
    """A directory on a real disk filesystem (not tmpfs) for backing files,
    so that page-cache dirtiness and fdatasync mean what they do on a host."""
    d = Path(os.environ.get("KVMX_SCRATCH") or build_dir() / "scratch")
    d.mkdir(parents=True, exist_ok=True)
    return str(d)


# -- the CPU model for -accel kvm --------------------------------------------
# Machines of this kind differ: on some AMD EPYC hosts KVM refuses the
# IA32_ARCH_CAPABILITIES MSR that `-cpu host` asks for, and QEMU dies at
# start ("failed to set MSR 0x10a", an assertion in kvm_buf_set_msrs).  Every
# test and benchmark that runs QEMU under KVM takes its CPU model from here,
# and the model is checked on this machine, not assumed.
KVM_CPU_CANDIDATES = ("host", "host,-arch-capabilities")
_kvm_cpu_cache = {}


def _kvm_cpu_works(qemu, model, timeout=20):
    """Start QEMU paused under KVM with `model`, let its vCPU run, quit.
    True if the vCPU started (QEMU answered query-status as running)."""
    cmds = ('{"execute":"qmp_capabilities"}\n{"execute":"cont"}\n'
            '{"execute":"query-status"}\n{"execute":"quit"}\n')
    try:
        p = subprocess.run(
            [qemu, "-accel", "kvm", "-cpu", model, "-machine", "q35",
             "-m", "64M", "-nodefaults", "-display", "none", "-S",
             "-qmp", "stdio"],
            input=cmds, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, "timed out"
    except OSError as e:
        return False, f"cannot run {qemu}: {e.strerror}"
    ok = '"running": true' in p.stdout and p.returncode == 0
    why = (p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[0]
    return ok, why


def kvm_cpu_model_or_skip(qemu=None):
    """kvm_cpu_model(), or skip the test (exit 77) saying why."""
    try:
        return kvm_cpu_model(qemu)
    except RuntimeError as e:
        skip(str(e))


def kvm_cpu_model(qemu=None):
    """The -cpu value to use with -accel kvm on this machine: the first of
    KVM_CPU_CANDIDATES that QEMU starts with ($KVMX_KVM_CPU overrides).
    Raises RuntimeError naming each failure when none works."""
    if os.environ.get("KVMX_KVM_CPU"):
        return os.environ["KVMX_KVM_CPU"]
    qemu = qemu or default_qemu()
    if qemu in _kvm_cpu_cache:
        return _kvm_cpu_cache[qemu]
    failures = []
    for model in KVM_CPU_CANDIDATES:
        ok, why = _kvm_cpu_works(qemu, model)
        if ok:
            _kvm_cpu_cache[qemu] = model
            return model
        failures.append(f"-cpu {model}: {why}")
    raise RuntimeError("no CPU model starts under KVM here: " +
                       "; ".join(failures))


def accel_cpu_args(accel, qemu=None):
    """['-cpu', MODEL] for `accel` ('kvm' or 'tcg') on this machine."""
    return ["-cpu", kvm_cpu_model(qemu) if accel == "kvm" else "max"]


if __name__ == "__main__":
    # scripts and shell tests: `python3 tests/lib/kvmxvm.py kvm-cpu [QEMU]`
    if len(sys.argv) >= 2 and sys.argv[1] == "kvm-cpu":
        try:
            print(kvm_cpu_model(sys.argv[2] if len(sys.argv) > 2 else None))
        except RuntimeError as e:
            print(f"kvmxvm: {e}", file=sys.stderr)
            sys.exit(1)
    else:
        print("usage: kvmxvm.py kvm-cpu [QEMU]", file=sys.stderr)
        sys.exit(2)
