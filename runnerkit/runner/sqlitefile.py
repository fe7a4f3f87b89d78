"""One SQLite file shared by the instance's processes (:class:`SQLiteFile`).

The base of the idempotency ledger and the result outbox: one connection per process, made
anew after fork (a parent's is kept, never closed in the child), WAL mode, and writes in the
writers' turn (:class:`~runnerkit.service.sqlite.WriterTurns`). It checks the file is the
instance's own ledger (:class:`~runnerkit.runner.storage.LedgerIdentity`) before it opens it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from typing import Any

from runnerkit.runner.statefiles import private_file
from runnerkit.runner.storage import LedgerIdentity
from runnerkit.service.afterfork import renew_after_fork
from runnerkit.service.process import keep_pid_current
from runnerkit.service.sqlite import WriterTurns, prepare_wal
from runnerkit.service.sqlite_gil import Busy, open_gil_statements

log = logging.getLogger("runnerkit.state")

#: SQLite connections a forked child inherited. Never closed there: closing one in a child
#: could checkpoint and delete the WAL under the parent (SQLite: no connection across fork).
_INHERITED: list[sqlite3.Connection] = []


#: This process's id, kept current in forked children (a module global: read per job).
_PID = keep_pid_current(globals())

#: Writes made through the GIL-keeping connection between two checkpoints (a few pages
#: each: about SQLite's own automatic checkpoint of 1,000 pages).
CHECKPOINT_EVERY = 256

#: How long an ordinary statement waits for SQLite's own locks (``sqlite3``'s busy timeout).
BUSY_TIMEOUT_S = 10.0

#: How a fast write waits for a turn another writer holds: pauses (seconds) doubling from the
#: first to the longest, for at most this many tries, holding nothing meanwhile; then it goes
#: the ordinary way, which queues for the turn (about 8.5 ms of pauses in all).
WRITE_PAUSE_FIRST_S = 50e-6
WRITE_PAUSE_LONGEST_S = 1e-3
WRITE_TRIES = 12

#: WAL frames (pages) beyond which a checkpoint starts the WAL over (about 4 MiB).
RESTART_FRAMES = 1000

#: How long a checkpoint waits for readers to leave the WAL so it can start it over (ms).
CHECKPOINT_WAIT_MS = 50

#: After readers stayed that long, how long until a checkpoint waits for them again (s).
RESTART_BACKOFF_S = 5.0


class SQLiteFile:
    """One SQLite file shared by the instance's processes: a connection per process, WAL.

    A connection must not cross ``fork``, so a process that finds one made by its parent opens
    its own. Writes go through :meth:`_transaction` (``BEGIN IMMEDIATE``) or :meth:`_write`
    (one statement), both in the writers' turn (:class:`WriterTurns`, ``<name>.writer.lock``)
    so a writer of one worker waits for another's exactly as long as it writes.
    """

    def __init__(self, path: str, identity: LedgerIdentity | None = None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._pid = 0
        self._writers = WriterTurns(os.path.splitext(path)[0] + ".writer.lock")
        #: When a checkpoint may next wait for readers to start the WAL over (monotonic).
        self._restart_from = 0.0
        #: Which file this must be for the running instance (None: any, e.g. in a test).
        self.identity = identity
        #: The job path's statements, on a connection that keeps the GIL (None: not here).
        self._gil = open_gil_statements(path)
        #: :meth:`_write_many`'s transactions, on a GIL-keeping connection of their own.
        self._gil_batches = open_gil_statements(path)
        self._batching = threading.Lock()
        renew_after_fork(self)

    def renew_after_fork(self) -> None:
        """The child opens its own connection; the parent's is kept, never closed here."""
        self._lock = threading.Lock()
        self._batching = threading.Lock()
        if self._conn is not None:
            _INHERITED.append(self._conn)
        self._conn, self._pid = None, 0

    def _setup(self, conn: sqlite3.Connection) -> None:
        """Create the tables this store needs (called once per process)."""

    def _initialise(self, conn: sqlite3.Connection) -> None:
        """WAL mode and the tables (:func:`prepare_wal`)."""
        prepare_wal(conn, self._writers, self._setup)

    def _db(self) -> sqlite3.Connection:
        if self._conn is None or self._pid != _PID:
            if self._conn is not None:
                _INHERITED.append(self._conn)  # a parent's (see renew_after_fork)
                self._conn = None
            # Checked before anything could create the file: a worker started after the
            # running instance's ledger vanished must not begin a fresh, empty one.
            if self.identity is not None:
                self.identity.before_open()
            private_file(self.path)
            conn = sqlite3.connect(
                self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
            )
            try:
                self._initialise(conn)
                if self.identity is not None:
                    self.identity.after_open()
            except BaseException:
                conn.close()
                raise
            self._conn, self._pid = conn, _PID
        return self._conn

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock, self._writers.hold():
            conn = self._db()
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    @contextlib.contextmanager
    def _connection(self, wait: float | None = None) -> Iterator[sqlite3.Connection]:
        """The process's connection, for reads.

        ``wait``: give up (``TimeoutError``) after that many seconds. A writer of this process
        holds the connection while it waits for the writers' turn, which a stalled process
        (a SIGSTOPped leader) may hold for as long as it is stopped.
        """
        if not self._lock.acquire(timeout=-1 if wait is None else wait):
            raise TimeoutError(f"{self.path} is busy: a writer of this process waits its turn")
        try:
            yield self._db()
        finally:
            self._lock.release()

    def _read_one(self, sql: str, parameters: tuple[Any, ...]) -> Any:
        """One read's first row (None: none), on the GIL-keeping connection when this process
        has set the file up and no lock is in the way; else on the process's connection."""
        if self._gil is not None and self._conn is not None and self._pid == _PID:
            try:
                return self._gil.query_one(sql, parameters)
            except Busy:
                pass
        with self._connection() as conn:
            return conn.execute(sql, parameters).fetchone()

    def _write_one(self, sql: str, parameters: tuple[Any, ...]) -> int:
        """One autocommitted write in the writers' turn; how many rows it changed.

        On the GIL-keeping connection whenever it gets the turn without waiting (see
        :meth:`_read_one`). A turn another process holds is waited for with short pauses
        that hold nothing, neither the GIL nor this file's lock: waiting the ordinary way
        (:meth:`_write`) holds this file's lock and then the turn across every step that
        gives the GIL up, so under load a holder waits for the GIL while every other
        writer of the instance waits for it (a lock convoy). Only after
        :data:`WRITE_TRIES` pauses does it go the ordinary way. That connection checkpoints
        nothing by itself: every :data:`CHECKPOINT_EVERY` writes, this process makes one
        (:meth:`_checkpoint`).
        """
        gil = self._gil
        if gil is not None and self._conn is not None and self._pid == _PID and self._quick_turn():
            try:
                changed: int | None = gil.execute(sql, parameters)
            except Busy:  # a writer that does not take turns, e.g. the sqlite3 shell
                changed = None
            finally:
                self._writers.give_back()
            if changed is not None:
                if gil.written >= CHECKPOINT_EVERY and self._checkpoint():
                    gil.written = 0
                return changed
        with self._write() as conn:
            return int(conn.execute(sql, parameters).rowcount)

    def _quick_turn(self) -> bool:
        """Take the writers' turn for a GIL-keeping write: at once if free, else after short
        pauses that hold nothing (up to :data:`WRITE_TRIES`). False: go the ordinary way. The
        caller gives a taken turn back."""
        pause = WRITE_PAUSE_FIRST_S
        for _ in range(WRITE_TRIES):
            if self._writers.try_take():
                return True
            time.sleep(pause)
            pause = min(2 * pause, WRITE_PAUSE_LONGEST_S)
        return False

    def _write_many(self, statements: list[tuple[str, tuple[Any, ...]]]) -> None:
        """Writes in one transaction, in the writers' turn.

        On a GIL-keeping connection (:meth:`_write_one` says why) whenever the turn is free
        without waiting, with the same pauses; its ``BEGIN``, statements and ``COMMIT`` then
        never give the GIL up. Through ``sqlite3`` each step gives it up, and under load
        each of a batch's steps waited for it again, every other writer of the instance
        waiting meanwhile for the turn this one held. Else, or when another thread of this
        process is making such a transaction, the ordinary way (:meth:`_transaction`).
        """
        gil = self._gil_batches
        if (
            gil is not None
            and self._conn is not None
            and self._pid == _PID
            and self._batching.acquire(blocking=False)
        ):
            try:
                if self._quick_turn():
                    try:
                        gil.transaction(statements)
                        return
                    except Busy:  # a writer that does not take turns
                        pass
                    finally:
                        self._writers.give_back()
            finally:
                self._batching.release()
        with self._transaction() as conn:
            for sql, parameters in statements:
                conn.execute(sql, parameters)

    def _checkpoint(self) -> bool:
        """Copy the WAL into the file; start the WAL over when it has grown. False: the file
        was busy in this process, the next write tries again.

        The copy is a passive checkpoint outside the writers' turn, so writes go on while
        it copies and syncs. Under a steady stream of writes from several processes that
        never leaves the WAL wholly copied when the next write comes, so SQLite never
        starts it over and it grows without bound ("checkpoint starvation"). So when more
        than :data:`RESTART_FRAMES` frames remain, a second checkpoint takes the turn, if
        free, copies the last few frames and starts the WAL over, empty. It waits up to
        :data:`CHECKPOINT_WAIT_MS` for readers to leave the WAL (the job path's statements
        are short). The write before it is stored already, so a failure here (a reader that
        stays, a full disk) is only logged: the next checkpoint catches up.
        """
        if not self._lock.acquire(blocking=False):
            return False
        try:
            conn = self._db()
            (_, frames, _) = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            if (
                frames > RESTART_FRAMES
                and time.monotonic() >= self._restart_from
                and self._writers.try_take()
            ):
                try:
                    conn.execute(f"PRAGMA busy_timeout={CHECKPOINT_WAIT_MS}")
                    try:
                        (busy, _, _) = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
                    finally:
                        conn.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")
                finally:
                    self._writers.give_back()
                if busy:
                    # A reader stayed (a stopped process, a long read): the writers waited
                    # for it once; they do not again for a while.
                    self._restart_from = time.monotonic() + RESTART_BACKOFF_S
                    log.debug("%s: readers stayed in the WAL; it starts over later", self.path)
        except sqlite3.Error as exc:
            log.warning("%s: checkpoint failed (%s); the next one catches up", self.path, exc)
        finally:
            self._lock.release()
        return True

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """The process's connection for one autocommitted write, in the writers' turn."""
        with self._lock, self._writers.hold():
            yield self._db()
