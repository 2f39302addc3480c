#!/usr/bin/env python3
"""kvmx-hostd end to end, against a fake QMP server: attach, violations
recorded and streamed, malformed clients, SIGKILL and restart (the attach
and the violations survive, the VM is re-attached), a torn journal tail, the
VM going away, detach, SIGTERM.  With --libvirt and no libvirtd to reach:
hostd serves as before, retries the connection, keeps the journal's libvirt
domains (disconnected; stopped without --libvirt).  The real libvirt side is
tests/integration/test_libvirt.py.

    test_hostd_daemon.py KVMX_HOSTD KVMX_HOSTCTL
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zlib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fake_qmp import DEVICES, FakeQmp  # noqa: E402


def skip(why):
    print(f"SKIP: {why}")
    sys.exit(77)


def wait_for(what, pred, timeout=10.0, step=0.05):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = pred()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out waiting for {what}")


class Api:
    """One connection to hostd's API socket."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(path)
        self.buf = b""

    def send_raw(self, data):
        self.sock.sendall(data)

    def read_line(self):
        while b"\n" not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                return None
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def call(self, op, **fields):
        self.send_raw((json.dumps({"op": op, **fields}) + "\n").encode())
        while True:
            msg = self.read_line()
            assert msg is not None, f"connection closed during {op}"
            if "event" not in msg:
                return msg

    def close(self):
        self.sock.close()


def result(resp):
    assert "result" in resp, f"expected a result, got {resp}"
    return resp["result"]


def error_code(resp):
    assert "error" in resp, f"expected an error, got {resp}"
    return resp["error"]["code"]


PROCS = []  # every hostd started, killed at the end whatever happens


class Hostd:
    def __init__(self, exe, workdir, name="hostd", extra=()):
        self.exe = exe
        self.sock = os.path.join(workdir, name + ".sock")
        self.state = os.path.join(workdir, name + "-state")
        self.log = os.path.join(workdir, name + ".log")
        self.extra = list(extra)
        self.proc = None

    def args(self):
        return [self.exe, "--foreground", "--socket", self.sock,
                "--state-dir", self.state, "--log-format", "json",
                "--log-level", "debug", "-o", "reconnect-max-ms=200",
                "-o", "attach-timeout-ms=3000", "-o", "qmp-timeout-ms=2000"
                ] + self.extra

    def start(self):
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(self.args(), stdout=log, stderr=log)
        PROCS.append(self.proc)
        wait_for("hostd's socket", self._answers)

    def _answers(self):
        assert self.proc.poll() is None, \
            f"hostd exited with {self.proc.returncode}; see {self.log}"
        try:
            api = Api(self.sock)
            ok = result(api.call("ping"))["pong"]
            api.close()
            return ok
        except OSError:
            return False

    def api(self):
        return Api(self.sock)

    def kill(self, sig=signal.SIGKILL):
        self.proc.send_signal(sig)
        return self.proc.wait(10)


def vm_state(hostd, name):
    api = hostd.api()
    vms = result(api.call("list-vms"))["vms"]
    api.close()
    for vm in vms:
        if vm["vm"] == name:
            return vm
    return None


def violation(seq, suppressed=0, gpa=65536000):
    return {"device": "chan0", "seq": seq, "id": 1, "gpa": gpa,
            "access": "write", "action": "signal", "size": 4, "pid": 123,
            "vaddr": 140737488314372, "suppressed": suppressed}


