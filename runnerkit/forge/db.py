"""The forge's storage: one SQLite file (WAL) with its schema and every query the forge runs.

Tables: ``runners`` (registrations and heartbeats), ``jobs`` (requests, status, attempts, the
runner slot a job holds, results), ``deliveries`` (digests of async results already received),
``events`` (JobEvents), ``assertions`` (TruthCore), ``meta`` (the dispatcher's heartbeat) and
``violations`` (what runners sent that broke a contract: its queries are :mod:`.violations`').
Wire values are stored as JSON text; instants the forge compares are stored twice, as the
contract's ``...Z`` string and as epoch seconds.

Connections come from a small per-process pool: sqlite3 objects must not cross ``fork``, so a
process that finds a pool made by its parent drops it and opens its own. Writers use
``BEGIN IMMEDIATE`` so concurrent transactions queue on SQLite's busy timeout instead of
failing on a lock upgrade. A transaction's JobEvents and forge-made assertions are queued on
its connection and inserted with one ``executemany`` per table at commit (:class:`Conn`);
the forge names them with time-ordered (version 7) uuids so their unique indexes grow at one
end. Waiting jobs are found along ``jobs_wait (status, type, priority DESC, seq)``, one
ordered walk per status and job type.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import psycopg

from runnerkit.service.settings import ConfigError
from runnerkit.service.sqlite import WriterTurns, prepare_wal

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
    """A connection of either backend, as the query functions below use it.

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
            self.executemany(_INSERT_EVENT, events)
        if assertions:
            self.executemany(_INSERT_ASSERTION, assertions)

    def drop_queued(self) -> None:
        self.queued_events, self.queued_assertions = [], []

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


# --------------------------------------------------------------------------- schema


@dataclass(frozen=True)
class Migration:
    """One step of the schema's history, the same step on both backends.

    ``sqlite`` and ``postgres`` are scripts of ``;``-separated statements; the step and the
    new ``schema_version`` are written in one transaction.
    """

    version: int
    summary: str
    sqlite: str
    postgres: str


_V1_SQLITE = """
CREATE TABLE IF NOT EXISTS runners (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    document TEXT NOT NULL,
    health_url TEXT NOT NULL,
    base_url TEXT NOT NULL,
    registered_at TEXT NOT NULL,
    last_heartbeat_at TEXT NOT NULL,
    last_seen REAL NOT NULL,
    status TEXT NOT NULL,
    heartbeat_interval_ms REAL NOT NULL,
    reported_active INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS runners_health_url ON runners (health_url);

CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    type TEXT NOT NULL,
    priority INTEGER NOT NULL,
    status TEXT NOT NULL,
    request TEXT NOT NULL,
    submitted REAL NOT NULL,
    updated_at TEXT NOT NULL,
    not_before REAL,
    expires REAL,
    timeout_ms REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    runner_id TEXT,
    runner_name TEXT,
    runner_version TEXT,
    capability_id TEXT,
    first_started_at TEXT,
    attempt_started_at TEXT,
    slot_runner TEXT,
    slot_capability TEXT,
    lease_until REAL,
    async INTEGER NOT NULL DEFAULT 0,
    result TEXT,
    error TEXT,
    last_error TEXT
);
DROP INDEX IF EXISTS jobs_queue;
CREATE INDEX IF NOT EXISTS jobs_wait ON jobs (status, type, priority DESC, seq);
CREATE INDEX IF NOT EXISTS jobs_type ON jobs (type, seq);
CREATE INDEX IF NOT EXISTS jobs_slot ON jobs (slot_runner, slot_capability);
CREATE INDEX IF NOT EXISTS jobs_finished ON jobs (updated_at)
    WHERE status IN ('completed', 'failed', 'cancelled');

CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    job_id TEXT NOT NULL,
    type TEXT NOT NULL,
    document TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_job ON events (job_id, seq);

CREATE TABLE IF NOT EXISTS assertions (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    subject TEXT NOT NULL,
    predicate TEXT NOT NULL,
    object TEXT NOT NULL,
    confidence REAL NOT NULL,
    source TEXT NOT NULL,
    ts REAL NOT NULL,
    expires REAL,
    document TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS assertions_subject ON assertions (subject, predicate);
CREATE INDEX IF NOT EXISTS assertions_predicate ON assertions (predicate);
CREATE INDEX IF NOT EXISTS assertions_ts ON assertions (ts);
CREATE INDEX IF NOT EXISTS assertions_expires ON assertions (expires) WHERE expires IS NOT NULL;

CREATE TABLE IF NOT EXISTS deliveries (
    job_id TEXT NOT NULL,
    digest TEXT NOT NULL,
    received REAL NOT NULL,
    PRIMARY KEY (job_id, digest)
);

CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
)
"""

