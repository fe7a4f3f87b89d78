"""Build the ErrorEnvelope every failure becomes, whatever raised it.

Everything that leaves the runner or the forge as an error (an HTTP answer, a delivered
result, a log line) is built by :func:`make_envelope` or :func:`build_envelope`, so every
failure has the same contract-valid shape; an unexpected exception's stack trace goes to the
log, never to the caller.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Iterable, Mapping
from typing import Any

from marshmallow import ValidationError

from runnerkit.contracts import CONTRACT_VERSION, new_uuid, utc_now
from runnerkit.errors.conform import conform
from runnerkit.errors.details import details_from_validation_error, redact_detail
from runnerkit.errors.kinds import RunnerError

log = logging.getLogger("runnerkit.errors")


def make_envelope(
    category: str,
    code: str,
    message: str,
    *,
    service: str,
    severity: str = "error",
    details: Iterable[Mapping[str, Any]] = (),
    retryable: bool = False,
    retry_after: float | None = None,
    operation: str | None = None,
    correlation_id: str | None = None,
) -> dict[str, Any]:
    """Assemble one ErrorEnvelope dict; optional fields are left out rather than nulled."""
    envelope: dict[str, Any] = {
        "id": new_uuid(),
        "timestamp": utc_now(),
        "category": category,
        "severity": severity,
        "code": code,
        "message": message,
        "service": service,
        "details": [dict(d) for d in details],
        "retryable": retryable,
        "contractVersion": dict(CONTRACT_VERSION),
    }
    if operation:
        envelope["operation"] = operation
    if correlation_id:
        envelope["correlationId"] = correlation_id
    if retry_after is not None:
        envelope["retryAfter"] = retry_after
    return envelope


def build_envelope(
    exc: BaseException,
    *,
    service: str,
    operation: str | None = None,
    correlation_id: str | None = None,
    log_traceback: bool = True,
) -> dict[str, Any]:
    """Turn any exception into a contract-valid ErrorEnvelope.

    A :class:`RunnerError` keeps its category and fields. Anything else is an unexpected
    failure: it becomes a retryable ``RUNTIME_ERROR`` whose message names only the exception
    type, and the stack trace goes to the log, never to the caller (``log_traceback=False``:
    the caller logs it itself, see :func:`unexpected_envelope`).
    """
    if isinstance(exc, RunnerError):
        conform(exc)
        return make_envelope(
            exc.category,
            exc.code,
            exc.message,
            service=service,
            severity=exc.severity,
            details=[redact_detail(detail) for detail in exc.details],
            retryable=exc.retryable,
            retry_after=exc.retry_after,
            operation=operation,
            correlation_id=correlation_id,
        )
    if isinstance(exc, ValidationError):
        return make_envelope(
            "VALIDATION_ERROR",
            "VALIDATION_FAILED",
            "The request is not valid",
            service=service,
            details=details_from_validation_error(exc),
            operation=operation,
            correlation_id=correlation_id,
        )
    return unexpected_envelope(
        exc,
        service=service,
        operation=operation,
        correlation_id=correlation_id,
        log_traceback=log_traceback,
    )


def unexpected_envelope(
    exc: BaseException,
    *,
    service: str,
    operation: str | None = None,
    correlation_id: str | None = None,
    log_traceback: bool = True,
) -> dict[str, Any]:
    """A retryable ``RUNTIME_ERROR`` for an exception nobody raised on purpose.

    The message names only the exception type; the stack trace goes to the log: on a line
    of its own here, or, with ``log_traceback=False``, in a line the caller writes with the
    ids it knows (a job's one line carries it as ``exception``: :func:`traceback_text`).
    """
    if log_traceback:
        log.error(
            "unhandled %s in %s",
            type(exc).__name__,
            operation or "runner",
            exc_info=(type(exc), exc, exc.__traceback__),
        )
    return make_envelope(
        "RUNTIME_ERROR",
        "UNHANDLED_EXCEPTION",
        f"The capability failed with an unexpected {type(exc).__name__}",
        service=service,
        retryable=True,
        operation=operation,
        correlation_id=correlation_id,
    )


#: Where an exception raised in another process (``isolation = "process"``) keeps the
#: traceback it had there: pickling keeps an exception's attributes, not its frames.
TRACEBACK_ATTR = "_runnerkit_traceback"


def traceback_text(exc: BaseException) -> str:
    """``exc``'s traceback as text: the one it had in a child process if it came from one.

    Formatted only when a job fails, never on the success path.
    """
    remote = getattr(exc, TRACEBACK_ATTR, None)
    if isinstance(remote, str):
        return remote
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip("\n")
