"""What the forge's store looks like to its callers, the same on SQLite and on PostgreSQL.

The query functions of this package take a :class:`Conn` and return rows (:class:`Row`); the
forge's code holds a :class:`Database` (:class:`~.sqlite.ForgeDB` or
:class:`~.postgres.PostgresDB`). Both backends' connections inherit :class:`QueuedWrites`:
a transaction's JobEvents and forge-made assertions are queued on its connection and
inserted with one ``executemany`` per table at commit. The errors either backend raises
are named here once (:data:`DatabaseError`, :data:`UNAVAILABLE`), so no caller imports a
driver to catch them. Both backends and every query module import these from here, below
them all, so neither backend needs the other.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Protocol

import psycopg

#: What a database error looks like on either backend (the forge never catches narrower).
DatabaseError: tuple[type[Exception], ...] = (sqlite3.Error, psycopg.Error)

#: The database cannot be used right now (server down or restarting, connections cut, the
#: pool exhausted, a file locked or its disk failing): a retry later may succeed.
UNAVAILABLE: tuple[type[Exception], ...] = (sqlite3.OperationalError, psycopg.OperationalError)

#: The largest INTEGER SQLite stores (and PostgreSQL's BIGINT); client numbers past it are
#: cut to it or refused.
MAX_INTEGER = 2**63 - 1


class Row(Protocol):
    """A result row: by column name or position (``sqlite3.Row``, ``postgres.PgRow``)."""

    def __getitem__(self, key: int | str, /) -> Any: ...

    def keys(self) -> list[str]: ...


class Cursor(Protocol):
    rowcount: int

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class Conn(Protocol):
    """A connection of either backend, as this package's query functions use it.

    SQL is written once, in SQLite's dialect with ``?`` / ``:name`` parameters; the
    PostgreSQL connection (``postgres.PgConn``) translates each statement once and caches it.
    The few statements the dialects cannot share branch on ``conn.postgres``.
    """

    postgres: bool
    writing: bool
    queued_events: list[tuple[str, str, str, str]]
    queued_assertions: list[dict[str, Any]]

    def execute(self, sql: str, parameters: Any = ..., /) -> Any: ...

    def executemany(self, sql: str, parameters: Iterable[Any], /) -> Any: ...

    def savepoint(self) -> contextlib.AbstractContextManager[None]: ...

    def pipeline(self) -> contextlib.AbstractContextManager[Any]: ...

    def update_later(
        self,
        job_id: str,
        values: Mapping[str, Any],
        statuses: tuple[str, ...] | None,
        attempts: int | None,
    ) -> bool: ...


class Database(Protocol):
    """The store's interface: :class:`~.sqlite.ForgeDB` or :class:`~.postgres.PostgresDB`."""

    postgres: bool

    def describe(self) -> str: ...

    def connection(self) -> contextlib.AbstractContextManager[Conn]: ...

    def tx(self, *, pipeline: bool = False) -> contextlib.AbstractContextManager[Conn]: ...

    def snapshot(self) -> contextlib.AbstractContextManager[Conn]: ...

    def ping(self) -> None: ...

    def close(self) -> None: ...


#: The statements that write queued rows (:meth:`QueuedWrites.write_queued`); the events'
#: and assertions' queries use them too.
INSERT_EVENT = "INSERT OR IGNORE INTO events (id, job_id, type, document) VALUES (?, ?, ?, ?)"

INSERT_ASSERTION = (
    "INSERT INTO assertions (id, subject, predicate, object, confidence, source, ts,"
    " expires, document) VALUES (:id, :subject, :predicate, :object, :confidence, :source,"
    " :ts, :expires, :document)"
)


class QueuedWrites:
    """The events and assertions a transaction will write, and savepoints (both backends).

    Job transitions queue their JobEvents and TruthCore assertions here (:func:`queue_event`,
    :func:`queue_assertion`); the database's ``tx`` writes them with one ``executemany`` per
    table just before it commits, in the order they were queued.
    """

    queued_events: list[tuple[str, str, str, str]]
    queued_assertions: list[dict[str, Any]]

    def execute(self, sql: str, parameters: Any = (), /) -> Any:
        raise NotImplementedError

    def executemany(self, sql: str, parameters: Iterable[Any], /) -> Any:
        raise NotImplementedError

    def write_queued(self) -> None:
        """Insert the queued events and assertions (inside the caller's transaction)."""
        events, self.queued_events = self.queued_events, []
        assertions, self.queued_assertions = self.queued_assertions, []
        if events:
            self.executemany(INSERT_EVENT, events)
        if assertions:
            self.executemany(INSERT_ASSERTION, assertions)

    def drop_queued(self) -> None:
        self.queued_events, self.queued_assertions = [], []

    def update_later(
        self,
        job_id: str,
        values: Mapping[str, Any],
        statuses: tuple[str, ...] | None,
        attempts: int | None,
    ) -> bool:
        """Take a job's guarded update (:func:`.jobs.update_job`) to send with the updates
        next to it, in one statement, before any other statement; False when this
        connection sends it now (SQLite; PostgreSQL outside a pipelined transaction)."""
        return False

    def pipeline(self) -> contextlib.AbstractContextManager[Any]:
        """Statements sent inside are not waited for one by one (PostgreSQL's pipeline mode).

        A result is read when asked for (``fetchone``, iterating, ``rowcount``) or when the
        block ends, so a batch of writes costs one round trip to the server instead of one
        each. SQLite runs in this process: nothing to save, so nothing changes there.
        """
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def savepoint(self) -> Iterator[None]:
        """A part of the transaction that an exception undoes alone (writes and queued rows).

        Housekeeping and answer recording handle many jobs in one transaction; with each job
        in its own savepoint, one job that cannot be handled does not roll back the others.
        """
        events, assertions = len(self.queued_events), len(self.queued_assertions)
        self.execute("SAVEPOINT job")
        try:
            yield
        except BaseException:
            self.execute("ROLLBACK TO job")
            self.execute("RELEASE job")
            del self.queued_events[events:]
            del self.queued_assertions[assertions:]
            raise
        self.execute("RELEASE job")
