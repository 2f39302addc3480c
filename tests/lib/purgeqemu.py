"""QEMU for the purge tests and benchmark: the qtest accelerator, so that
the caller reads and writes guest physical memory itself (b64read,
b64write) through QEMU's own accesses, and a file NVDIMM with a purge
agent.  Also the contents the tests write: every 16 bytes name their
block and version.  Python 3 standard library only."""
import base64
import os
import socket
import subprocess

KiB, MiB = 1 << 10, 1 << 20
SIZE = 4 * MiB
BLOCK = 64 * KiB
NBLOCKS = SIZE // BLOCK


def content(block, version):
    """64 KiB that name their block and version in every 16 bytes."""
    unit = b'%06d:%08d\n' % (block, version)
    unit = unit + b'.' * (16 - len(unit))
    return unit * (BLOCK // 16)


class Qemu:
    """QEMU with the qtest accelerator: memory access by the test."""

    def __init__(self, qemu, work, img, n, size=None,
                 device='nvdimm,id=nv0,memdev=mem1', extra=(), agent=True):
        size = size or SIZE
        self.work = work
        self.agent = os.path.join(work, 'agent.sock')
        self.hostd_qmp = os.path.join(work, 'hostd.qmp')
        qt_path = os.path.join(work, f'qtest{n}.sock')
        srv = socket.socket(socket.AF_UNIX)
        srv.bind(qt_path)
        srv.listen(1)
        self.err = open(os.path.join(work, 'qemu.err'), 'ab')
        self.proc = subprocess.Popen(
            [qemu, '-machine', 'q35,nvdimm=on', '-accel', 'qtest',
             '-qtest', f'unix:{qt_path}', '-qtest-log', '/dev/null',
             '-display', 'none', '-nodefaults',
             '-m', f'128M,slots=2,maxmem={(size >> 30) + 1}G',
             '-object', f'memory-backend-file,id=mem1,share=on,'
                        f'mem-path={img},size={size}' +
                        (f',purge-agent={self.agent}' if agent else ''),
             '-device', device,
             '-qmp', f'unix:{self.hostd_qmp},server=on,wait=off'] +
            list(extra),
            stdout=self.err, stderr=self.err)
        srv.settimeout(30)
        self.qt, _ = srv.accept()
        srv.close()
        os.unlink(qt_path)
        self.qt.settimeout(60)
        self.buf = b''
        self.base = 0x100000000  # device memory above 4 GiB on q35

    def cmd(self, line):
        self.qt.sendall(line.encode() + b'\n')
        while b'\n' not in self.buf:
            d = self.qt.recv(1 << 20)
            if not d:
                raise EOFError('QEMU closed the qtest socket')
            self.buf += d
        out, self.buf = self.buf.split(b'\n', 1)
        if not out.startswith(b'OK'):
            raise RuntimeError(f'qtest {line[:40]}: {out[:200]}')
        return out[3:]

    def write(self, block, data):
        self.cmd(f'b64write {self.base + block * BLOCK:#x} {len(data):#x} '
                 f'{base64.b64encode(data).decode()}')

    def read_at(self, offset, length):
        out = self.cmd(f'b64read {self.base + offset:#x} {length:#x}')
        return base64.b64decode(out)

    def read(self, block, n=1):
        out = self.cmd(f'b64read {self.base + block * BLOCK:#x} '
                       f'{n * BLOCK:#x}')
        return base64.b64decode(out)

    def kill(self):
        self.proc.kill()
        self.proc.wait()
        self.qt.close()
        self.err.close()
