"""The forge's store on PostgreSQL (``RUNNERKIT_FORGE_DB_URL=postgresql://…``).

The same interface as :class:`~runnerkit.forge.db.ForgeDB` (``connection``, ``tx``,
``snapshot``, ``ping``, ``close``) over psycopg 3 and a ``psycopg_pool`` pool per process, so
every query function of :mod:`.db` runs on either backend:

- SQL is written once in :mod:`.db`, SQLite's dialect; :func:`translate` turns a statement
  into PostgreSQL's once (``?`` and ``:name`` become ``%s`` and ``%(name)s``, SQLite's
  ``INDEXED BY`` hints are dropped, ``rowid`` is the runners' ``seq``, ``INSERT OR IGNORE``
  is ``ON CONFLICT DO NOTHING``) and caches it.
- Rows (:class:`PgRow`) answer by column name and by position, as ``sqlite3.Row`` does.
- Write transactions take turns on one transaction-level advisory lock (the counterpart of
  the SQLite store's writers' turn: the job state machine reads, decides and writes within
  one turn, whichever forge process or instance holds it); reads run beside them in
  snapshots (``REPEATABLE READ``) or single statements. Claims read waiting jobs with
  ``FOR UPDATE SKIP LOCKED``.
- The schema is migrated (:func:`.db.migrate`) once per process, in its own turn.

A pooled connection the server has closed (a restart, an administrator's
``pg_terminate_backend``) is found on checkout and replaced, so a server restart costs no
request an error once the server is back; while it is down, the forge answers 503.

Connections must not cross ``fork``: a process that finds a pool made by its parent keeps
that pool referenced, unused (closing or freeing it would end the parent's sessions), and
opens its own.
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
from collections.abc import Iterable, Iterator, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg.pq import TransactionStatus
from psycopg.types.string import StrDumperUnknown, TextLoader
from psycopg_pool import ConnectionPool

from runnerkit.service.settings import ConfigError

from . import db

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
    """A statement of :mod:`.db` (SQLite's dialect) as PostgreSQL reads it (cached)."""
    found = _translated.get(sql)
    if found is None:
        found = _TOKEN.sub(_replace, sql)
        if found.startswith(_IGNORE):
            found = f"INSERT INTO {found[len(_IGNORE) :]} ON CONFLICT DO NOTHING"
        if len(_translated) < 4096:
            _translated[sql] = found
    return found


# PostgreSQL's text cannot hold NUL, which a JSON string (a job type, a runner's name, an
# assertion's subject) may: such strings are stored with NUL written as ESC "0" and ESC itself
# as ESC ESC (ESC a private-use character), and read back as they were. The forge's JSON
# documents are ASCII (``\u0000`` escaped), so only strings stored raw ever change.
_ESC = "\ue000"
_ESCAPED = re.compile(f"{_ESC}(.)", re.DOTALL)


def escape_text(value: str) -> str:
    if "\x00" not in value and _ESC not in value:
        return value
    return value.replace(_ESC, _ESC + _ESC).replace("\x00", _ESC + "0")


def unescape_text(value: str) -> str:
    return _ESCAPED.sub(lambda m: "\x00" if m.group(1) == "0" else m.group(1), value)


class _NulSafeDumper(StrDumperUnknown):
    def dump(self, obj: str) -> Any:
        return super().dump(escape_text(obj))


class _NulSafeLoader(TextLoader):
    def load(self, data: Any) -> Any:
        value = super().load(data)
        if isinstance(value, str) and _ESC in value:
            return unescape_text(value)
        return value


def _configure(conn: psycopg.Connection[Any]) -> None:
    conn.adapters.register_dumper(str, _NulSafeDumper)
    conn.adapters.register_loader("text", _NulSafeLoader)


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


class PgConn(db.QueuedWrites):
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

    def execute(self, sql: str, parameters: Any = None, /) -> Any:
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
        cursor = self.raw.cursor()
        cursor.executemany(translate(sql), list(parameters))
        return cursor

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
            db.migrate(conn, self.describe())
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
    def tx(self) -> Iterator[PgConn]:
        """A write transaction, in the writers' turn (an advisory lock), committed on success."""
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


class PgLeadership:
    """The dispatcher's leadership over every forge process and instance on one database.

    A session-level advisory lock (``pg_try_advisory_lock``) held on a connection of its
    own, outside the pool: the process that holds it dispatches, sweeps and prunes; when its
    connection ends (the process exits or is killed, the server restarts, the network
    drops) PostgreSQL frees the lock and the next process to try takes it. A lost connection
    is lost leadership: :attr:`held` turns false and the dispatcher stops ticking until it
    takes the lock again. The same connection ``LISTEN``\\ s on the database's wake-up
    channel, where every forge process ``NOTIFY``\\ s new jobs and results (:meth:`notify`).
    Same interface as :class:`runnerkit.state.FileLock` (``held``, ``acquire``, ``release``).
    """

    def __init__(self, database: PostgresDB) -> None:
        self.database = database
        self._conn: psycopg.Connection[Any] | None = None
        self._pid = 0
        self._held = False
        self._failing = False
        self._key = 0
        self.channel = ""
        #: Notifications received by this process while it held the lock.
        self.notified = 0
        self._wanted = threading.Condition()
        self._notify_wanted = False
        self._notifier_pid = 0

    def _names(self) -> None:
        if self.channel:
            return
        with self.database.connection() as conn:
            where = conn.execute("SELECT current_database(), current_schema()").fetchone()
        digest = hashlib.sha256(f"runnerkit-dispatcher:{where[0]}:{where[1]}".encode()).digest()
        self._key = int.from_bytes(digest[:8], "big", signed=True)
        self.channel = f"runnerkit_forge_{digest[8:20].hex()}"

    @property
    def held(self) -> bool:
        conn = self._conn
        if not self._held or conn is None or self._pid != os.getpid():
            return False
        if conn.closed or conn.broken:
            self._lost()
            return False
        return True

    def acquire(self) -> bool:
        """Take the lock if free (never waits); True while this process holds it."""
        if self.held:
            return True
        try:
            self._names()
            if self._conn is None or self._pid != os.getpid() or self._conn.closed:
                self._conn = None  # a parent's connection is the parent's: never used here
                self._conn = psycopg.connect(
                    self.database.url,
                    autocommit=True,
                    connect_timeout=max(1, round(self.database.connect_timeout_s)),
                )
                self._pid = os.getpid()
            row = self._conn.execute("SELECT pg_try_advisory_lock(%s)", (self._key,)).fetchone()
            self._failing = False
            if not row or not row[0]:
                return False
            self._conn.execute(f"LISTEN {self.channel}")
        except psycopg.Error as exc:
            if not self._failing:  # once per outage, not once per poll
                log.warning("the dispatcher lock cannot be taken: %s", str(exc).strip())
            self._failing = True
            self._drop()
            return False
        self._held = True
        return True

    def _lost(self) -> None:
        log.warning("the dispatcher lock's connection to PostgreSQL is lost: leadership lost")
        self._drop()

    def _drop(self) -> None:
        conn, self._conn, self._held = self._conn, None, False
        if conn is not None and self._pid == os.getpid():
            with contextlib.suppress(Exception):
                conn.close()

    def release(self) -> None:
        """Give the lock up (closing its connection frees it)."""
        if self._pid == os.getpid():
            self._drop()
        else:
            self._conn, self._held = None, False

    def fileno(self) -> int | None:
        """The lock connection's socket while held (readable: a notification, or its end)."""
        if not self.held:
            return None
        assert self._conn is not None
        return int(self._conn.pgconn.socket)

    def consume(self) -> int:
        """Read what arrived on the lock connection; how many notifications (a lost
        connection loses the lock)."""
        conn = self._conn
        if conn is None or not self.held:
            return 0
        count = 0
        try:
            conn.pgconn.consume_input()
            while conn.pgconn.notifies() is not None:
                count += 1
        except psycopg.Error:
            self._lost()
            return count
        if conn.pgconn.status != psycopg.pq.ConnStatus.OK:
            self._lost()
        self.notified += count
        return count

    def notify(self) -> None:
        """Wake the dispatcher, whichever forge instance it runs in, without waiting.

        This process's notifier thread sends the NOTIFY: requests made while it is not yet
        sending are served by its next one (what they announce is committed before they
        ask), so under load one round trip wakes the dispatcher for many submissions
        instead of one each, and no request waits for it. Errors are only logged: the
        dispatcher's poll finds the work anyway.
        """
        pid = os.getpid()
        if self._notifier_pid != pid:  # no notifier yet, or the parent's before a fork
            # Made anew: a parent's condition could be held by a thread that did not fork.
            self._wanted = threading.Condition()
            self._notifier_pid = pid
            threading.Thread(
                target=self._notifier, name="runnerkit-forge-notify", daemon=True
            ).start()
        with self._wanted:
            self._notify_wanted = True
            self._wanted.notify()

    def _notifier(self) -> None:
        while True:
            wanted = self._wanted
            with wanted:
                while not self._notify_wanted:
                    wanted.wait()
                self._notify_wanted = False
            self.notify_now()

    def notify_now(self) -> None:
        """Send one NOTIFY on the dispatcher's channel, from this thread."""
        try:
            self._names()
            with self.database.connection() as conn:
                conn.raw.execute("SELECT pg_notify(%s, '')", (self.channel,))
        except psycopg.Error as exc:
            log.warning("NOTIFY to the dispatcher failed: %s", str(exc).strip())
