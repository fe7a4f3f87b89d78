"""Structured logs: one JSON object per line with the observability contract's field names."""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import json
import logging
import os
import select
import stat
import sys
import time
from collections.abc import Iterator
from typing import Any

from runnerkit.errors.redaction import redact
from runnerkit.service import libc_calls
from runnerkit.service.libc_calls import keeping_gil

_LEVELS = {"WARNING": "warn", "CRITICAL": "fatal"}
_STANDARD = frozenset(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}
_HANDLER_MARK = "_runnerkit_handler"
_CONTEXT: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "runnerkit_log_context", default=None
)


@contextlib.contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Add ``fields`` (jobId, correlationId …) to every log line written inside the block.

    Lines from any logger count, a library's included, as long as they pass through a
    runnerkit formatter.
    """
    token = _CONTEXT.set({**(_CONTEXT.get() or {}), **fields})
    try:
        yield
    finally:
        _CONTEXT.reset(token)


_ENCODER = json.JSONEncoder(default=str, ensure_ascii=False)
_SECOND: tuple[int, str] = (-1, "")


def _timestamp(created: float) -> str:
    """``created`` as ``YYYY-MM-DDTHH:MM:SS.mmmZ``; the part up to the second is reused."""
    global _SECOND
    second = int(created)
    cached = _SECOND
    if cached[0] != second:
        cached = _SECOND = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
    millis = min(999, round((created - second) * 1_000_000) // 1000)
    return f"{cached[1]}.{millis:03d}Z"


def emit(
    logger: logging.Logger,
    level: int,
    message: str,
    fields: dict[str, Any],
    *,
    trusted: bool = False,
) -> None:
    """Log one of runnerkit's own lines with ``fields``, skipping ``logging``'s caller lookup.

    ``Logger.info`` walks the stack to find the calling file and line, which costs more than
    the rest of a per-job line; runnerkit's lines are found by their component, not by line.

    ``trusted``: ``fields`` are runnerkit's own (fixed, non-secret keys, like the per-job
    line's), so only the fields of :func:`log_context` are redacted. When the line's only
    destination is runnerkit's own JSON handler, it is then formatted and written directly
    (:meth:`JsonFormatter.line`: no ``LogRecord``, the static part of the line made once),
    the same text ``logging`` would write.
    """
    if not logger.isEnabledFor(level):
        return
    if trusted:
        handler = _only_json_handler(logger, level)
        if handler is not None:
            try:
                line = handler.formatter.line(level, message, logger.name, fields)
                _write_line(handler, line + handler.terminator)
                return
            except RecursionError:
                raise
            except Exception:  # noqa: BLE001 - logging's own path reports the failure
                pass
    logger.handle(logger.makeRecord(logger.name, level, "", 0, message, (), None, extra=fields))


class _PollFD(ctypes.Structure):
    _fields_ = [("fd", ctypes.c_int), ("events", ctypes.c_short), ("revents", ctypes.c_short)]


#: libc's ``poll``, called without giving up the GIL (None where there is no such libc).
_LIBC_POLL = keeping_gil(
    "poll", [ctypes.POINTER(_PollFD), ctypes.c_ulong, ctypes.c_int], ctypes.c_int
)
_DIRECT = "_runnerkit_direct"
#: Where a stream's lines go past it: a file's descriptor (written at its offset), a pipe's
#: (written only if that cannot wait), or none.
_FILE, _PIPE, _NONE = 1, 2, 0


def _write_line(handler: Any, text: str) -> None:
    """Write one line through ``handler``'s stream without giving up the GIL when that
    cannot make this thread wait, and without its lock.

    A stream's write gives the GIL up around the system call while the handler's lock is
    held. Under load another thread takes the GIL meanwhile, and the writer, lock in hand,
    waits for it back while every thread with a line to write queues on the lock: a convoy
    in which a fifth of a worker's thread time went waiting for the lock (profiled at 64
    connections). Taking the lock only when it was free still queued threads on it whenever
    its holder was made to give the GIL up by the interpreter's switch interval (9 % of
    thread time). So the line goes to the stream's descriptor in one call that keeps the
    GIL: appended to a file (as the journal appends), or to a pipe that has room for it
    (:func:`_pipe_write`; a line of at most ``PIPE_BUF`` bytes goes in whole). No lock is
    needed for that: one ``write`` is never interleaved with another (a file's offset moves
    at once, a pipe takes such a line whole), and the stream holds nothing between lines
    (``logging`` flushes it after each, under the lock; what it held when its descriptor was
    first used is flushed then). A full pipe, a stream with no descriptor (or a terminal, a
    socket), a longer line: the stream's own write under the lock, as ``logging`` does.
    """
    stream = handler.stream
    direct = handler.__dict__.get(_DIRECT)
    if direct is None or direct[0] is not stream:
        with handler.lock:
            direct = handler.__dict__[_DIRECT] = (stream, *_direct_target(stream))
    _stream, kind, fd = direct
    if kind != _NONE:
        data = text.encode(stream.encoding, stream.errors or "strict")
        if kind == _FILE:
            written = libc_calls.write(fd, data)
            if written < len(data):  # a short write (a full disk): the rest, or its error
                _write_all(fd, data[written:])
            return
        if len(data) <= select.PIPE_BUF and _pipe_write(fd, data):
            return
    with handler.lock:
        stream.write(text)
        stream.flush()


def _pipe_write(fd: int, data: bytes) -> bool:
    """Write ``data`` (at most ``PIPE_BUF`` bytes: whole or not at all) to the pipe ``fd``
    if it has room for it now (``poll``); whether it was written.

    With room, the write waits at most for the instant another writer or the reader holds
    the pipe. Only another process filling the pipe between the two calls could make it
    wait for the reader, GIL in hand; a pipe without room takes the stream's write, which
    gives the GIL up while it waits. (``RWF_NOWAIT`` would say so in one call, but refuses
    whenever the pipe is held for that instant, and not every pipe takes it.)
    """
    ready = _PollFD(fd, select.POLLOUT, 0)
    if int(_LIBC_POLL(ctypes.byref(ready), 1, 0)) != 1 or ready.revents != select.POLLOUT:
        return False
    return libc_calls.write(fd, data) == len(data)


def _direct_target(stream: Any) -> tuple[int, int]:
    """(kind, descriptor) of where ``stream``'s lines can go past it (see :data:`_FILE`)."""
    if _LIBC_POLL is None:  # pragma: no cover - not glibc/Linux
        return _NONE, -1
    try:
        fd = stream.fileno()
        mode = os.fstat(fd).st_mode
        text = isinstance(stream.encoding, str)
        stream.flush()  # what the stream holds goes first
    except (AttributeError, OSError, ValueError):
        return _NONE, -1
    if not text:
        return _NONE, -1
    if stat.S_ISREG(mode):
        return _FILE, fd
    if stat.S_ISFIFO(mode):
        return _PIPE, fd
    return _NONE, -1


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _only_json_handler(logger: logging.Logger, level: int) -> Any:
    """runnerkit's JSON stream handler when it is the only place a line of ``logger`` at
    ``level`` goes (no filter on the way, no other handler), else None."""
    found = None
    current: logging.Logger | None = logger
    while current is not None:
        if current.filters:
            return None
        for handler in current.handlers:
            if found is not None or not getattr(handler, _HANDLER_MARK, False):
                return None
            found = handler
        if not current.propagate:
            break
        current = current.parent
    if (
        found is None
        or found.filters
        or level < found.level
        or type(found) is not logging.StreamHandler
        or not isinstance(found.formatter, JsonFormatter)
    ):
        return None
    return found


