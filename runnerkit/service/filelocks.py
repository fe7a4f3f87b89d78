"""File locks between the processes of one machine: whole-file ``flock`` and OFD byte locks.

:class:`FileLock` is a non-blocking ``flock`` a process holds until it lets go or dies (the
runner's sentinel and exit hook, the forge's dispatcher). :func:`ofd_lock` is one
open-file-description byte-range lock call (``F_OFD_SETLK`` and friends), the primitive of
the leader lease, the concurrency slots, the job locks and the SQLite writers' turns: the
kernel drops such a lock when its holder dies, and any process can test a byte without
taking it. A call that never waits keeps the GIL (:mod:`runnerkit.service.libc_calls`), since the
job path makes several per job.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import struct
import time

from runnerkit.service.libc_calls import errno_error, keeping_gil

_FLOCK_STRUCT = "hhqqi"
_FLOCK_PAD = b"\0" * 8


class _Flock(ctypes.Structure):
    """``struct flock`` (Linux)."""

    _fields_ = [
        ("l_type", ctypes.c_short),
        ("l_whence", ctypes.c_short),
        ("l_start", ctypes.c_int64),
        ("l_len", ctypes.c_int64),
        ("l_pid", ctypes.c_int),
    ]


#: libc's ``fcntl`` keeping the GIL (:mod:`runnerkit.service.libc_calls`), or None.
_FCNTL = keeping_gil("fcntl", [ctypes.c_int, ctypes.c_int, ctypes.c_void_p], ctypes.c_int)


def ofd_lock(fd: int, kind: int, offset: int, *, query: bool = False, wait: bool = False) -> int:
    """One OFD byte-range lock call on byte ``offset``; returns the resulting ``l_type``.

    ``wait`` blocks until the lock is granted (the GIL is released meanwhile); a call that
    does not wait keeps the GIL (:mod:`runnerkit.service.libc_calls`). A refused lock raises
    ``OSError`` (``EAGAIN``/``EACCES``) either way.
    """
    command = fcntl.F_OFD_GETLK if query else fcntl.F_OFD_SETLKW if wait else fcntl.F_OFD_SETLK
    if wait or _FCNTL is None:
        packed = struct.pack(_FLOCK_STRUCT, kind, os.SEEK_SET, offset, 1, 0) + _FLOCK_PAD
        result = fcntl.fcntl(fd, command, packed)
        return int(struct.unpack(_FLOCK_STRUCT, result[: struct.calcsize(_FLOCK_STRUCT)])[0])
    lock = _Flock(kind, os.SEEK_SET, offset, 1, 0)
    if _FCNTL(fd, command, ctypes.byref(lock)) == -1:
        raise errno_error()
    return int(lock.l_type)


class FileLock:
    """A non-blocking ``flock`` held by this process until released or the process dies."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None
        self._pid = 0

    @property
    def held(self) -> bool:
        return self._fd is not None and self._pid == os.getpid()

    def acquire(self, blocking: bool = False, timeout: float | None = None) -> bool:
        if self.held:
            return True
        # A descriptor inherited across fork shares the parent's lock: never reuse it.
        self._fd = None
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise
                if not blocking or (deadline is not None and time.monotonic() >= deadline):
                    os.close(fd)
                    return False
                time.sleep(0.05)
                continue
            self._fd, self._pid = fd, os.getpid()
            return True

    def release(self) -> None:
        if self.held and self._fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
        self._fd = None
