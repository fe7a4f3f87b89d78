"""Objects whose locks, descriptors and connections a forked child makes anew.

gunicorn forks workers from a master that may have imported the app (``--preload``), and a
worker forks isolated jobs: whatever a thread held at the instant of ``fork`` stays held for
ever in the child, and descriptors (with their OFD locks) and SQLite connections are still
the parent's. Every class that keeps such things registers here, once, so that one
``os.register_at_fork`` hook renews them all. Shared by the runner's state and the forge's
database, hence on the shared floor.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

T = TypeVar("T")


class _Renewable(Protocol):
    def renew_after_fork(self) -> None: ...


#: Objects whose locks (and connections) a forked child makes anew (:func:`renew_after_fork`).
_RENEWABLE: weakref.WeakSet[_Renewable] = weakref.WeakSet()


def renew_after_fork(obj: _Renewable) -> None:
    """Have ``obj.renew_after_fork()`` called in every child forked from this process.

    A lock held by another thread at the moment of ``fork`` stays held for ever in the child,
    where that thread does not exist: the app imported in a gunicorn master (``--preload``),
    or a worker forking an isolated job while housekeeping holds the ledger's lock, would
    deadlock on its first use. Descriptors (and the OFD locks on them) and SQLite connections
    are the parent's too: each class's ``renew_after_fork`` drops them, so the child opens
    its own on first use.
    """
    _RENEWABLE.add(obj)


class PerProcess(Generic[T]):
    """``make()``'s result, made once per process on first use: a forked child makes its
    own (a thread, a pool of them: threads do not survive ``fork``)."""

    def __init__(self, make: Callable[[], T]) -> None:
        self._make = make
        self.renew_after_fork()
        renew_after_fork(self)

    def renew_after_fork(self) -> None:
        self._value: T | None = None
        self._lock = threading.Lock()

    def __call__(self) -> T:
        value = self._value
        if value is None:
            with self._lock:
                if self._value is None:
                    self._value = self._make()
                value = self._value
        return value


def _renew_in_child() -> None:
    for obj in list(_RENEWABLE):
        obj.renew_after_fork()


os.register_at_fork(after_in_child=_renew_in_child)
