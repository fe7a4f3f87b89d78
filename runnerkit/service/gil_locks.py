"""A lock for short sections on the job path, taken only by a thread that holds the GIL.

A ``threading.Lock`` that a thread waits for is handed to it by the kernel the moment its
holder lets go, while another thread holds the GIL: the new holder then waits for the GIL
with the lock in hand, and every thread that reaches the section meanwhile waits for the
lock, then for the GIL in turn. Under load such a convoy, once started by one thread made
to give the GIL up inside the section, does not end: 55 % of a worker's thread time went
waiting for the journal's lock (profiled at 64 connections with signed requests), though
the section, one ``write`` that keeps the GIL and a few dict updates, takes microseconds.

:class:`GILLock` is taken with a non-blocking try while the GIL is held; a thread that
finds it taken sleeps a little (the GIL given up, the holder free to finish), then tries
again, so the lock is never held by a thread waiting for the GIL, unless the interpreter
made its holder give the GIL up inside the section. For sections that never wait.
"""

from __future__ import annotations

import threading
import time
from typing import Any

#: The first pause of a thread that found the lock taken, and the longest (seconds).
FIRST_PAUSE_S = 0.00002
LONGEST_PAUSE_S = 0.001


def take(lock: threading.Lock) -> bool:
    """Take ``lock`` as :class:`GILLock` does: a non-blocking try, then short pauses. For a
    lock that a thread of its own also waits on in the ordinary way (a Condition's)."""
    try_lock = lock.acquire
    if try_lock(False):
        return True
    pause = FIRST_PAUSE_S
    while True:
        time.sleep(pause)
        if try_lock(False):
            return True
        pause = min(pause * 2, LONGEST_PAUSE_S)


class GILLock:
    """A mutex for short sections that never wait (see the module's docstring)."""

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def acquire(self) -> bool:
        return take(self._lock)

    def release(self) -> None:
        self._lock.release()

    def locked(self) -> bool:
        return self._lock.locked()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self._lock.release()
