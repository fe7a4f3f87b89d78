"""libc calls made *without* releasing the GIL (``ctypes.PyDLL``), for short system calls
on the job path.

A call that never waits (a lock that is not blocking, a line appended to a file, a line
to a pipe with room for it, a file cut) is one short system call, and releasing the GIL
around it costs more than the call: under load another thread takes the GIL meanwhile, and
this one must wait for it again (two context switches). The job path makes several per job
(job lock, slot, writers' turn, journal, log line, the response's ``send`` on a socket that
does not block), so they keep the GIL. Never for a call that may wait.
"""

from __future__ import annotations

import ctypes
import os
import socket
from typing import Any


def keeping_gil(name: str, argtypes: list[Any], restype: Any) -> Any:
    """libc's ``name`` as a function that keeps the GIL, or None where there is no such libc
    (the caller then uses the ``os`` module's call)."""
    try:
        call = getattr(ctypes.PyDLL(None, use_errno=True), name)
    except (OSError, AttributeError):  # pragma: no cover - not glibc/Linux
        return None
    call.argtypes = argtypes
    call.restype = restype
    return call


def errno_error() -> OSError:
    """The ``OSError`` of the last failed call made through :func:`keeping_gil`."""
    code = ctypes.get_errno()
    return OSError(code, os.strerror(code))


_LIBC_WRITE = keeping_gil(
    "write", [ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t], ctypes.c_ssize_t
)


def write(fd: int, data: bytes) -> int:
    """``os.write`` keeping the GIL: how many bytes were written; ``OSError`` on failure.

    For a write that does not wait: a line appended to a file (a few microseconds in the
    page cache), or to a pipe known to have room for it."""
    if _LIBC_WRITE is None:  # pragma: no cover - not glibc/Linux
        return os.write(fd, data)
    written = int(_LIBC_WRITE(fd, data, len(data)))
    if written < 0:
        raise errno_error()
    return written


_LIBC_SEND = keeping_gil(
    "send", [ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_ssize_t
)


def send(fd: int, data: bytes, flags: int = 0) -> int:
    """``send(2)`` keeping the GIL, for a socket that does not block (``O_NONBLOCK``): how
    many bytes went; ``BlockingIOError`` when none fit, ``OSError`` on failure. ``SIGPIPE``
    is never raised (``MSG_NOSIGNAL``): a closed peer is ``BrokenPipeError``."""
    if _LIBC_SEND is None:  # pragma: no cover - not glibc/Linux
        return os.write(fd, data)
    sent = int(_LIBC_SEND(fd, data, len(data), flags | socket.MSG_NOSIGNAL))
    if sent < 0:
        raise errno_error()
    return sent


_LIBC_READ = keeping_gil("read", [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t], ctypes.c_ssize_t)


class ReadBuffer:
    """A buffer for reads that keep the GIL, from descriptors that do not block (a socket, a
    pipe): one thread's (a gunicorn worker's main loop), reused for every read."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._buffer = ctypes.create_string_buffer(size)

    def read(self, fd: int, limit: int | None = None) -> bytes:
        """What ``fd`` holds now, up to ``limit`` (at most :attr:`size`) bytes: b"" at its
        end, ``BlockingIOError`` when nothing has come yet, ``OSError`` on failure."""
        size = self.size if limit is None else min(limit, self.size)
        if _LIBC_READ is None:  # pragma: no cover - not glibc/Linux
            return os.read(fd, size)
        got = int(_LIBC_READ(fd, self._buffer, size))
        if got < 0:
            raise errno_error()
        return ctypes.string_at(self._buffer, got)
