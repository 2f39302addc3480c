"""A fake QEMU monitor for hostd tests: speaks QMP on a Unix socket, one
client at a time as QEMU does, answers qmp_capabilities and query-kvmx-chan,
and emits whatever events the test asks for."""

import json
import os
import socket
import threading

GREETING = {"QMP": {"version": {"qemu": {"major": 10, "minor": 0,
                                         "micro": 0},
                                "package": "fake"},
                    "capabilities": []}}

DEVICES = [{"id": "chan0", "qom-path": "/machine/peripheral/chan0",
            "violations": 0, "suppressed": 0, "rejected": 0,
            "events-dropped": 0, "protected-bytes": 4096,
            "tracked-bytes": 0,
            "entries": [{"id": 1, "kind": "protect", "access": "ro",
                         "action": "signal", "pid": 123,
                         "vaddr": 140737488314368, "bytes": 4096,
                         "extents": 1, "violations": 0}]}]


class FakeQmp:
    def __init__(self, path, devices=DEVICES):
        self.path = path
        self.devices = devices
        # Hostile or odd peers: the query-kvmx-chan answer as raw JSON text,
        # queries left unanswered, no greeting at all.
        self.devices_text = None
        self.answer_queries = True
        self.greet = True
        self.commands = []
        self.connections = 0
        self._conn = None
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._stop = False
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(path)
        self._sock.listen(4)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _send(self, conn, msg):
        conn.sendall((json.dumps(msg) + "\r\n").encode())

    def _serve(self):
        while not self._stop:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with self._cond:
                self._conn = conn
                self.connections += 1
                self._cond.notify_all()
            try:
                if self.greet:
                    self._send(conn, GREETING)
                buf = b""
                while True:
                    data = conn.recv(65536)
                    if not data:
                        break
                    buf += data
                    while b"\n" in buf:
                        line, buf = buf.split(b"\n", 1)
                        self._handle(conn, json.loads(line))
            except OSError:
                pass
            finally:
                with self._cond:
                    self._conn = None
                    self._cond.notify_all()
                conn.close()

    def _handle(self, conn, msg):
        cmd, cid = msg.get("execute"), msg.get("id")
        with self._cond:
            self.commands.append(cmd)
            self._cond.notify_all()
        if cmd == "qmp_capabilities":
            reply = {"return": {}}
        elif cmd == "query-kvmx-chan" and not self.answer_queries:
            return
        elif cmd == "query-kvmx-chan" and self.devices_text is not None:
            text = '{"id": %s, "return": %s}\r\n' % (json.dumps(cid),
                                                       self.devices_text)
            with self._lock:
                conn.sendall(text.encode())
            return
        elif cmd == "query-kvmx-chan":
            reply = {"return": self.devices}
        else:
            reply = {"error": {"class": "CommandNotFound",
                               "desc": f"The command {cmd} has not been found"}}
        if cid is not None:
            reply["id"] = cid
        with self._lock:
            self._send(conn, reply)

    def wait_connections(self, n, timeout=10):
        with self._cond:
            return self._cond.wait_for(
                lambda: self.connections >= n and self._conn is not None,
                timeout)

    def wait_disconnected(self, timeout=10):
        with self._cond:
            return self._cond.wait_for(lambda: self._conn is None, timeout)

    def emit(self, event, data):
        with self._lock:
            if self._conn is None:
                raise RuntimeError("no QMP client connected")
            self._send(self._conn, {
                "event": event, "data": data,
                "timestamp": {"seconds": 1700000000, "microseconds": 1}})

    def send_raw(self, data):
        """Bytes as they are, to the connected client."""
        with self._lock:
            if self._conn is None:
                raise RuntimeError("no QMP client connected")
            self._conn.sendall(data)

    def close(self):
        """QEMU exits: the listening socket goes away with its file."""
        self._stop = True
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes accept()
        except OSError:
            pass
        self._sock.close()
        with self._lock:
            if self._conn is not None:
                self._conn.shutdown(socket.SHUT_RDWR)
        self._thread.join(5)