def run(hostd_exe, hostctl_exe, work):
    qmp_path = os.path.join(work, "vm1.qmp")
    fake = FakeQmp(qmp_path)
    hostd = Hostd(hostd_exe, work)
    hostd.start()
    api = hostd.api()

    # -- Basic ops and attach errors.
    v = result(api.call("version", id="v1"))
    assert v["api"] == 1 and v["version"], v
    assert error_code(api.call("attach", vm="vm0",
                               qmp=os.path.join(work, "nope.qmp"))) \
        == "qmp-connect-failed"
    assert error_code(api.call("attach", vm="bad name", qmp=qmp_path)) \
        == "invalid-request"
    assert error_code(api.call("protections", vm="vm0")) == "vm-not-found"

    # A peer that is not QMP: refused, nothing recorded, nothing written to it.
    not_qmp = os.path.join(work, "ssh.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(not_qmp)
    srv.listen(1)
    got = []

    def fake_ssh():
        conn, _ = srv.accept()
        conn.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")
        got.append(conn.recv(4096))
        conn.close()
    threading.Thread(target=fake_ssh, daemon=True).start()
    assert error_code(api.call("attach", vm="ssh", qmp=not_qmp)) \
        == "qmp-handshake-failed"
    wait_for("the non-QMP peer to see hostd hang up", lambda: got)
    assert got == [b""], got
    assert result(api.call("list-vms"))["vms"] == []
    srv.close()

    # -- Attach: handshake, query-kvmx-chan, state attached.
    info = result(api.call("attach", vm="vm1", qmp=qmp_path, id=1))
    assert info["state"] == "attached", info
    assert info["source"] == "qmp", info
    assert info["devices"] == DEVICES, info
    assert info["qemu"] == "10.0.0", info
    assert fake.commands[:2] == ["qmp_capabilities", "query-kvmx-chan"]
    # Same again: idempotent.  Same socket under another name: refused.
    assert result(api.call("attach", vm="vm1", qmp=qmp_path))["state"] \
        == "attached"
    assert error_code(api.call("attach", vm="vm2", qmp=qmp_path)) \
        == "qmp-in-use"
    prot = result(api.call("protections", vm="vm1"))
    assert prot["devices"] == DEVICES, prot

    # -- Violations: recorded, streamed to subscribers, totals exact.
    sub = hostd.api()
    assert result(sub.call("subscribe"))["subscribed"] is True
    fake.emit("KVMX_VIOLATION", violation(1))
    fake.emit("KVMX_VIOLATION", violation(2, suppressed=4, gpa=65540096))
    events = [sub.read_line(), sub.read_line()]
    assert [e["event"] for e in events] == ["violation", "violation"], events
    assert [e["device_seq"] for e in events] == [1, 2], events
    assert events[1]["suppressed"] == 4 and events[1]["vm"] == "vm1"
    got = result(api.call("violations", vm="vm1"))
    items = got["violations"]
    assert len(items) == 2 and not got["more"], got
    first_seqs = [i["seq"] for i in items]
    assert items[1]["gpa"] == 65540096 and items[1]["pid"] == 123, items
    assert items[0]["qemu_time"] == "2023-11-14T22:13:20.000001Z", items
    vm = vm_state(hostd, "vm1")
    assert vm["violations"] == 6 and vm["violation_events"] == 2, vm

    # Hostile QMP events: counted, not recorded, not fatal.
    fake.emit("KVMX_VIOLATION", {"device": "chan0", "seq": "x"})
    fake.emit("KVMX_CHAN_REJECTED", {"device": "chan0", "op": 2, "error": 22,
                                     "reason": "extent 3 is not page aligned"})
    ev = sub.read_line()
    assert ev["event"] == "chan-rejected" and ev["errno"] == 22, ev
    stats = result(api.call("stats"))
    assert stats["violation_events_bad"] == 1, stats
    assert stats["chan_rejected"] == 1, stats
    assert stats["violations"] == 2, stats
    assert vm_state(hostd, "vm1")["rejected"] == 1

    # -- Malformed clients get errors; hostd keeps serving.
    bad = hostd.api()
    bad.send_raw(b"garbage\n[1]\n{\"op\":\"fly\",\"id\":3}\n"
                 b"{\"op\":\"violations\",\"limit\":\"x\"}\n")
    codes = [bad.read_line()["error"]["code"] for _ in range(4)]
    assert codes == ["parse-error", "invalid-request", "unknown-op",
                     "invalid-request"], codes
    bad.send_raw(b"x" * 70000)
    assert bad.read_line()["error"]["code"] == "line-too-long"
    assert bad.read_line() is None  # closed
    bad.close()
    stats = result(api.call("stats"))
    assert stats["requests_rejected"] == 6, stats  # with "bad name"
    assert stats["libvirt"] == {"enabled": False}, stats
    assert result(api.call("ping"))["pong"]

    # -- One hostd per state directory.
    second = subprocess.run(hostd.args()[:2] + [
        "--socket", os.path.join(work, "other.sock"),
        "--state-dir", hostd.state], capture_output=True, text=True,
        timeout=10)
    assert second.returncode == 1, second
    assert "another kvmx-hostd" in second.stderr, second.stderr

    # -- SIGKILL: the attach and the violations survive; re-attached.
    api.close()
    sub.close()
    hostd.kill()
    assert fake.wait_disconnected()
    hostd.start()
    assert fake.wait_connections(2), "hostd did not reconnect"
    vm = wait_for("vm1 re-attached",
                  lambda: (lambda v: v if v and v["state"] == "attached"
                           else None)(vm_state(hostd, "vm1")))
    assert vm["qmp"] == qmp_path and vm["violations"] == 6, vm
    api = hostd.api()
    items = result(api.call("violations"))["violations"]
    assert [i["seq"] for i in items] == first_seqs, items
    fake.emit("KVMX_VIOLATION", violation(3))
    wait_for("third violation",
             lambda: len(result(api.call("violations"))["violations"]) == 3)
    items = result(api.call("violations", since_seq=first_seqs[-1]))
    assert items["violations"][0]["seq"] > first_seqs[-1], items

    # kvmx-hostctl prints one response; exit 0 for a result, 1 for an error.
    out = subprocess.run([hostctl_exe, "-s", hostd.sock, "violations",
                          "vm=vm1", f"since_seq={first_seqs[0]}"],
                         capture_output=True, text=True, timeout=10)
    assert out.returncode == 0, out
    assert len(json.loads(out.stdout)["result"]["violations"]) == 2, out
    out = subprocess.run([hostctl_exe, "-s", hostd.sock, "detach", "vm=nope"],
                         capture_output=True, text=True, timeout=10)
    assert out.returncode == 1 and "vm-not-found" in out.stdout, out

    # -- A record torn by a crash is cut off at the next start.
    api.close()
    hostd.kill()
    with open(os.path.join(hostd.state, "journal"), "ab") as j:
        j.write(b'0badc0de {"t":"violation","seq":')
    hostd.start()
    api = hostd.api()
    stats = result(api.call("stats"))
    assert stats["journal"]["torn_bytes"] == 32, stats
    assert len(result(api.call("violations"))["violations"]) == 3
    wait_for("vm1 re-attached again",
             lambda: vm_state(hostd, "vm1")["state"] == "attached")

    # -- QEMU exits: the VM is gone, its violations stay.
    fake.close()
    wait_for("vm1 gone", lambda: vm_state(hostd, "vm1")["state"] == "gone")
    assert len(result(api.call("violations", vm="vm1"))["violations"]) == 3
    assert error_code(api.call("protections", vm="vm1")) == "vm-not-connected"

    # -- Detach removes the VM; the history remains queryable.
    assert result(api.call("detach", vm="vm1"))["detached"] is True
    assert result(api.call("list-vms"))["vms"] == []
    assert error_code(api.call("detach", vm="vm1")) == "vm-not-found"
    assert len(result(api.call("violations", vm="vm1"))["violations"]) == 3

    # -- Restart after detach: nothing to re-attach.
    api.close()
    hostd.kill()
    hostd.start()
    api = hostd.api()
    assert result(api.call("list-vms"))["vms"] == []
    api.close()

    # -- SIGTERM: clean exit, socket removed.
    assert hostd.kill(signal.SIGTERM) == 0
    assert not os.path.exists(hostd.sock)
    with open(hostd.log) as log:
        for line in log:
            rec = json.loads(line)  # --log-format json: one object per line
            assert {"ts", "level", "msg"} <= rec.keys(), rec


def run_compaction(hostd_exe, work):
    """A small ring: the journal is compacted as it grows; totals stay exact
    and the newest violations survive a SIGKILL."""
    qmp_path = os.path.join(work, "vm2.qmp")
    fake = FakeQmp(qmp_path)
    hostd = Hostd(hostd_exe, work, name="small",
                  extra=["-o", "max-violations=5", "-o", "max-vms=1"])
    hostd.start()
    api = hostd.api()
    assert result(api.call("attach", vm="vm2", qmp=qmp_path))["state"] \
        == "attached"
    assert error_code(api.call("attach", vm="vm3", qmp=qmp_path + "x")) \
        == "too-many-vms"
    for i in range(1, 201):
        fake.emit("KVMX_VIOLATION", violation(i, suppressed=1))
    wait_for("200 violations",
             lambda: result(api.call("stats"))["violations"] == 200)
    stats = result(api.call("stats"))
    assert stats["journal"]["compactions"] >= 1, stats
    assert stats["violations_stored"] == 5, stats
    assert stats["journal"]["records"] < 100, stats
    newest = [v["seq"] for v in
              result(api.call("violations"))["violations"]]
    assert len(newest) == 5, newest
    api.close()

    hostd.kill()
    hostd.start()
    vm = wait_for("vm2 re-attached",
                  lambda: (lambda v: v if v and v["state"] == "attached"
                           else None)(vm_state(hostd, "vm2")))
    assert vm["violations"] == 400 and vm["violation_events"] == 200, vm
    api = hostd.api()
    assert [v["seq"] for v in
            result(api.call("violations"))["violations"]] == newest
    fake.emit("KVMX_VIOLATION", violation(201))
    wait_for("seq continues", lambda: result(api.call(
        "violations", since_seq=newest[-1]))["violations"])
    assert vm_state(hostd, "vm2")["violations"] == 401
    api.close()
    assert hostd.kill(signal.SIGTERM) == 0
    fake.close()


def journal_line(rec):
    text = json.dumps(rec, sort_keys=True, separators=(",", ":"))
    return "%08x %s\n" % (zlib.crc32(text.encode()), text)


def run_libvirt_unreachable(hostd_exe, work):
    """--libvirt with no libvirtd behind the URI, and a journal that already
    follows a libvirt domain."""
    state = os.path.join(work, "lv-state")
    os.makedirs(state)
    uri = "qemu+unix:///system?socket=" + os.path.join(work, "no-libvirtd")
    with open(os.path.join(state, "journal"), "w") as j:
        j.write(journal_line({"t": "header", "format": "kvmx-hostd-journal",
                              "version": 1}))
        j.write(journal_line({"t": "libvirt-attach", "vm": "dom1",
                              "uri": "qemu:///system", "uuid": "u-1"}))
        rec = violation(7)
        rec["device_seq"] = rec.pop("seq")
        rec.update({"t": "violation", "vm": "dom1", "seq": 1,
                    "host_time": "2025-05-01T10:00:01.000123Z",
                    "qemu_time": "2025-05-01T10:00:01.000100Z"})
        j.write(journal_line(rec))
        # A damaged record: hostd compacts the journal at start, and the
        # rewrite must keep the libvirt domain.
        j.write('00000000 {"t":"violation"}\n')

    bad = subprocess.run([hostd_exe, "--foreground", "--socket",
                          os.path.join(work, "x.sock"), "--state-dir",
                          os.path.join(work, "x-state"), "--libvirt", "system"],
                         capture_output=True, text=True, timeout=10)
    assert bad.returncode == 1 and "libvirt-uri" in bad.stderr, bad

    hostd = Hostd(hostd_exe, work, name="lv", extra=["--libvirt", uri])
    hostd.state = state
    hostd.start()
    api = hostd.api()
    lv = wait_for("libvirt connection retried", lambda: (
        lambda s: s if s["connect_failures"] >= 3 else None)(
            result(api.call("stats"))["libvirt"]))
    assert lv["enabled"] and not lv["connected"] and lv["uri"] == uri, lv
    assert "no-libvirtd" in lv["last_error"], lv
    dom = vm_state(hostd, "dom1")
    assert dom["source"] == "libvirt" and dom["qmp"] is None, dom
    assert dom["state"] == "disconnected", dom
    assert dom["libvirt"] == {"uri": uri, "uuid": "u-1"}, dom
    assert dom["violations"] == 1, dom
    stats = result(api.call("stats"))
    assert stats["journal"]["compactions"] == 1, stats
    with open(os.path.join(state, "journal")) as j:
        assert '"t":"libvirt-attach"' in j.read()
    assert error_code(api.call("protections", vm="dom1")) == "vm-not-connected"
    assert error_code(api.call("attach", vm="dom1",
                               qmp=os.path.join(work, "dom1.qmp"))) \
        == "vm-exists"
    # Socket VMs work as ever next to it.
    qmp_path = os.path.join(work, "vm9.qmp")
    fake = FakeQmp(qmp_path)
    assert result(api.call("attach", vm="vm9", qmp=qmp_path))["state"] \
        == "attached"
    api.close()

    # Without --libvirt the journal's domain stays, stopped.
    hostd.kill()
    hostd.extra = []
    hostd.start()
    api = hostd.api()
    dom = vm_state(hostd, "dom1")
    assert dom["state"] == "stopped", dom
    assert dom["last_error"] == "kvmx-hostd runs without --libvirt", dom
    assert result(api.call("stats"))["libvirt"] == {"enabled": False}
    assert result(api.call("detach", vm="dom1"))["detached"] is True
    api.close()
    hostd.kill()
    hostd.start()
    assert vm_state(hostd, "dom1") is None
    assert vm_state(hostd, "vm9")["source"] == "qmp"
    assert hostd.kill(signal.SIGTERM) == 0
    fake.close()


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    hostd_exe, hostctl_exe = sys.argv[1:]
    if not hasattr(socket, "AF_UNIX"):
        skip("no Unix sockets")
    work = tempfile.mkdtemp(prefix="hostd-test-")
    try:
        run(hostd_exe, hostctl_exe, work)
        run_compaction(hostd_exe, work)
        run_libvirt_unreachable(hostd_exe, work)
    except BaseException:
        print(f"FAILED; work directory kept: {work}", file=sys.stderr)
        for name in ("hostd.log", "small.log", "lv.log"):
            log = os.path.join(work, name)
            if os.path.exists(log):
                with open(log) as f:
                    sys.stderr.write(f"--- {name}\n" + f.read()[-6000:])
        raise
    finally:
        for p in PROCS:
            if p.poll() is None:
                p.kill()
                p.wait()
    if not os.environ.get("HOSTD_TEST_KEEP"):
        shutil.rmtree(work, ignore_errors=True)
    print("hostd-daemon: all checks passed")


if __name__ == "__main__":
    main()
