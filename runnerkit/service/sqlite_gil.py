"""SQLite statements that keep the GIL (:class:`GILStatements`), for a job path's few short
ones.

Python's ``sqlite3`` releases the GIL around every step. Under load another thread takes it
meanwhile and the stepping thread must wait for it again: two context switches or more per
statement, which cost more than the statement itself. The ledger makes two such statements
per job (its claim's read and its answer's write), and under gunicorn at 16 connections they
cost about 180 µs of CPU a job where the statements take about 20. Lock calls that never
wait keep the GIL for the same reason (:mod:`runnerkit.service.filelocks`).

So a store may run its hot statements on a second connection to its file, opened on the
very ``libsqlite3`` the ``sqlite3`` module uses, through ``ctypes.PyDLL`` (whose calls keep
the GIL), and made so that none of its statements ever waits:

- no busy handler: a statement that meets a lock gets ``SQLITE_BUSY`` at once, and
  :class:`Busy` tells the caller to take its ordinary way (``sqlite3``, GIL released while
  it waits);
- no automatic checkpoint: a checkpoint copies and syncs files, which must not hold the GIL;
  the store checkpoints through its ordinary connection (:attr:`GILStatements.written`
  counts the writes made here);
- ``synchronous=NORMAL`` in WAL mode: a commit appends to the WAL, it never syncs.

Only where it is safe: the ``sqlite3`` module linked against a shared ``libsqlite3`` (as on
Debian, the official Python images and most distributions; a second, statically linked
copy of SQLite in one process would break SQLite's POSIX locks), WAL mode, and Linux'
``/proc/self/maps`` to find that library. Elsewhere :func:`open_gil_statements` returns
None and the store does everything the ordinary way.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sqlite3
import threading
from collections.abc import Sequence
from typing import Any

from runnerkit.service.afterfork import renew_after_fork
from runnerkit.service.process import keep_pid_current

#: This process's id, kept current in forked children (a module global: read per call).
_PID = keep_pid_current(globals())

_OK, _ROW, _DONE = 0, 100, 101
_BUSY, _LOCKED = 5, 6
_OPEN_READWRITE = 0x2
_INTEGER, _FLOAT, _TEXT, _BLOB, _NULL = 1, 2, 3, 4, 5
#: SQLITE_TRANSIENT: SQLite copies a bound value before the call returns.
_TRANSIENT = ctypes.c_void_p(-1)

#: Primary result codes as the ``sqlite3`` module raises them.
_ERRORS: dict[int, type[sqlite3.Error]] = {
    11: sqlite3.DatabaseError,  # CORRUPT
    19: sqlite3.IntegrityError,  # CONSTRAINT
    26: sqlite3.DatabaseError,  # NOTADB
    25: sqlite3.ProgrammingError,  # RANGE
    20: sqlite3.InterfaceError,  # MISMATCH
    21: sqlite3.InterfaceError,  # MISUSE
}

#: Connections a forked child inherited: never closed there (see
#: :mod:`runnerkit.runner.sqlitefile`).
_INHERITED: list[int] = []


class Busy(Exception):
    """The statement would have had to wait (or could not be prepared yet): run it the
    ordinary way."""


def _loaded_library() -> str | None:
    """The path of the ``libsqlite3`` shared object the ``sqlite3`` module runs on, if any."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and "/libsqlite3.so" in fields[5]:
                    return fields[5].strip()
    except OSError:
        return None
    return None