# The same tables on PostgreSQL: BIGINT for SQLite's 64-bit INTEGER, DOUBLE PRECISION for its
# REAL, identity columns for AUTOINCREMENT, a ``seq`` on runners for SQLite's rowid (their
# registration order), and text compared bytewise (COLLATE "C", SQLite's BINARY): the forge
# compares and sorts its Z timestamps as text.
_V1_POSTGRES = """
CREATE TABLE runners (
    seq BIGINT GENERATED BY DEFAULT AS IDENTITY UNIQUE,
    id TEXT COLLATE "C" PRIMARY KEY,
    name TEXT COLLATE "C" NOT NULL,
    version TEXT COLLATE "C" NOT NULL,
    document TEXT NOT NULL,
    health_url TEXT COLLATE "C" NOT NULL,
    base_url TEXT COLLATE "C" NOT NULL,
    registered_at TEXT COLLATE "C" NOT NULL,
    last_heartbeat_at TEXT COLLATE "C" NOT NULL,
    last_seen DOUBLE PRECISION NOT NULL,
    status TEXT COLLATE "C" NOT NULL,
    heartbeat_interval_ms DOUBLE PRECISION NOT NULL,
    reported_active BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX runners_health_url ON runners (health_url);

CREATE TABLE jobs (
    seq BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    id TEXT COLLATE "C" NOT NULL UNIQUE,
    type TEXT COLLATE "C" NOT NULL,
    priority BIGINT NOT NULL,
    status TEXT COLLATE "C" NOT NULL,
    request TEXT NOT NULL,
    submitted DOUBLE PRECISION NOT NULL,
    updated_at TEXT COLLATE "C" NOT NULL,
    not_before DOUBLE PRECISION,
    expires DOUBLE PRECISION,
    timeout_ms DOUBLE PRECISION NOT NULL,
    attempts BIGINT NOT NULL DEFAULT 0,
    runner_id TEXT COLLATE "C",
    runner_name TEXT COLLATE "C",
    runner_version TEXT COLLATE "C",
    capability_id TEXT COLLATE "C",
    first_started_at TEXT COLLATE "C",
    attempt_started_at TEXT COLLATE "C",
    slot_runner TEXT COLLATE "C",
    slot_capability TEXT COLLATE "C",
    lease_until DOUBLE PRECISION,
    async BIGINT NOT NULL DEFAULT 0,
    result TEXT,
    error TEXT,
    last_error TEXT
);
CREATE INDEX jobs_wait ON jobs (status, type, priority DESC, seq);
CREATE INDEX jobs_type ON jobs (type, seq);
CREATE INDEX jobs_slot ON jobs (slot_runner, slot_capability);
CREATE INDEX jobs_finished ON jobs (updated_at)
    WHERE status IN ('completed', 'failed', 'cancelled');

CREATE TABLE events (
    seq BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    id TEXT COLLATE "C" NOT NULL UNIQUE,
    job_id TEXT COLLATE "C" NOT NULL,
    type TEXT COLLATE "C" NOT NULL,
    document TEXT NOT NULL
);
CREATE INDEX events_job ON events (job_id, seq);

CREATE TABLE assertions (
    seq BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    id TEXT COLLATE "C" NOT NULL UNIQUE,
    subject TEXT COLLATE "C" NOT NULL,
    predicate TEXT COLLATE "C" NOT NULL,
    object TEXT COLLATE "C" NOT NULL,
    confidence DOUBLE PRECISION NOT NULL,
    source TEXT COLLATE "C" NOT NULL,
    ts DOUBLE PRECISION NOT NULL,
    expires DOUBLE PRECISION,
    document TEXT NOT NULL
);
CREATE INDEX assertions_subject ON assertions (subject, predicate);
CREATE INDEX assertions_predicate ON assertions (predicate);
CREATE INDEX assertions_ts ON assertions (ts);
CREATE INDEX assertions_expires ON assertions (expires) WHERE expires IS NOT NULL;

CREATE TABLE deliveries (
    job_id TEXT COLLATE "C" NOT NULL,
    digest TEXT COLLATE "C" NOT NULL,
    received DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (job_id, digest)
);

CREATE TABLE IF NOT EXISTS meta (
    key TEXT COLLATE "C" PRIMARY KEY,
    value TEXT NOT NULL
)
"""

# Contract violations the referee records (:mod:`.violations`): the last few per runner, and
# those it could tie to no runner (``runner_id`` NULL); a count per runner that is never cut.
_V3_SQLITE = """
CREATE TABLE IF NOT EXISTS violations (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    runner_id TEXT,
    job_id TEXT,
    attempt INTEGER,
    source TEXT NOT NULL,
    contract TEXT NOT NULL,
    path TEXT NOT NULL,
    message TEXT NOT NULL,
    at TEXT NOT NULL,
    ts REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS violations_runner ON violations (runner_id, seq);
CREATE INDEX IF NOT EXISTS violations_job ON violations (job_id) WHERE job_id IS NOT NULL;
ALTER TABLE runners ADD COLUMN violations INTEGER NOT NULL DEFAULT 0;
ALTER TABLE runners ADD COLUMN refusal TEXT;
ALTER TABLE runners ADD COLUMN refusal_ts REAL
"""

