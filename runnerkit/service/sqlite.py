"""Helpers for an SQLite file that several processes write: writers' turns and WAL setup.

SQLite's busy handler sleeps milliseconds between tries, which under a steady stream of
writes from several processes sets the pace; :class:`WriterTurns` queues writers on a
blocking OFD lock instead, woken the moment the holder lets go. :func:`prepare_wal` puts a
new connection's file in WAL mode in that turn. Both the runner's ledger and the forge's
database use them.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator

from runnerkit.service.afterfork import renew_after_fork
from runnerkit.service.filelocks import ofd_lock
from runnerkit.service.process import keep_pid_current

#: This process's id, kept current in forked children (a module global: read per job).
_PID = keep_pid_current(globals())


class WriterTurns:
    """Turns for the writers of one SQLite file, across processes: a blocking OFD lock.

    A writer that finds the file locked by another process is put to sleep by SQLite's busy
    handler (1, 2, 5, 10, 15, 20, 25 ms … between tries), however soon the lock frees up.
    Under a steady stream of writes from several workers those sleeps, not the writes, set
    the pace. Writers queue here first instead: a blocked ``F_OFD_SETLKW`` wakes the moment
    the holder lets go, and the kernel drops the lock of a holder that dies.

    Threads of one process take turns on a re-entrant lock before that (an OFD lock belongs
    to the descriptor, which every thread of the process shares); a nested turn is the outer
    one. Both are made anew after fork: a parent's thread may have held them.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._guard = threading.Lock()
        self._pid = 0
        self._fd = -1
        self._turn = threading.RLock()
        self._depth = 0
        renew_after_fork(self)

    def renew_after_fork(self) -> None:
        self._guard = threading.Lock()
        self._turn, self._depth = threading.RLock(), 0
        self._fd, self._pid = -1, 0

    def _current(self) -> tuple[threading.RLock, int]:
        if self._pid == _PID:
            return self._turn, self._fd
        with self._guard:
            if self._pid != _PID:
                self._turn, self._depth = threading.RLock(), 0
                os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                self._pid = _PID
            return self._turn, self._fd

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Wait for this process's, then the file's, turn; hold both inside the block."""
        turn, fd = self._current()
        with turn:
            outer = self._depth == 0
            if outer:
                try:
                    # Mostly free: taken without giving up the GIL; else wait for it.
                    ofd_lock(fd, fcntl.F_WRLCK, 0)
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN, errno.EACCES):
                        raise
                    ofd_lock(fd, fcntl.F_WRLCK, 0, wait=True)
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if outer:
                    ofd_lock(fd, fcntl.F_UNLCK, 0)

    def try_take(self) -> bool:
        """Take this process's and the file's turn if both are free right now; never waits.

        For a write that must not wait (:mod:`runnerkit.service.sqlite_gil`): False sends it
        the ordinary way, to :meth:`hold`. True must be followed by :meth:`give_back`.
        """
        turn, fd = self._current()
        if not turn.acquire(blocking=False):
            return False
        if self._depth == 0:
            try:
                ofd_lock(fd, fcntl.F_WRLCK, 0)
            except OSError as exc:
                turn.release()
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                return False
        self._depth += 1
        return True

    def give_back(self) -> None:
        """End a turn :meth:`try_take` took."""
        self._depth -= 1
        if self._depth == 0:
            ofd_lock(self._fd, fcntl.F_UNLCK, 0)
        self._turn.release()


def prepare_wal(
    conn: sqlite3.Connection,
    writers: WriterTurns,
    setup: Callable[[sqlite3.Connection], None],
) -> None:
    """Put a new connection's file in WAL mode, then run ``setup`` (tables, pragmas).

    In the writers' turn, so processes opening a new file together do it one at a time.
    Switching to WAL also needs every reader gone, a lock SQLite's busy timeout does not wait
    for: a worker that meets another's read retries here a moment.
    """
    with writers.hold():
        for attempt in range(100):
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
                setup(conn)
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or attempt == 99:
                    raise
                time.sleep(0.02)
