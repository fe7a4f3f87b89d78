"""The forge's store on PostgreSQL (``RUNNERKIT_FORGE_DB_URL=postgresql://…``).

The same interface as :class:`~runnerkit.forge.db.sqlite.ForgeDB` (``connection``, ``tx``,
``snapshot``, ``ping``, ``close``) over psycopg 3 and a ``psycopg_pool`` pool per process, so
every query function of :mod:`runnerkit.forge.db` runs on either backend:

- SQL is written once, in SQLite's dialect; :func:`translate` turns a statement
  into PostgreSQL's once (``?`` and ``:name`` become ``%s`` and ``%(name)s``, SQLite's
  ``INDEXED BY`` hints are dropped, ``rowid`` is the runners' ``seq``, ``INSERT OR IGNORE``
  is ``ON CONFLICT DO NOTHING``) and caches it.
- Rows (:class:`PgRow`) answer by column name and by position, as ``sqlite3.Row`` does.
- Write transactions take turns on one transaction-level advisory lock (the counterpart of
  the SQLite store's writers' turn: the job state machine reads, decides and writes within
  one turn, whichever forge process or instance holds it); reads run beside them in
  snapshots (``REPEATABLE READ``) or single statements. Claims read waiting jobs with
  ``FOR UPDATE SKIP LOCKED``.
- The schema is migrated (:func:`.schema.migrate`) once per process, in its own turn.

A pooled connection the server has closed (a restart, an administrator's
``pg_terminate_backend``) is found on checkout and replaced, so a server restart costs no
request an error once the server is back; while it is down, the forge answers 503.

Connections must not cross ``fork``: a process that finds a pool made by its parent keeps
that pool referenced, unused (closing or freeing it would end the parent's sessions), and
opens its own. The dispatcher's leadership over the same database is
:mod:`.leadership`'s.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import re
import select
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg.pq import TransactionStatus
from psycopg_pool import ConnectionPool

from runnerkit.service.settings import ConfigError

from . import pg_rows
from .interface import QueuedWrites
from .pg_text import configure as _configure
from .schema import migrate

log = logging.getLogger("runnerkit.forge.postgres")

_TOKEN = re.compile(r"'[^']*'|\?|(?<![:\w]):([A-Za-z_]\w*)|\s+INDEXED BY \w+|\browid\b")

_translated: dict[str, str] = {}
_IGNORE = "INSERT OR IGNORE INTO "


def _replace(match: re.Match[str]) -> str:
    text = match.group(0)
    if text[0] == "'":
        return text
    if text == "?":
        return "%s"
    if text == "rowid":
        return "seq"
    if match.group(1):
        return f"%({match.group(1)})s"
    return ""  # an INDEXED BY hint: PostgreSQL's planner picks its own


def translate(sql: str) -> str:
    """A statement of the queries (SQLite's dialect) as PostgreSQL reads it (cached)."""
    found = _translated.get(sql)
    if found is None:
        found = _TOKEN.sub(_replace, sql)
        if found.startswith(_IGNORE):
            found = f"INSERT INTO {found[len(_IGNORE) :]} ON CONFLICT DO NOTHING"
        if len(_translated) < 4096:
            _translated[sql] = found
    return found


class PgRow:
    """A result row by column name or position, like ``sqlite3.Row``."""

    __slots__ = ("_names", "_values")

    def __init__(self, values: Sequence[Any], names: dict[str, int]) -> None:
        self._values = values
        self._names = names

    def __getitem__(self, key: int | str) -> Any:
        if type(key) is str:
            return self._values[self._names[key]]
        return self._values[key]  # type: ignore[index]

    def keys(self) -> list[str]:
        return list(self._names)

    def __iter__(self) -> Iterator[Any]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"PgRow({dict(zip(self._names, self._values, strict=True))!r})"


def _row_factory(cursor: Any) -> Any:
    description = cursor.description
    if description is None:
        return tuple
    names = {column.name: index for index, column in enumerate(description)}

    def make(values: Sequence[Any]) -> PgRow:
        return PgRow(values, names)

    return make


class _StatementRows:
    """The row factory of one statement: its column names read from its first result, then
    reused (building them from ``cursor.description`` makes a Column object per column, a
    few percent of the forge's CPU when done for every query)."""

    __slots__ = ("make",)

    def __init__(self) -> None:
        self.make: Any = None

    def __call__(self, cursor: Any) -> Any:
        make = self.make
        if make is None:
            description = cursor.description
            if description is None:
                return tuple
            names = {column.name: index for index, column in enumerate(description)}
            make = self.make = functools.partial(PgRow, names=names)
        return make


class PgConn(QueuedWrites):
    """One pooled psycopg connection (autocommit: transactions are begun explicitly).

    ``rows`` caches each statement's row factory: one per database once it is migrated (a
    statement's columns are then fixed); without it each result reads its own columns.
    """

    postgres = True

    def __init__(
        self, raw: psycopg.Connection[Any], rows: dict[str, _StatementRows] | None = None
    ) -> None:
        self.raw = raw
        self.rows = rows
        self.queued_events = []
        self.queued_assertions = []
        self.writing = False
        #: Updates taken by :meth:`update_later`, all of one shape, not sent yet; None: this
        #: connection sends each update at once (outside a pipelined transaction).
        self.later: list[tuple[str, tuple[Any, ...], int | None]] | None = None
        self._later_shape: pg_rows.UpdateShape | None = None
        self._later_ids: set[str] = set()

    def update_later(
        self,
        job_id: str,
        values: Mapping[str, Any],
        statuses: tuple[str, ...] | None,
        attempts: int | None,
    ) -> bool:
        later = self.later
        if later is None:
            return False
        shape = (tuple(values), statuses, attempts is not None)
        if later and (shape != self._later_shape or job_id in self._later_ids):
            self.send_later()  # one statement per shape, and a job's updates in order
        self._later_shape = shape
        self._later_ids.add(job_id)
        later.append((job_id, tuple(values.values()), attempts))
        return True

    def send_later(self) -> None:
        """Send the updates :meth:`update_later` took, one statement (in the pipeline)."""
        later, shape = self.later, self._later_shape
        if not later or shape is None:
            return
        updates = list(later)
        later.clear()
        self._later_ids.clear()
        self.raw.execute(
            pg_rows.update_statement(shape, len(updates) > 1),
            pg_rows.update_parameters(shape, updates),
        )

    def drop_queued(self) -> None:
        super().drop_queued()
        if self.later:
            self.later.clear()
            self._later_ids.clear()

    def execute(self, sql: str, parameters: Any = None, /) -> Any:
        if self.later:
            self.send_later()
        rows = self.rows
        if rows is None:
            cursor = self.raw.cursor()
        else:
            factory = rows.get(sql)
            if factory is None:
                factory = _StatementRows()
                if len(rows) < 4096:  # statements are few; a bound all the same
                    rows[sql] = factory
            cursor = self.raw.cursor(row_factory=factory)
        cursor.execute(translate(sql), parameters if parameters else None)
        return cursor

    def executemany(self, sql: str, parameters: Iterable[Any], /) -> Any:
        if self.later:
            self.send_later()
        cursor = self.raw.cursor()
        cursor.executemany(translate(sql), list(parameters))
        return cursor

    def write_queued(self) -> None:
        """Insert the queued events and assertions in one statement, however many rows
        (:mod:`.pg_rows`), instead of one execution per row as ``executemany`` makes."""
        if self.later:
            self.send_later()
        parameters = pg_rows.queued_parameters(self)
        if parameters is not None:
            self.raw.execute(pg_rows.INSERT_QUEUED, parameters)

    def insert_jobs(self, jobs: Sequence[Mapping[str, Any]], notify: str | None) -> set[str]:
        """Insert ``jobs`` (new submissions, ids distinct) with the events and assertions
        queued for them, in one statement, which is its own transaction outside ``tx``:
        the ids inserted (an id already taken inserts nothing of its job's). ``notify``: a
        channel to NOTIFY (at commit) when a job was inserted."""
        parameters = (*pg_rows.jobs_parameters(self, jobs), notify, notify)
        cursor = self.raw.execute(pg_rows.INSERT_JOBS, parameters)
        return {row[0] for row in cursor.fetchall()}  # text comes back unescaped

    def pipeline(self) -> contextlib.AbstractContextManager[Any]:
        """psycopg's pipeline mode (see :meth:`.interface.QueuedWrites.pipeline`); a
        ``rowcount`` is known once the block ends."""
        return self.raw.pipeline()

    @property
    def in_transaction(self) -> bool:
        return bool(self.raw.info.transaction_status != TransactionStatus.IDLE)


def redact_url(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def check_url(url: str) -> None:
    if urlsplit(url).scheme not in ("postgresql", "postgres"):
        raise ConfigError(
            f"RUNNERKIT_FORGE_DB_URL must be a postgresql:// URL (got {redact_url(url)!r}); "
            "leave it empty for the SQLite file of RUNNERKIT_FORGE_DB_PATH"
        )


def _suspect(raw: Any) -> bool:
    """Whether an idle pooled connection may be dead: closed, or with bytes (or EOF) waiting."""
    if raw.closed or raw.broken:
        return True
    try:
        readable, _, _ = select.select([raw.fileno()], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


class PostgresDB:
    """The forge's PostgreSQL database: schema on first use, a pool per process, transactions."""

    postgres = True

    def __init__(self, url: str, *, pool_size: int = 10, connect_timeout_s: float = 10.0) -> None:
        check_url(url)
        self.url = url
        self.pool_size = pool_size
        self.connect_timeout_s = connect_timeout_s
        self._lock = threading.Lock()
        self._pool: ConnectionPool[Any] | None = None
        self._pid = 0
        self._abandoned: list[Any] = []  # the parent's pools after a fork: never used, never freed
        self._turn_key = 0
        #: Each statement's row factory (:class:`_StatementRows`), once the schema is migrated.
        self._rows: dict[str, _StatementRows] = {}

    def describe(self) -> str:
        return redact_url(self.url)

    # -- connections ------------------------------------------------------------------------

    def _open(self) -> ConnectionPool[Any]:
        try:  # first one plain connection: an unreachable server fails at once, and says why
            psycopg.connect(self.url, connect_timeout=max(1, round(self.connect_timeout_s))).close()
        except psycopg.OperationalError as exc:
            raise psycopg.OperationalError(
                f"the forge cannot reach its PostgreSQL database {self.describe()}: "
                f"{str(exc).strip()}"
            ) from None
        pool: ConnectionPool[Any] = ConnectionPool(
            self.url,
            min_size=1,
            max_size=self.pool_size,
            kwargs={"autocommit": True, "row_factory": _row_factory},
            configure=_configure,
            timeout=self.connect_timeout_s,
            name="runnerkit-forge",
            open=False,
        )
        pool.open(wait=True, timeout=self.connect_timeout_s)
        try:
            with pool.connection() as raw:
                self._prepare(PgConn(raw))
        except BaseException:
            pool.close()
            raise
        return pool

    def _prepare(self, conn: PgConn) -> None:
        """The writers' lock key (one per database and schema), then the migrations."""
        where = conn.execute("SELECT current_database(), current_schema()").fetchone()
        digest = hashlib.sha256(f"runnerkit-forge:{where[0]}:{where[1]}".encode()).digest()
        self._turn_key = int.from_bytes(digest[:8], "big", signed=True)
        conn.execute("BEGIN")
        try:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (self._turn_key,))
            migrate(conn, self.describe())
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def _get_pool(self) -> ConnectionPool[Any]:
        with self._lock:
            if self._pid != os.getpid():
                if self._pool is not None:
                    self._abandoned.append(self._pool)
                self._pool, self._pid = None, os.getpid()
            if self._pool is None:
                self._pool = self._open()
            return self._pool

    def _checkout(self, pool: ConnectionPool[Any]) -> Any:
        """A pooled connection the server has not closed meanwhile.

        An idle connection's socket has nothing to read; one the server ended holds its
        goodbye (or EOF). Only such a suspect pays for a round trip (the pool's own check),
        and is swapped for a new connection when that fails: a zero-timeout ``select`` per
        checkout instead of a query.
        """
        for _ in range(self.pool_size + 1):
            raw = pool.getconn()
            if not _suspect(raw):
                return raw
            try:
                ConnectionPool.check_connection(raw)
            except psycopg.Error:
                log.info("a pooled PostgreSQL connection was closed by the server; replaced")
                with contextlib.suppress(psycopg.Error):
                    raw.close()
                pool.putconn(raw)  # a closed connection is discarded and replaced
                continue
            return raw
        return pool.getconn()

    @contextlib.contextmanager
    def connection(self) -> Iterator[PgConn]:
        """A pooled connection in autocommit mode (each statement is its own transaction)."""
        pool = self._get_pool()
        raw = self._checkout(pool)
        conn = PgConn(raw, self._rows)
        try:
            yield conn
        finally:
            if not raw.closed and conn.in_transaction:
                with contextlib.suppress(psycopg.Error):
                    raw.execute("ROLLBACK")
            conn.drop_queued()
            pool.putconn(raw)

    @contextlib.contextmanager
    def tx(self, *, pipeline: bool = False) -> Iterator[PgConn]:
        """A write transaction, in the writers' turn (an advisory lock), committed on success.

        ``pipeline``: the whole transaction in one pipeline (see
        :meth:`.interface.QueuedWrites.pipeline`; for a body that reads no ``rowcount``):
        its ``BEGIN`` and turn go out with its first read, and its queued rows and ``COMMIT``
        in one round trip at the end, instead of a round trip each for ``BEGIN``, the
        pipeline's end and the ``COMMIT``.
        """
        if pipeline:
            with self._pipelined_tx() as conn:
                yield conn
            return
        with self.connection() as conn:
            conn.raw.execute(f"BEGIN; SELECT pg_advisory_xact_lock({self._turn_key})")
            conn.writing = True
            try:
                yield conn
                if conn.queued_events or conn.queued_assertions:
                    # The queued rows and the COMMIT in one pipeline: one round trip, not 3.
                    with conn.raw.pipeline():
                        conn.write_queued()
                        conn.raw.execute("COMMIT")
                else:
                    conn.raw.execute("COMMIT")
            except BaseException:
                conn.drop_queued()
                with contextlib.suppress(psycopg.Error):
                    conn.raw.execute("ROLLBACK")
                raise
            finally:
                conn.writing = False

    @contextlib.contextmanager
    def _pipelined_tx(self) -> Iterator[PgConn]:
        """:meth:`tx` in one pipeline: the same statements (``BEGIN`` and the turn are two in
        a pipeline, which takes no multi-statement string), fewer waits for the server.

        The turn is taken before any statement of the body runs (a pipeline runs its
        statements in order), so the body reads and decides within its turn as before.
        A job's guarded update waits for the statement after it (:meth:`PgConn.update_later`):
        the updates the body makes one after another are one statement, still sent before
        anything the body does next, in their order.
        """
        with self.connection() as conn:
            raw = conn.raw
            try:
                with raw.pipeline():
                    raw.execute("BEGIN")
                    raw.execute(f"SELECT pg_advisory_xact_lock({self._turn_key})")
                    conn.writing = True
                    conn.later = []
                    yield conn
                    conn.write_queued()  # sends the updates still taken first
                    raw.execute("COMMIT")
            except BaseException:
                conn.drop_queued()
                with contextlib.suppress(psycopg.Error):
                    raw.execute("ROLLBACK")
                raise
            finally:
                conn.writing = False
                conn.later = None

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[PgConn]:
        """A read transaction: every statement inside sees the same state."""
        with self.connection() as conn:
            conn.raw.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            try:
                yield conn
            finally:
                if not conn.raw.closed:
                    conn.raw.execute("COMMIT")

    def close(self) -> None:
        """Close this process's pool (a parent's pool is left to the parent)."""
        with self._lock:
            pool = self._pool if self._pid == os.getpid() else None
            self._pool = None
        if pool is not None:
            pool.close()

    def ping(self) -> None:
        """Run a trivial query against the tables (raises psycopg.Error when it cannot)."""
        with self.connection() as conn:
            conn.execute("SELECT COUNT(*) FROM meta").fetchone()
            conn.execute("SELECT 1 FROM jobs LIMIT 1").fetchone()
