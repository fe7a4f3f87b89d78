"""The forge's store in one SQLite file (WAL): :class:`ForgeDB` and its connections.

Connections come from a small per-process pool: sqlite3 objects must not cross ``fork``, so a
process that finds a pool made by its parent drops it and opens its own. Writers use
``BEGIN IMMEDIATE`` so concurrent transactions queue on SQLite's busy timeout instead of
failing on a lock upgrade, after taking turns on a lock file beside the database
(:class:`~runnerkit.service.sqlite.WriterTurns`). The schema is migrated once per process,
when its first connection opens.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Iterator
from typing import Any

from runnerkit.service.sqlite import WriterTurns, prepare_wal

from .interface import QueuedWrites
from .schema import migrate

#: WAL frames (pages) after which a commit checkpoints them into the database file: ten
#: times SQLite's default. A job writes about 30 frames over its three transactions, most of
#: them the same few index pages again, so at 1,000 a commit checkpointed every 40-odd jobs
#: (two fsyncs, the hot pages copied again each time: 46 checkpoints in a burst of 2,000
#: jobs, 5 at 10,000). The WAL then grows to about 40 MB (4 KB pages), a size it keeps and
#: reuses.
WAL_AUTOCHECKPOINT = 10_000


class SqliteConn(QueuedWrites, sqlite3.Connection):
    """A SQLite connection that also holds the events and assertions a transaction will write."""

    postgres = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.queued_events = []
        self.queued_assertions = []
        self.writing = False

    # sqlite3.Connection's own execute/executemany, not QueuedWrites' placeholders.
    execute = sqlite3.Connection.execute
    executemany = sqlite3.Connection.executemany


class ForgeDB:
    """The forge's SQLite file: schema on first use, pooled connections, transactions.

    :class:`~runnerkit.forge.db.postgres.PostgresDB` is the same interface on PostgreSQL;
    :func:`.factory.open_database` picks one from the settings.
    """

    postgres = False

    def __init__(self, path: str, *, busy_timeout_s: float = 10.0) -> None:
        self.path = path
        self.busy_timeout_s = busy_timeout_s
        self._lock = threading.Lock()
        self._pool: list[SqliteConn] = []
        self._pid = 0
        self._ready = False
        # Writers of every forge process take turns here before SQLite's own lock.
        self._writers = WriterTurns(f"{path}.writer.lock")

    # -- connections ------------------------------------------------------------------------

    def describe(self) -> str:
        """Where the data lives, for messages (a path; never a password)."""
        return self.path

    def _connect(self) -> SqliteConn:
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        conn = sqlite3.connect(
            self.path,
            timeout=self.busy_timeout_s,
            isolation_level=None,
            check_same_thread=False,
            factory=SqliteConn,
            cached_statements=256,
        )
        assert isinstance(conn, SqliteConn)
        conn.row_factory = sqlite3.Row
        prepare_wal(conn, self._writers, self._setup)
        self._ready = True
        return conn

    def _setup(self, conn: sqlite3.Connection) -> None:
        conn.execute("PRAGMA foreign_keys=OFF")
        conn.execute(f"PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT}")
        if not self._ready:
            # Once per process: processes starting together on a file run the migrations in
            # turn (prepare_wal holds the writers' turn), each step with its version.
            assert isinstance(conn, SqliteConn)
            conn.execute("BEGIN IMMEDIATE")
            try:
                migrate(conn, self.path)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def _checkout(self) -> SqliteConn:
        with self._lock:
            if self._pid != os.getpid():
                # Connections opened by the parent before fork must not be used (or closed)
                # here: abandon them and start a fresh pool.
                self._pool, self._pid, self._ready = [], os.getpid(), False
            if self._pool:
                return self._pool.pop()
        return self._connect()

    def _checkin(self, conn: SqliteConn) -> None:
        with self._lock:
            if self._pid == os.getpid() and len(self._pool) < 16:
                self._pool.append(conn)
                return
        with contextlib.suppress(sqlite3.Error):
            conn.close()

    @contextlib.contextmanager
    def connection(self) -> Iterator[SqliteConn]:
        """A pooled connection in autocommit mode (each statement is its own transaction)."""
        conn = self._checkout()
        try:
            yield conn
        finally:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            conn.drop_queued()
            self._checkin(conn)

    @contextlib.contextmanager
    def tx(self, *, pipeline: bool = False) -> Iterator[SqliteConn]:
        """A write transaction (``BEGIN IMMEDIATE``), committed on success.

        ``pipeline`` changes nothing here: SQLite runs in this process, with no round trips
        to save (see :meth:`.interface.QueuedWrites.pipeline`).

        Writers take turns first (:class:`~runnerkit.service.sqlite.WriterTurns`, every process of
        the forge): waiting there ends the moment the other transaction commits, while
        SQLite's busy handler sleeps in steps of milliseconds.
        """
        with self._writers.hold(), self.connection() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.write_queued()
            except BaseException:
                conn.drop_queued()
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[SqliteConn]:
        """A read transaction: every statement inside sees the same state."""
        with self.connection() as conn:
            conn.execute("BEGIN")
            try:
                yield conn
            finally:
                conn.execute("COMMIT")

    def close(self) -> None:
        """Close the pooled connections of this process."""
        with self._lock:
            pool, self._pool = (self._pool, []) if self._pid == os.getpid() else ([], [])
        for conn in pool:
            with contextlib.suppress(sqlite3.Error):
                conn.close()

    def ping(self) -> None:
        """Run a trivial query against every table (raises sqlite3.Error when it cannot)."""
        with self.connection() as conn:
            conn.execute("SELECT COUNT(*) FROM meta").fetchone()
            conn.execute("SELECT 1 FROM jobs LIMIT 1").fetchone()