_V3_POSTGRES = """
CREATE TABLE violations (
    seq BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    runner_id TEXT COLLATE "C",
    job_id TEXT COLLATE "C",
    attempt BIGINT,
    source TEXT NOT NULL,
    contract TEXT COLLATE "C" NOT NULL,
    path TEXT NOT NULL,
    message TEXT NOT NULL,
    at TEXT COLLATE "C" NOT NULL,
    ts DOUBLE PRECISION NOT NULL
);
CREATE INDEX violations_runner ON violations (runner_id, seq);
CREATE INDEX violations_job ON violations (job_id) WHERE job_id IS NOT NULL;
ALTER TABLE runners ADD COLUMN violations BIGINT NOT NULL DEFAULT 0;
ALTER TABLE runners ADD COLUMN refusal TEXT;
ALTER TABLE runners ADD COLUMN refusal_ts DOUBLE PRECISION
"""

#: The schema's history, oldest first; ``MIGRATIONS[i].version == i + 1``. A new step is
#: appended here, never edited in place: databases out there have run the old ones.
MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "runners, jobs, events, assertions, deliveries, meta", _V1_SQLITE, _V1_POSTGRES),
    Migration(
        2,
        "runners.token_hash: the SHA-256 of each runner's own runnerToken",
        "ALTER TABLE runners ADD COLUMN token_hash TEXT",
        'ALTER TABLE runners ADD COLUMN token_hash TEXT COLLATE "C"',
    ),
    Migration(
        3,
        "violations (what runners sent that broke a contract), runners.violations and the "
        "last refused heartbeat (runners.refusal, refusal_ts)",
        _V3_SQLITE,
        _V3_POSTGRES,
    ),
)

#: The schema version this forge writes and reads.
SCHEMA_VERSION = MIGRATIONS[-1].version


class SchemaTooNew(ConfigError):
    """The database was written by a newer forge: this one refuses to touch it."""


def statements(script: str) -> list[str]:
    """The statements of a migration script (none of them holds a ``;`` of its own)."""
    return [part.strip() for part in script.split(";") if part.strip()]


def _stored_version(conn: Conn) -> int | None:
    """``schema_version`` from ``meta``; None when the table or the key is missing."""
    try:
        with conn.savepoint():
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    except DatabaseError:
        return None
    return None if row is None else int(loads(row[0]))


def _legacy_sqlite_version(conn: Conn) -> int:
    """The version of a SQLite file made before ``schema_version`` was kept (0: empty)."""
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if "jobs" not in tables:
        return 0
    # Those files were made (and kept up) by idempotent scripts: step 1 again completes
    # whatever indexes an older release had not made yet.
    for statement in statements(_V1_SQLITE):
        conn.execute(statement)
    columns = {r[1] for r in conn.execute("PRAGMA table_info(runners)")}
    return 2 if "token_hash" in columns else 1


def migrate(conn: Conn, where: str) -> tuple[int, int]:
    """Bring the schema up to :data:`SCHEMA_VERSION` inside the caller's write transaction.

    Returns (version found, version now). A database newer than this forge is refused with
    :class:`SchemaTooNew` and left as it is.
    """
    found = _stored_version(conn)
    if found is None:
        found = 0 if conn.postgres else _legacy_sqlite_version(conn)
    if found > SCHEMA_VERSION:
        raise SchemaTooNew(
            f"the forge database {where} has schema version {found}, newer than this forge "
            f"understands (version {SCHEMA_VERSION}): it was upgraded by a newer runnerkit. "
            "Run that release (or newer), or point the forge at another database; this one "
            "is left untouched."
        )
    for migration in MIGRATIONS[found:]:
        for statement in statements(migration.postgres if conn.postgres else migration.sqlite):
            conn.execute(statement)
    if found != SCHEMA_VERSION or _stored_version(conn) is None:
        set_meta(conn, "schema_version", SCHEMA_VERSION)
    return found, SCHEMA_VERSION


#: Job columns a transition may set (``update_job`` refuses anything else).
JOB_COLUMNS = frozenset(
    {
        "status",
        "updated_at",
        "not_before",
        "attempts",
        "runner_id",
        "runner_name",
        "runner_version",
        "capability_id",
        "first_started_at",
        "attempt_started_at",
        "slot_runner",
        "slot_capability",
        "lease_until",
        "async",
        "result",
        "error",
        "last_error",
    }
)