def _context_fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in (_CONTEXT.get() or {}).items() if k not in record.__dict__}


class JsonFormatter(logging.Formatter):
    """Formats a record as the contract's log record: timestamp, level, message, service, ….

    Fields passed with ``extra=`` (jobId, capabilityId, correlationId, outcome, durationMs …)
    appear at the top level, with secret-like keys redacted.
    """

    def __init__(self, service: str, version: str) -> None:
        super().__init__()
        self.service = service
        self.version = version
        #: The fixed middle of a line (level to component), by what it is made of.
        self._heads: dict[tuple[int, str, str, str, str], str] = {}

    def line(self, level: int, message: str, name: str, fields: dict[str, Any]) -> str:
        """The line :meth:`format` makes for a record of ``name`` at ``level`` with
        ``message`` and the extra ``fields`` (not redacted: runnerkit's own), made without a
        record: the part from level to component is made once per kind of line."""
        key = (level, message, name, self.service, self.version)
        head = self._heads.get(key)
        if head is None:
            levelname = logging.getLevelName(level)
            fixed = {
                "level": _LEVELS.get(levelname, levelname.lower()),
                "message": message,
                "service": self.service,
                "version": self.version,
                "component": name,
            }
            head = self._heads[key] = ", " + _ENCODER.encode(fixed)[1:-1]
        context = _CONTEXT.get()
        if context:
            added = {k: v for k, v in context.items() if k not in _STANDARD and k not in fields}
            extras = {**redact(added), **fields}
        else:
            extras = fields
        start = '{"timestamp": "' + _timestamp(time.time()) + '"' + head
        if not extras:
            return start + "}"
        return start + ", " + _ENCODER.encode(extras)[1:]

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "timestamp": _timestamp(record.created),
            "level": _LEVELS.get(record.levelname, record.levelname.lower()),
            "message": record.getMessage(),
            "service": self.service,
            "version": self.version,
            "component": record.name,
        }
        # Only the added fields can hold a secret-like key: the fixed ones above never do.
        extras = _context_fields(record)
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                extras[key] = value
        if extras:
            entry.update(redact(extras))
        if record.exc_info and record.exc_info[0] is not None:
            entry["exception"] = self.formatException(record.exc_info)
        return _ENCODER.encode(entry)


class TextFormatter(logging.Formatter):
    """A one-line human format for development, extras appended as key=value."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = _context_fields(record)
        extras.update(
            (k, v)
            for k, v in record.__dict__.items()
            if k not in _STANDARD and not k.startswith("_")
        )
        if extras:
            line += " " + " ".join(f"{k}={v}" for k, v in redact(extras).items())
        return line


def configure_logging(
    service: str, version: str, fmt: str = "json", level: str = "INFO", isolate: bool = False
) -> None:
    """Give the ``runnerkit`` logger one stderr handler (once per process).

    With ``isolate`` (a gunicorn worker) its records stop there, so a root logger someone
    configured does not print each line a second time: one JSON line per job. Otherwise
    (tests, scripts, another server) they also propagate as any library's do, so pytest's
    ``caplog`` and the host's own handlers see them (a job's ``ctx.logger`` lines included).
    """
    for name in ("gunicorn.error", "gunicorn.access"):
        # gunicorn's lines in JSON (runnerkit.gunicorn_logging) name this runner from now on.
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler.formatter, JsonFormatter):
                handler.formatter.service, handler.formatter.version = service, version
    logger = logging.getLogger("runnerkit")
    logger.setLevel(level.upper())
    if isolate:
        logger.propagate = False
    for handler in logger.handlers:
        if getattr(handler, _HANDLER_MARK, False):
            return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service, version) if fmt == "json" else TextFormatter())
    setattr(handler, _HANDLER_MARK, True)
    logger.addHandler(handler)
