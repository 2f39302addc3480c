"""Run kvmx-hostd for a test and talk to its API (docs/specs/hostd-api.md).
Python 3 standard library only.

    hostd = Hostd(work, extra_args=['--libvirt', 'qemu:///system'])
    hostd.start()
    hostd.call('attach', vm='vm1', qmp=path)
    hostd.wait_vm('vm1', lambda v: v['state'] == 'attached', 60)
    hostd.kill()            # SIGKILL by default; returns the exit status
"""
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def hostd_binary():
    build = os.environ.get('KVMX_BUILD_DIR') or str(REPO_ROOT / 'build')
    return os.path.join(build, 'hostd', 'kvmx-hostd')


class Hostd:
    """kvmx-hostd in the foreground; socket, state and log in `work`
    (the socket in `sock_dir` when given: a Unix socket path is short)."""

    def __init__(self, work, sock_dir=None, extra_args=()):
        self.sock = os.path.join(sock_dir or work, 'hostd.sock')
        self.state = os.path.join(work, 'hostd-state')
        self.log_path = os.path.join(work, 'hostd.log')
        self.extra_args = list(extra_args)
        self.proc = None

    def start(self, timeout=30):
        with open(self.log_path, 'ab') as log:
            self.proc = subprocess.Popen(
                [hostd_binary(), '--foreground', '--socket', self.sock,
                 '--state-dir', self.state, '--log-format', 'json'] +
                self.extra_args, stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f'kvmx-hostd exited with '
                                   f'{self.proc.returncode}: {self.tail()}')
            try:
                if 'result' in self.call('ping'):
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f'kvmx-hostd did not answer: {self.tail()}')

    def send(self, data):
        """One raw request line; the parsed response ({} if none)."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(30)
            s.connect(self.sock)
            s.sendall(data)
            buf = b''
            while not buf.endswith(b'\n'):
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
            return json.loads(buf) if buf else {}

    def call(self, op, **fields):
        return self.send((json.dumps({'op': op, **fields}) + '\n').encode())

    def vm(self, name):
        vms = self.call('list-vms').get('result', {}).get('vms', [])
        return next((v for v in vms if v['vm'] == name), None)

    def wait_vm(self, name, pred, timeout):
        """The VM's list-vms entry once pred(entry) holds, else the last one."""
        deadline = time.monotonic() + timeout
        while True:
            v = self.vm(name)
            if (v and pred(v)) or time.monotonic() > deadline:
                return v
            time.sleep(0.2)

    def violations(self, vm, limit=1000):
        r = self.call('violations', vm=vm, limit=limit)
        return r.get('result', {}).get('violations', [])

    def kill(self, sig=signal.SIGKILL):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode if self.proc else None

    def stop(self):
        return self.kill(signal.SIGTERM)

    def tail(self, n=3000):
        try:
            return open(self.log_path, errors='replace').read()[-n:]
        except OSError:
            return ''