def time_ordered_id() -> str:
    """A version 7 uuid (RFC 9562: Unix milliseconds, then random bits), as a string.

    The forge names its own events and assertions with these: consecutive ids sort together,
    so their unique indexes grow at one end instead of touching a random page per row.
    """
    value = (time.time_ns() // 1_000_000) << 80 | int.from_bytes(os.urandom(10))
    value = value & ~(0xF << 76) & ~(0x3 << 62) | (0x7 << 76) | (0x2 << 62)
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


_encode = json.JSONEncoder(sort_keys=True, separators=(",", ":"), allow_nan=False).encode


def dumps(value: Any) -> str:
    """Canonical JSON: sorted keys, no spaces, integral floats written as ints."""
    return _encode(_canonical(value))


def loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


_PLAIN = (str, int, bool, type(None))


def _settled(value: Any) -> bool:
    """Whether ``value`` already encodes canonically: str keys, no integral floats, plain
    dicts and lists all the way down (then it is encoded as it is, without a copy)."""
    kind = type(value)
    if kind in _PLAIN:
        return True
    if kind is dict:
        for key, item in value.items():
            if type(key) is not str or (type(item) not in _PLAIN and not _settled(item)):
                return False
        return True
    if kind is list:
        return all(type(item) in _PLAIN or _settled(item) for item in value)
    if kind is float:
        return not value.is_integer()
    return False


def _canonical(value: Any) -> Any:
    kind = type(value)
    if kind in _PLAIN:
        return value
    if kind is dict or kind is list:
        # The common case, a document that needs no change, is returned as it is (no copy).
        if _settled(value):
            return value
        if kind is list:
            return [_canonical(v) for v in value]
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, float):
        return int(value) if value.is_integer() else value
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    return value


