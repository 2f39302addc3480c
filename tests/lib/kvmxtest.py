"""What the integration tests share besides QEMU itself: a check() that
prints and records each assertion, the closing report (work files kept on
failure, removed on success), scratch files, and the usual NVDIMM
command line."""
import hashlib
import os
import socket
import shutil
import tempfile

import kvmxvm


class Checks:
    """check(cond, what): prints "ok"/"FAIL" and remembers failures."""

    def __init__(self):
        self.failures = []

    def __call__(self, cond, what):
        print(f"{'ok  ' if cond else 'FAIL'} {what}", flush=True)
        if not cond:
            self.failures.append(what)
        return cond

    def finish(self, work=None):
        """The test's exit code; keeps `work` for a look when it failed."""
        if self.failures:
            print(f'FAILED ({len(self.failures)}): ' + '; '.join(self.failures))
            if work:
                print(f'work files kept in {work}')
            return 1
        if work:
            shutil.rmtree(work, ignore_errors=True)
        return 0


def require_guest_image():
    """Skip (77) when scripts/mkguest has not been run."""
    try:
        kvmxvm.guest_image()
    except kvmxvm.GuestImageMissing as e:
        kvmxvm.skip(str(e))


def free_port():
    """A TCP port of 127.0.0.1 that nothing listens on right now."""
    with socket.create_server(('127.0.0.1', 0)) as s:
        return s.getsockname()[1]


def workdir(prefix):
    """A fresh directory on disk (not tmpfs) for one test's files."""
    return tempfile.mkdtemp(prefix=prefix, dir=kvmxvm.scratch_dir())


def backing_file(work, name, size):
    """A sparse file of `size` bytes in `work`."""
    path = os.path.join(work, name)
    with open(path, 'wb') as f:
        f.truncate(size)
    return path


def nvdimm_args(img, size, device='nvdimm,id=nv0,memdev=mem1,flush-hint=on',
                mem='1G,slots=2,maxmem=4G', extra=()):
    """QEMU arguments for a q35 machine with one file-backed NVDIMM."""
    return (['-machine', 'q35,nvdimm=on'] + list(extra) + ['-m', mem,
            '-object', f'memory-backend-file,id=mem1,share=on,'
                       f'mem-path={img},size={size}',
            '-device', device])


def file_md5(path, off_mb, mb):
    """MD5 of `mb` MiB of the file at `path`, from `off_mb` MiB on."""
    with open(path, 'rb') as f:
        f.seek(off_mb << 20)
        return hashlib.md5(f.read(mb << 20)).hexdigest()
