"""The worker's poller, its registrations made without giving up the GIL.

gthread registers a kept-alive connection with its poller when a request ends and takes it
out when the next request comes: two ``epoll_ctl`` calls per request on the main loop, each
of which ``select.epoll`` makes with the GIL given up. Under load a request thread takes the
GIL meanwhile and the main loop waits to get it back (two thread switches) before it can
read the next request. ``epoll_ctl`` never waits, so here it keeps the GIL
(:mod:`runnerkit.service.libc_calls`); waiting for events (``epoll_wait``) still gives the
GIL up, as it must.
"""

from __future__ import annotations

import ctypes
import platform
import select
import selectors
import sys
from typing import Any

from runnerkit.service.libc_calls import errno_error, keeping_gil

_CTL_ADD, _CTL_DEL, _CTL_MOD = 1, 2, 3


class _EpollEvent(ctypes.Structure):
    """``struct epoll_event``: packed on x86-64, naturally aligned elsewhere."""

    if platform.machine() in ("x86_64", "AMD64"):
        _pack_ = 1
    _fields_ = [("events", ctypes.c_uint32), ("data", ctypes.c_uint64)]


_EPOLL_CTL = keeping_gil(
    "epoll_ctl",
    [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.POINTER(_EpollEvent)],
    ctypes.c_int,
)
#: ``select.epoll`` reads an event's ``data`` as the fd in its first four bytes, which is
#: the fd as a 64-bit number only on a little-endian machine.
AVAILABLE = _EPOLL_CTL is not None and sys.byteorder == "little" and hasattr(select, "epoll")


class _Epoll:
    """``select.epoll`` whose ``register``/``modify``/``unregister`` keep the GIL."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._fd = self._epoll.fileno()
        self.poll = self._epoll.poll
        self.fileno = self._epoll.fileno
        self.close = self._epoll.close

    def _ctl(self, op: int, fd: int, events: int) -> None:
        event = _EpollEvent(events, fd)
        if _EPOLL_CTL(self._fd, op, fd, ctypes.byref(event)) != 0:
            raise errno_error()

    def register(self, fd: int, eventmask: int = select.EPOLLIN | select.EPOLLPRI) -> None:
        self._ctl(_CTL_ADD, fd, eventmask)

    def modify(self, fd: int, eventmask: int) -> None:
        self._ctl(_CTL_MOD, fd, eventmask)

    def unregister(self, fd: int) -> None:
        self._ctl(_CTL_DEL, fd, 0)


class GILEpollSelector(selectors.EpollSelector):
    """``selectors.EpollSelector`` on :class:`_Epoll` (see the module's docstring)."""

    _selector_cls: Any = _Epoll


def poller() -> selectors.BaseSelector:
    """The main loop's poller: :class:`GILEpollSelector` where it works, else the default."""
    return GILEpollSelector() if AVAILABLE else selectors.DefaultSelector()