def _library() -> Any:
    """``libsqlite3`` through ``ctypes.PyDLL`` with the calls used here typed, or None where
    this module must not be used (see the module's docstring)."""
    path = _loaded_library()
    if path is None or path.endswith("(deleted)"):
        return None
    try:
        lib = ctypes.PyDLL(path)
        lib.sqlite3_libversion.restype = ctypes.c_char_p
        if lib.sqlite3_libversion().decode() != sqlite3.sqlite_version:
            return None  # not the copy the sqlite3 module runs on
        if not lib.sqlite3_threadsafe():
            return None
    except (OSError, AttributeError):
        return None
    p, i, i64, d = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_double
    signatures: dict[str, tuple[list[Any], Any]] = {
        "sqlite3_open_v2": ([ctypes.c_char_p, ctypes.POINTER(p), i, ctypes.c_char_p], i),
        "sqlite3_close_v2": ([p], i),
        "sqlite3_exec": ([p, ctypes.c_char_p, p, p, p], i),
        "sqlite3_prepare_v2": ([p, ctypes.c_char_p, i, ctypes.POINTER(p), p], i),
        "sqlite3_finalize": ([p], i),
        "sqlite3_bind_int64": ([p, i, i64], i),
        "sqlite3_bind_double": ([p, i, d], i),
        "sqlite3_bind_text": ([p, i, ctypes.c_char_p, i, p], i),
        "sqlite3_bind_blob": ([p, i, ctypes.c_char_p, i, p], i),
        "sqlite3_bind_null": ([p, i], i),
        "sqlite3_step": ([p], i),
        "sqlite3_reset": ([p], i),
        "sqlite3_clear_bindings": ([p], i),
        "sqlite3_changes": ([p], i),
        "sqlite3_column_count": ([p], i),
        "sqlite3_column_type": ([p, i], i),
        "sqlite3_column_int64": ([p, i], i64),
        "sqlite3_column_double": ([p, i], d),
        "sqlite3_column_blob": ([p, i], p),
        "sqlite3_column_bytes": ([p, i], i),
        "sqlite3_errmsg": ([p], ctypes.c_char_p),
        "sqlite3_extended_errcode": ([p], i),
    }
    for name, (argtypes, restype) in signatures.items():
        function = getattr(lib, name)
        function.argtypes, function.restype = argtypes, restype
    return lib


_LIB = _library()