class ForgeDB:
    """The forge's SQLite file: schema on first use, pooled connections, transactions.

    :class:`~runnerkit.forge.postgres.PostgresDB` is the same interface on PostgreSQL;
    :func:`open_database` picks one from the settings.
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
    def tx(self) -> Iterator[SqliteConn]:
        """A write transaction (``BEGIN IMMEDIATE``), committed on success.

        Writers take turns first (:class:`~runnerkit.state.WriterTurns`, every process of
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


class Database(Protocol):
    """The store's interface: :class:`ForgeDB` (SQLite) or ``postgres.PostgresDB``."""

    postgres: bool

    def describe(self) -> str: ...

    def connection(self) -> contextlib.AbstractContextManager[Conn]: ...

    def tx(self) -> contextlib.AbstractContextManager[Conn]: ...

    def snapshot(self) -> contextlib.AbstractContextManager[Conn]: ...

    def ping(self) -> None: ...

    def close(self) -> None: ...


def open_database(settings: Any) -> Database:
    """The forge's store: PostgreSQL when ``DB_URL`` names it, else the SQLite ``DB_PATH``."""
    url = str(settings.db_url).strip()
    if url:
        from .postgres import PostgresDB

        return PostgresDB(url, pool_size=int(settings.db_pool_size))
    return ForgeDB(str(settings.db_path))


# --------------------------------------------------------------------------- meta


def set_meta(conn: Conn, key: str, value: Any) -> None:
    conn.execute(
        "INSERT INTO meta (key, value) VALUES (?, ?) "
        "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        (key, dumps(value)),
    )


def get_meta(conn: Conn, key: str) -> Any:
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return None if row is None else loads(row["value"])


# --------------------------------------------------------------------------- runners


def insert_runner(conn: Conn, values: Mapping[str, Any]) -> None:
    conn.execute(
        "INSERT INTO runners (id, name, version, document, health_url, base_url, registered_at,"
        " last_heartbeat_at, last_seen, status, heartbeat_interval_ms, reported_active,"
        " token_hash)"
        " VALUES (:id, :name, :version, :document, :health_url, :base_url, :registered_at,"
        " :last_heartbeat_at, :last_seen, :status, :heartbeat_interval_ms, 0, :token_hash)",
        {"token_hash": None, **values},
    )


def get_runner(conn: Conn, runner_id: str) -> Row | None:
    row: Row | None = conn.execute("SELECT * FROM runners WHERE id = ?", (runner_id,)).fetchone()
    return row


def list_runners(
    conn: Conn, *, status: str | None = None, limit: int = 100, offset: int = 0
) -> tuple[list[Row], int]:
    where, args = ("WHERE status = ?", [status]) if status else ("", [])
    total = conn.execute(f"SELECT COUNT(*) FROM runners {where}", args).fetchone()[0]
    rows = conn.execute(
        f"SELECT * FROM runners {where} ORDER BY rowid LIMIT ? OFFSET ?",
        [*args, limit, offset],
    ).fetchall()
    return rows, int(total)


def runner_ids_with_health_url(conn: Conn, health_url: str) -> list[str]:
    rows = conn.execute("SELECT id FROM runners WHERE health_url = ?", (health_url,)).fetchall()
    return [r["id"] for r in rows]


def delete_runner(conn: Conn, runner_id: str) -> bool:
    return conn.execute("DELETE FROM runners WHERE id = ?", (runner_id,)).rowcount > 0


def record_heartbeat(
    conn: Conn,
    runner_id: str,
    *,
    status: str,
    last_heartbeat_at: str,
    last_seen: float,
    reported_active: int,
) -> bool:
    cursor = conn.execute(
        "UPDATE runners SET status = ?, last_heartbeat_at = ?, last_seen = ?, reported_active = ?"
        " WHERE id = ?",
        (status, last_heartbeat_at, last_seen, reported_active, runner_id),
    )
    return cursor.rowcount > 0


def runner_by_token_hash(conn: Conn, token_hash: str) -> Row | None:
    """The runner whose runnerToken has this SHA-256 (hex), if any."""
    row: Row | None = conn.execute(
        "SELECT id, token_hash FROM runners WHERE token_hash = ?", (token_hash,)
    ).fetchone()
    return row


def disable_runner_dispatch(conn: Conn, runner_id: str) -> None:
    """No more work for a runner (until it registers again): it loses its dispatch URL."""
    conn.execute("UPDATE runners SET base_url = '' WHERE id = ?", (runner_id,))


def mark_runner_unreachable(conn: Conn, runner_id: str) -> None:
    """Take a runner out of dispatch until its next heartbeat reports its status again."""
    conn.execute(
        "UPDATE runners SET status = 'unhealthy'"
        " WHERE id = ? AND status IN ('healthy', 'degraded')",
        (runner_id,),
    )


def watched_runners(conn: Conn) -> list[Row]:
    """Runners not offline: id, last_seen and heartbeat_interval_ms, for the sweep."""
    return conn.execute(
        "SELECT id, last_seen, heartbeat_interval_ms FROM runners WHERE status != 'offline'"
    ).fetchall()


def mark_runners_offline(conn: Conn, runner_ids: Sequence[str]) -> None:
    """These runners are offline (inside the sweep's transaction)."""
    conn.executemany(
        "UPDATE runners SET status = 'offline' WHERE id = ? AND status != 'offline'",
        [(runner_id,) for runner_id in runner_ids],
    )


def dispatchable_runners(conn: Conn) -> list[Row]:
    """Runners the dispatcher may send work to: healthy or degraded, with an HTTP base URL."""
    return conn.execute(
        "SELECT * FROM runners WHERE status IN ('healthy', 'degraded') AND base_url != ''"
        " ORDER BY rowid"
    ).fetchall()


def slot_counts(conn: Conn) -> dict[tuple[str, str], int]:
    """Held runner slots, by (runner id, capability id)."""
    rows = conn.execute(
        "SELECT slot_runner, slot_capability, COUNT(*) AS n FROM jobs"
        " WHERE slot_runner IS NOT NULL GROUP BY slot_runner, slot_capability"
    ).fetchall()
    return {(r["slot_runner"], r["slot_capability"]): int(r["n"]) for r in rows}


def move_slots(conn: Conn, old_runner: str, new_runner: str) -> None:
    """A runner re-registered under a new id: its held slots (and running jobs) follow it."""
    conn.execute("UPDATE jobs SET slot_runner = ? WHERE slot_runner = ?", (new_runner, old_runner))
    conn.execute(
        "UPDATE jobs SET runner_id = ? WHERE runner_id = ? AND status = 'running'",
        (new_runner, old_runner),
    )


# --------------------------------------------------------------------------- jobs


def insert_job(conn: Conn, values: Mapping[str, Any]) -> bool:
    """Insert a job; False (and nothing written) when a job with its id exists."""
    cursor = conn.execute(
        "INSERT INTO jobs (id, type, priority, status, request, submitted, updated_at,"
        " not_before, expires, timeout_ms)"
        " VALUES (:id, :type, :priority, :status, :request, :submitted, :updated_at,"
        " :not_before, :expires, :timeout_ms) ON CONFLICT (id) DO NOTHING",
        values,
    )
    return cursor.rowcount > 0


#: The finished jobs a prune deletes, oldest first: along the ``jobs_finished`` partial index
#: (its condition repeated word for word, and named: left to itself the planner may walk
#: ``jobs_slot`` for ``slot_runner IS NULL``, nearly every job, and sort them all).
PRUNE_QUERY = (
    "SELECT seq, id FROM jobs INDEXED BY jobs_finished"
    " WHERE status IN ('completed', 'failed', 'cancelled')"
    " AND updated_at < ? AND slot_runner IS NULL ORDER BY updated_at LIMIT ?"
)


def prune_finished_jobs(conn: Conn, *, before: str, limit: int) -> int:
    """Delete up to ``limit`` finished jobs last updated before ``before`` (a Z timestamp),
    oldest first, with their events and delivery records; how many were deleted.

    A cancelled job whose runner has not answered yet still holds its slot
    (``slot_runner``): it stays until the answer frees it.
    """
    rows = conn.execute(PRUNE_QUERY, (before, limit)).fetchall()
    ids = [(row["id"],) for row in rows]
    conn.executemany("DELETE FROM events WHERE job_id = ?", ids)
    conn.executemany("DELETE FROM deliveries WHERE job_id = ?", ids)
    conn.executemany("DELETE FROM jobs WHERE seq = ?", [(row["seq"],) for row in rows])
    return len(rows)


def queued_types(conn: Conn) -> list[str]:
    """The job types of queued jobs (one walk of ``jobs_wait``'s ``queued`` range)."""
    return [r[0] for r in conn.execute("SELECT DISTINCT type FROM jobs WHERE status = 'queued'")]


def taken_types(conn: Conn) -> set[str]:
    """Every job type some registered runner that is not offline lists."""
    types: set[str] = set()
    for row in conn.execute("SELECT document FROM runners WHERE status != 'offline'"):
        for capability in loads(row[0]).get("capabilities", []):
            types.update(capability.get("supportedJobTypes", []))
    return types


def queued_since(conn: Conn, job_type: str, *, before: float, limit: int) -> list[Row]:
    """Jobs of ``job_type`` queued (never sent) since before ``before`` (epoch seconds)."""
    return conn.execute(
        "SELECT * FROM jobs WHERE status = 'queued' AND type = ? AND submitted <= ?"
        " ORDER BY seq LIMIT ?",
        (job_type, before, limit),
    ).fetchall()


def get_job(conn: Conn, job_id: str) -> Row | None:
    row: Row | None = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
    return row


def list_jobs(
    conn: Conn,
    *,
    statuses: Sequence[str] = (),
    job_type: str | None = None,
    limit: int = 50,
    offset: int = 0,
) -> tuple[list[Row], int]:
    clauses: list[str] = []
    args: list[Any] = []
    if statuses:
        clauses.append(f"status IN ({', '.join('?' * len(statuses))})")
        args.extend(statuses)
    if job_type is not None:
        clauses.append("type = ?")
        args.append(job_type)
    where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
    total = conn.execute(f"SELECT COUNT(*) FROM jobs {where}", args).fetchone()[0]
    rows = conn.execute(
        f"SELECT * FROM jobs {where} ORDER BY seq DESC LIMIT ? OFFSET ?", [*args, limit, offset]
    ).fetchall()
    return rows, int(total)


def eligible_jobs(
    conn: Conn, *, now: float, limit: int, types: Sequence[str] | None = None
) -> list[Row]:
    """Jobs waiting for a runner, in dispatch order: priority desc, then age.

    ``types`` limits the answer to job types some runner can take right now. With types,
    each (status, type) is one ordered walk of the ``jobs_wait`` index that stops after
    ``limit`` rows, however long the history of the type.
    """
    if types is None:
        sql = (
            "SELECT * FROM jobs WHERE status IN ('queued', 'retrying')"
            " AND (not_before IS NULL OR not_before <= ?) AND (expires IS NULL OR expires > ?)"
            " ORDER BY priority DESC, seq ASC LIMIT ?"
        )
        return conn.execute(sql, (now, now, limit)).fetchall()
    # In a write transaction on PostgreSQL the rows are claimed as they are read: another
    # forge instance's claim skips them instead of waiting (or taking them twice).
    waiting = _WAITING_FOR_CLAIM if conn.postgres and conn.writing else _WAITING
    rows: list[Row] = []
    for job_type in types:
        for status in ("queued", "retrying"):
            rows.extend(conn.execute(waiting, (status, job_type, now, now, limit)))
    rows.sort(key=_dispatch_order)
    return rows[:limit]


_WAITING = (
    "SELECT * FROM jobs WHERE status = ? AND type = ?"
    " AND (not_before IS NULL OR not_before <= ?) AND (expires IS NULL OR expires > ?)"
    " ORDER BY priority DESC, seq ASC LIMIT ?"
)
_WAITING_FOR_CLAIM = _WAITING + " FOR UPDATE SKIP LOCKED"


def _dispatch_order(row: Row) -> tuple[int, int]:
    return -int(row["priority"]), int(row["seq"])


def expired_jobs(conn: Conn, *, now: float) -> list[Row]:
    """Waiting jobs whose ``expiresAt`` has passed."""
    return conn.execute(
        "SELECT * FROM jobs WHERE status IN ('pending', 'queued', 'retrying')"
        " AND expires IS NOT NULL AND expires <= ?",
        (now,),
    ).fetchall()


def shift_waits(conn: Conn, step_s: float) -> None:
    """Move the forge's own wall-clock marks by ``step_s`` (the clock stepped): queued jobs'
    submission times, retries' due times and attempts' leases."""
    conn.execute("UPDATE jobs SET submitted = submitted + ? WHERE status = 'queued'", (step_s,))
    conn.execute(
        "UPDATE jobs SET not_before = not_before + ? WHERE status = 'retrying'"
        " AND not_before IS NOT NULL",
        (step_s,),
    )
    conn.execute(
        "UPDATE jobs SET lease_until = lease_until + ? WHERE seq IN"
        " (SELECT seq FROM jobs WHERE slot_runner IS NOT NULL) AND lease_until IS NOT NULL",
        (step_s,),
    )


def retries_due_after(conn: Conn, when: float) -> list[Row]:
    """Jobs waiting to be retried that are not due before ``when``."""
    return conn.execute(
        "SELECT * FROM jobs WHERE status = 'retrying' AND not_before > ?", (when,)
    ).fetchall()


def jobs_holding_slots(conn: Conn) -> list[Row]:
    """Running jobs and jobs that still hold a runner slot, with their runner's status.

    ``runner_status`` is NULL when the runner is no longer registered.
    """
    # Two index searches, not a scan of every job ever submitted (this runs every sweep).
    return conn.execute(
        "SELECT jobs.*, runners.status AS runner_status FROM jobs"
        " LEFT JOIN runners ON runners.id = COALESCE(jobs.slot_runner, jobs.runner_id)"
        " WHERE jobs.seq IN (SELECT seq FROM jobs WHERE status = 'running'"
        " UNION SELECT seq FROM jobs WHERE slot_runner IS NOT NULL)"
    ).fetchall()


def update_job(
    conn: Conn,
    job_id: str,
    values: Mapping[str, Any],
    *,
    statuses: Iterable[str] | None = None,
    attempts: int | None = None,
) -> bool:
    """Set ``values`` on a job, only while it is in one of ``statuses`` / at ``attempts``."""
    unknown = set(values) - JOB_COLUMNS
    if unknown:
        raise ValueError(f"not job columns: {sorted(unknown)}")
    assignments = ", ".join(f'"{k}" = ?' for k in values)
    sql = f"UPDATE jobs SET {assignments} WHERE id = ?"
    args: list[Any] = [*values.values(), job_id]
    if statuses is not None:
        wanted = list(statuses)
        sql += f" AND status IN ({', '.join('?' * len(wanted))})"
        args.extend(wanted)
    if attempts is not None:
        sql += " AND attempts = ?"
        args.append(attempts)
    return conn.execute(sql, args).rowcount > 0


def count_jobs_by_status(conn: Conn) -> dict[str, int]:
    rows = conn.execute("SELECT status, COUNT(*) AS n FROM jobs GROUP BY status").fetchall()
    return {r["status"]: int(r["n"]) for r in rows}


def record_delivery(conn: Conn, job_id: str, digest: str, received: float) -> bool:
    """Remember one delivered result; False when this exact delivery was seen before."""
    cursor = conn.execute(
        "INSERT OR IGNORE INTO deliveries (job_id, digest, received) VALUES (?, ?, ?)",
        (job_id, digest, received),
    )
    return cursor.rowcount > 0


# --------------------------------------------------------------------------- events


_INSERT_EVENT = "INSERT OR IGNORE INTO events (id, job_id, type, document) VALUES (?, ?, ?, ?)"


def queue_event(conn: Conn, event_id: str, job_id: str, type_: str, document: str) -> None:
    """Write a JobEvent (its ``dumps`` document) when the transaction commits."""
    conn.queued_events.append((event_id, job_id, type_, document))


def insert_event(conn: Conn, event: Mapping[str, Any]) -> bool:
    """Store a JobEvent document; False when an event with its id is already stored."""
    cursor = conn.execute(_INSERT_EVENT, (event["id"], event["jobId"], event["type"], dumps(event)))
    return cursor.rowcount > 0


def list_events(conn: Conn, job_id: str, *, limit: int, offset: int) -> tuple[list[Row], int]:
    total = conn.execute("SELECT COUNT(*) FROM events WHERE job_id = ?", (job_id,)).fetchone()[0]
    # Oldest first by when each happened (its own timestamp), not by when it arrived: a
    # runner's progress comes through its outbox and may land after the job's end.
    rows = conn.execute(
        f"SELECT * FROM events WHERE job_id = ? ORDER BY {_event_time(conn)}, seq LIMIT ? OFFSET ?",
        (job_id, limit, offset),
    ).fetchall()
    return rows, int(total)


def _event_time(conn: Conn) -> str:
    """An event's own timestamp as a value that orders by time, in the store's dialect."""
    if conn.postgres:
        return "CAST(document::jsonb ->> 'timestamp' AS timestamptz)"
    return "julianday(json_extract(document, '$.timestamp'))"


def attempt_at(conn: Conn, job_id: str, timestamp: str) -> int | None:
    """The attempt of ``job_id`` that was running at ``timestamp``: the last one whose
    ``job.started`` event is not later (None when none is, a runner's clock being behind)."""
    if conn.postgres:
        attempt, at = (
            "CAST(document::jsonb #>> '{data,attempt}' AS integer)",
            "CAST(? AS timestamptz)",
        )
    else:
        attempt, at = "json_extract(document, '$.data.attempt')", "julianday(?)"
    row = conn.execute(
        f"SELECT MAX({attempt}) FROM events WHERE job_id = ? AND type = 'job.started'"
        f" AND {_event_time(conn)} <= {at}",
        (job_id, timestamp),
    ).fetchone()
    return None if row is None or row[0] is None else int(row[0])


def runner_was_sent(conn: Conn, job_id: str, runner_id: str) -> bool:
    """Whether an attempt of the job was ever sent to ``runner_id`` (its job.started events)."""
    runner = (
        "document::jsonb #>> '{data,runnerId}'"
        if conn.postgres
        else "json_extract(document, '$.data.runnerId')"
    )
    row = conn.execute(
        f"SELECT 1 FROM events WHERE job_id = ? AND type = 'job.started' AND {runner} = ? LIMIT 1",
        (job_id, runner_id),
    ).fetchone()
    return row is not None


# --------------------------------------------------------------------------- assertions


_INSERT_ASSERTION = (
    "INSERT INTO assertions (id, subject, predicate, object, confidence, source, ts,"
    " expires, document) VALUES (:id, :subject, :predicate, :object, :confidence, :source,"
    " :ts, :expires, :document)"
)


def insert_assertion(conn: Conn, values: Mapping[str, Any]) -> None:
    conn.execute(_INSERT_ASSERTION, dict(values))


def queue_assertion(conn: Conn, values: dict[str, Any]) -> None:
    """Write an assertion row when the transaction commits (see :class:`Conn`)."""
    conn.queued_assertions.append(values)


def get_assertion(conn: Conn, assertion_id: str) -> Row | None:
    row: Row | None = conn.execute(
        "SELECT * FROM assertions WHERE id = ?", (assertion_id,)
    ).fetchone()
    return row


def prune_assertions(conn: Conn, *, before: float | None, now: float, limit: int) -> int:
    """Delete up to ``limit`` assertions timestamped before ``before`` (None: none by age) or
    whose ``expiresAt`` has passed; how many were deleted. Both along their own index."""
    deleted = conn.execute(
        "DELETE FROM assertions WHERE seq IN (SELECT seq FROM assertions"
        " INDEXED BY assertions_expires WHERE expires IS NOT NULL AND expires <= ? LIMIT ?)",
        (now, limit),
    ).rowcount
    if before is not None and deleted < limit:
        deleted += conn.execute(
            "DELETE FROM assertions WHERE seq IN (SELECT seq FROM assertions"
            " INDEXED BY assertions_ts WHERE ts < ? LIMIT ?)",
            (before, limit - deleted),
        ).rowcount
    return int(deleted)


def query_assertions(
    conn: Conn,
    *,
    now: float,
    subject: str | None = None,
    predicate: str | None = None,
    object_json: str | None = None,
    min_confidence: float = 0.0,
    sources: Sequence[str] | None = None,
    before: float | None = None,
    after: float | None = None,
    limit: int = 100,
    offset: int = 0,
) -> tuple[list[Row], int]:
    """Unexpired assertions matching the pattern and filters, newest first."""
    clauses = ["(expires IS NULL OR expires > ?)", "confidence >= ?"]
    args: list[Any] = [now, min_confidence]
    for column, value in (("subject", subject), ("predicate", predicate), ("object", object_json)):
        if value is not None:
            clauses.append(f"{column} = ?")
            args.append(value)
    if sources:
        clauses.append(f"source IN ({', '.join('?' * len(sources))})")
        args.extend(sources)
    if before is not None:
        clauses.append("ts < ?")
        args.append(before)
    if after is not None:
        clauses.append("ts > ?")
        args.append(after)
    where = " AND ".join(clauses)
    total = conn.execute(f"SELECT COUNT(*) FROM assertions WHERE {where}", args).fetchone()[0]
    rows = conn.execute(
        f"SELECT document FROM assertions WHERE {where} ORDER BY ts DESC, seq DESC"
        " LIMIT ? OFFSET ?",
        [*args, limit, offset],
    ).fetchall()
    return rows, int(total)
