"""Page-cache state of a host file through the cachestat(2) syscall (Linux
6.5+): tells whether what a guest flushed has reached the disk."""
import ctypes
import os

SYS_CACHESTAT = 451


class _Range(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Stat(ctypes.Structure):
    _fields_ = [("nr_cache", ctypes.c_uint64), ("nr_dirty", ctypes.c_uint64),
                ("nr_writeback", ctypes.c_uint64),
                ("nr_evicted", ctypes.c_uint64),
                ("nr_recently_evicted", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)


def cachestat(path, off=0, length=0):
    """{'cache', 'dirty', 'writeback', ...} page counts for [off, off+length)
    of the file (length 0: to the end).  Raises OSError (ENOSYS on kernels
    without cachestat)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        rng, st = _Range(off, length), _Stat()
        if _libc.syscall(SYS_CACHESTAT, fd, ctypes.byref(rng),
                         ctypes.byref(st), 0) != 0:
            e = ctypes.get_errno()
            raise OSError(e, f"cachestat({path}): {os.strerror(e)}")
        return {"cache": st.nr_cache, "dirty": st.nr_dirty,
                "writeback": st.nr_writeback, "evicted": st.nr_evicted}
    finally:
        os.close(fd)


def available():
    """True if this kernel has cachestat."""
    try:
        cachestat("/proc/self/exe")
        return True
    except OSError:
        return False
