"""Structured logs: one JSON object per line with the observability contract's field names."""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import sys
import time
from collections.abc import Iterator
from typing import Any

from runnerkit.errors.redaction import redact

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
                with handler.lock:
                    handler.stream.write(line + handler.terminator)
                    handler.stream.flush()
                return
            except RecursionError:
                raise
            except Exception:  # noqa: BLE001 - logging's own path reports the failure
                pass
    logger.handle(logger.makeRecord(logger.name, level, "", 0, message, (), None, extra=fields))


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
