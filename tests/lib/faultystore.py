"""A file whose writeback fails when the test says so, the way a real host
disk fails: a backing file on ext4 (no journal) on a loop device, whose own
store is a file on a small tmpfs.

    with FaultyStore(work, size=64 << 20) as fs:
        qemu ... mem-path=fs.path ...
        fs.fill()    # the store is full: writeback of the file fails (ENOSPC)
        ...
        fs.free()    # room again: writeback succeeds

The file is written in full when it is made (every block allocated, so that
later writes change no ext4 metadata), then the loop store's copy of its
blocks is punched out of the tmpfs.  A write to the file therefore needs new
tmpfs pages underneath; with the tmpfs shrunk to what it holds (`fill`),
the loop device fails the write and ext4 reports the writeback error to the
next fdatasync() of the file, once (Linux's errseq rule).

Needs root, loop devices and tmpfs; `unavailable()` says why not.
"""
import ctypes
import os
import re
import shutil
import subprocess

FALLOC_FL_KEEP_SIZE = 1
FALLOC_FL_PUNCH_HOLE = 2
_libc = ctypes.CDLL(None, use_errno=True)


def unavailable():
    """None, or why this machine cannot make a FaultyStore."""
    if os.geteuid() != 0:
        return 'needs root (tmpfs mount, losetup)'
    for tool in ('losetup', 'mkfs.ext4', 'filefrag', 'mount', 'umount'):
        if not shutil.which(tool):
            return f'{tool} not found'
    if not os.path.exists('/dev/loop-control'):
        return 'no /dev/loop-control (loop devices)'
    return None


def _run(*cmd):
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.PIPE)


def _df_used_kib(path):
    out = subprocess.run(['df', '-k', '--output=used', path], check=True,
                         capture_output=True, text=True).stdout
    return int(out.split()[-1])


class FaultyStore:
    def __init__(self, work, size, name='pmem.img'):
        self.work = os.path.abspath(work)
        self.size = size
        self.store = os.path.join(self.work, 'store')
        self.mnt = os.path.join(self.work, 'mnt')
        self.path = os.path.join(self.mnt, name)
        self.loop = None
        self._mounted = []

    def __enter__(self):
        os.makedirs(self.store, exist_ok=True)
        os.makedirs(self.mnt, exist_ok=True)
        disk = self.size * 2 + (64 << 20)
        _run('mount', '-t', 'tmpfs', '-o', f'size={disk}', 'kvmx-faulty',
             self.store)
        self._mounted.append(self.store)
        img = os.path.join(self.store, 'disk.img')
        with open(img, 'wb') as f:
            f.truncate(disk)
        self.loop = subprocess.run(['losetup', '-f', '--show', img],
                                   check=True, capture_output=True,
                                   text=True).stdout.strip()
        _run('mkfs.ext4', '-q', '-F', '-O', '^has_journal', '-b', '4096',
             self.loop)
        _run('mount', '-t', 'ext4', self.loop, self.mnt)
        self._mounted.append(self.mnt)
        with open(self.path, 'wb') as f:
            chunk = b'\0' * (1 << 20)
            for _ in range(self.size // len(chunk)):
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        self._punch_file_blocks(img)
        return self

    def _punch_file_blocks(self, img):
        """Free the store's copy of the file's blocks (ext4 keeps them
        allocated): writing them again needs new tmpfs pages."""
        out = subprocess.run(['filefrag', '-e', '-b4096', self.path],
                             check=True, capture_output=True, text=True).stdout
        fd = os.open(img, os.O_RDWR)
        try:
            for m in re.finditer(r'^\s*\d+:\s+\d+\.\.\s*\d+:\s+(\d+)\.\.\s*'
                                 r'(\d+):', out, re.M):
                first, last = int(m[1]), int(m[2])
                if _libc.fallocate(fd, FALLOC_FL_KEEP_SIZE |
                                   FALLOC_FL_PUNCH_HOLE,
                                   ctypes.c_long(first * 4096),
                                   ctypes.c_long((last - first + 1) * 4096)):
                    e = ctypes.get_errno()
                    raise OSError(e, f'punching the store: {os.strerror(e)}')
        finally:
            os.close(fd)

    def rearm(self):
        """After the test wrote the file itself: free the store's copy of
        its blocks again, so that writing them again needs new pages."""
        self._punch_file_blocks(os.path.join(self.store, 'disk.img'))

    def fill(self, slack_kib=256):
        """Shrink the store's tmpfs to what it holds (+ slack): from now on
        writeback of the file's blocks fails."""
        used = _df_used_kib(self.store)
        _run('mount', '-o', f'remount,size={used + slack_kib}k', self.store)

    def free(self):
        """Room again for every block of the file."""
        _run('mount', '-o', f'remount,size={self.size * 2 + (64 << 20)}',
             self.store)

    def drop_cache(self):
        """Forget the file's clean page-cache pages, so that a read comes
        from the store (what a crash would leave)."""
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)

    def __exit__(self, *exc):
        for m in reversed(self._mounted):
            subprocess.run(['umount', '-l', m], stderr=subprocess.DEVNULL)
        if self.loop:
            subprocess.run(['losetup', '-d', self.loop],
                           stderr=subprocess.DEVNULL)
        return False
