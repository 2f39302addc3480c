"""A small client of QEMU's purge agent (docs/specs/purge-agent.md), for
tests: HELLO, SWAP_OUT, MAP_BACK, ZAP, WAKE, and the FAULT messages."""
import array
import socket
import struct

MAGIC = 0x4b505247
VERSION = 1
HELLO, SWAP_OUT, MAP_BACK, ZAP, WAKE, FAULT = 1, 2, 3, 4, 5, 6
REQ = struct.Struct('<IHHQQQ')        # magic version op tag offset length
REP = struct.Struct('<IHHQiI6Q')      # magic version op tag status rsvd arg[6]


class Reply:
    def __init__(self, data, fds=()):
        (self.magic, self.version, self.op, self.tag, self.status, _,
         *self.arg) = REP.unpack(data)
        self.fds = list(fds)


class Agent:
    def __init__(self, path, timeout=10.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.tag = 0
        self.faults = []          # FAULT messages received while waiting

    def close(self):
        self.sock.close()

    def send_raw(self, data):
        self.sock.send(data)

    def recv(self):
        fds = array.array('i')
        data, anc, _, _ = self.sock.recvmsg(REP.size,
                                            socket.CMSG_SPACE(8))
        for level, typ, cdata in anc:
            if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                fds.frombytes(cdata[:len(cdata) - len(cdata) % 4])
        return Reply(data, fds)

    def request(self, op, offset=0, length=0):
        self.tag += 1
        self.sock.send(REQ.pack(MAGIC, VERSION, op, self.tag, offset, length))
        return self.wait_reply(self.tag)

    def wait_reply(self, tag):
        while True:
            r = self.recv()
            if r.op == FAULT:
                self.faults.append(r)
                continue
            assert r.tag == tag, (r.tag, tag)
            return r

    def next_fault(self):
        if self.faults:
            return self.faults.pop(0)
        while True:
            r = self.recv()
            if r.op == FAULT:
                return r