class GILStatements:
    """A second connection to one SQLite file (WAL mode) for a few prepared statements whose
    calls keep the GIL and never wait; made anew in a forked child.

    :meth:`run` raises :class:`Busy` when a statement would have to wait (another writer, a
    WAL recovery in progress) and the ``sqlite3`` module's exceptions for errors (a full
    disk is ``sqlite3.OperationalError``, as through ``sqlite3``). A write must be made in
    the file's writers' turn (:class:`~runnerkit.service.sqlite.WriterTurns`), as any
    other: that turn is what keeps it from waiting.
    """

    def __init__(self, path: str, lib: Any) -> None:
        self.path = path
        self._lib = lib
        #: Writes made here since the owner last checkpointed (it resets this).
        self.written = 0
        self.renew_after_fork()
        renew_after_fork(self)

    def renew_after_fork(self) -> None:
        """The child opens its own connection; a parent's is kept, never closed there."""
        self._guard = threading.Lock()
        db = getattr(self, "_db", None)
        if db:
            _INHERITED.append(db)
        self._db: int | None = None
        self._pid = 0
        self._idle: dict[str, list[int]] = {}

    def _connect(self) -> int:
        db = self._db
        if db is not None and self._pid == _PID:
            return db
        with self._guard:  # once per process
            if self._db is not None and self._pid != _PID:
                _INHERITED.append(self._db)  # a parent's (see renew_after_fork)
                self._db = None
            if self._db is None:
                self._db, self._idle = self._open(), {}
                self._pid = _PID
            return self._db

    def _open(self) -> int:
        lib, handle = self._lib, ctypes.c_void_p()
        path = os.fsencode(self.path)
        rc = lib.sqlite3_open_v2(path, ctypes.byref(handle), _OPEN_READWRITE, None)
        if rc != _OK:
            lib.sqlite3_close_v2(handle)
            raise Busy(f"{self.path}: cannot open ({rc})")
        setup = b"PRAGMA synchronous=NORMAL; PRAGMA wal_autocheckpoint=0"
        if lib.sqlite3_exec(handle, setup, None, None, None) != _OK:
            lib.sqlite3_close_v2(handle)
            raise Busy(f"{self.path}: cannot set up")
        return int(handle.value or 0)

    def query_one(self, sql: str, parameters: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        """The first row of one read (None: no row)."""
        row, _ = self._step(sql, parameters)
        return row

    def execute(self, sql: str, parameters: Sequence[Any] = ()) -> int:
        """Run one write, autocommitted; how many rows it changed."""
        _, changes = self._step(sql, parameters)
        self.written += 1
        return changes

    def transaction(self, statements: Sequence[tuple[str, Sequence[Any]]]) -> None:
        """Run writes in one transaction (``BEGIN IMMEDIATE`` ... ``COMMIT``), or none of
        them: any failure rolls back and is raised (:class:`Busy` included).

        Only on a connection of its own, used by one thread at a time: a transaction spans
        the connection, so a statement another thread ran on it meanwhile would join it.
        """
        self._step("BEGIN IMMEDIATE", ())
        try:
            for sql, parameters in statements:
                self._step(sql, parameters)
            self._step("COMMIT", ())
        except BaseException:
            with contextlib.suppress(Exception):
                self._step("ROLLBACK", ())
            raise
        self.written += len(statements)

    def _step(self, sql: str, parameters: Sequence[Any]) -> tuple[tuple[Any, ...] | None, int]:
        """Bind, step and reset one prepared statement of this thread's own.

        No lock: a thread takes an idle statement of the text from a list (``pop`` and
        ``append`` are atomic) or prepares one, so threads never share a statement; the
        connection itself is SQLite's to serialise, inside calls that never wait.
        """
        lib = self._lib
        db = self._connect()
        idle = self._idle.setdefault(sql, [])
        try:
            statement = idle.pop()
        except IndexError:
            statement = self._prepare(db, sql)
        try:
            for index, value in enumerate(parameters, 1):
                self._bind(statement, index, value)
            rc = lib.sqlite3_step(statement)
            if rc == _ROW:
                return self._row(statement), 0
            if rc == _DONE:
                return None, lib.sqlite3_changes(db)
            raise self._error(db, rc)
        finally:
            lib.sqlite3_reset(statement)
            lib.sqlite3_clear_bindings(statement)
            if self._db == db and self._pid == _PID:
                idle.append(statement)

    def _prepare(self, db: int, sql: str) -> int:
        handle = ctypes.c_void_p()
        if self._lib.sqlite3_prepare_v2(db, sql.encode(), -1, ctypes.byref(handle), None):
            # The schema is being changed, or the file is locked for a recovery.
            raise Busy(self._lib.sqlite3_errmsg(db).decode(errors="replace"))
        return int(handle.value or 0)

    def _bind(self, statement: int, index: int, value: Any) -> None:
        lib = self._lib
        if value is None:
            rc = lib.sqlite3_bind_null(statement, index)
        elif isinstance(value, (bool, int)):
            rc = lib.sqlite3_bind_int64(statement, index, value)
        elif isinstance(value, float):
            rc = lib.sqlite3_bind_double(statement, index, value)
        elif isinstance(value, str):
            data = value.encode()
            rc = lib.sqlite3_bind_text(statement, index, data, len(data), _TRANSIENT)
        elif isinstance(value, (bytes, bytearray, memoryview)):
            data = bytes(value)
            rc = lib.sqlite3_bind_blob(statement, index, data, len(data), _TRANSIENT)
        else:
            raise sqlite3.ProgrammingError(f"type {type(value).__name__} is not supported")
        if rc != _OK:
            raise sqlite3.ProgrammingError(f"cannot bind parameter {index} ({rc})")

    def _row(self, statement: int) -> tuple[Any, ...]:
        lib = self._lib
        values: list[Any] = []
        for column in range(lib.sqlite3_column_count(statement)):
            kind = lib.sqlite3_column_type(statement, column)
            if kind == _INTEGER:
                values.append(lib.sqlite3_column_int64(statement, column))
            elif kind == _FLOAT:
                values.append(lib.sqlite3_column_double(statement, column))
            elif kind == _NULL:
                values.append(None)
            else:
                pointer = lib.sqlite3_column_blob(statement, column)
                size = lib.sqlite3_column_bytes(statement, column)
                data = ctypes.string_at(pointer, size) if size else b""
                values.append(data.decode() if kind == _TEXT else data)
        return tuple(values)

    def _error(self, db: int, rc: int) -> Exception:
        message = self._lib.sqlite3_errmsg(db).decode(errors="replace")
        primary = rc & 0xFF
        if primary in (_BUSY, _LOCKED):
            return Busy(message)
        error = _ERRORS.get(primary, sqlite3.OperationalError)(message)
        error.sqlite_errorcode = self._lib.sqlite3_extended_errcode(db)
        return error


def open_gil_statements(path: str) -> GILStatements | None:
    """A :class:`GILStatements` for ``path``, or None where it cannot be used safely (see the
    module's docstring); the connection itself opens on first use."""
    if _LIB is None:
        return None
    return GILStatements(path, _LIB)
