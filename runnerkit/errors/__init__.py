"""Errors a capability raises, the ErrorEnvelope they become, and the retry decision.

Capability authors raise one of the exception classes below; everything that leaves the runner
as an error (an HTTP answer, a delivered result, a log line) is built by :func:`build_envelope`,
so every failure has the same contract-valid shape whatever raised it.
"""

from __future__ import annotations

import json
import logging
import math
import traceback
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from marshmallow import ValidationError

from runnerkit.contracts import CONTRACT_VERSION, utc_now
from runnerkit.errors.redaction import REDACTED, is_secret_key, redact

log = logging.getLogger("runnerkit.errors")

#: HTTP status for each error category, used wherever an envelope becomes a response.
STATUS_BY_CATEGORY: dict[str, int] = {
    "VALIDATION_ERROR": 400,
    "SCHEMA_MISMATCH": 500,
    "RUNTIME_ERROR": 500,
    "TIMEOUT": 504,
    "NETWORK_ERROR": 502,
    "AUTHENTICATION_ERROR": 401,
    "AUTHORIZATION_ERROR": 403,
    "RESOURCE_NOT_FOUND": 404,
    "RESOURCE_CONFLICT": 409,
    "RATE_LIMITED": 429,
    "SERVICE_UNAVAILABLE": 503,
    "RUNNER_ERROR": 500,
    "TRUTHCORE_ERROR": 502,
    "INTERNAL_ERROR": 500,
}

#: The longest excerpt of an offending value echoed back in ``details``.
MAX_VALUE_EXCERPT = 64


class RunnerError(Exception):
    """Base of every error a capability may raise on purpose.

    Subclasses fix ``category``, ``code``, ``severity`` and whether a retry may help; an
    instance may override any of them, and add ``details`` and ``retry_after`` (seconds).
    """

    category = "RUNNER_ERROR"
    code = "RUNNER_ERROR"
    severity = "error"
    retryable = False

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        details: Sequence[Mapping[str, Any]] | None = None,
        retryable: bool | None = None,
        retry_after: float | None = None,
        severity: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if retryable is not None:
            self.retryable = retryable
        if severity is not None:
            self.severity = severity
        # Kept as given (a capability may pass anything); made contract-valid on the way out.
        self.details: list[dict[str, Any]] = [
            dict(d) if isinstance(d, Mapping) else d for d in details or ()
        ]
        self.retry_after = retry_after

    @property
    def status(self) -> int:
        """The HTTP status this error is answered with (500 for a category not in the contract)."""
        return STATUS_BY_CATEGORY.get(self.category, 500)


class ValidationFailed(RunnerError):
    """The input is wrong; retrying the same input cannot help."""

    category = "VALIDATION_ERROR"
    code = "VALIDATION_FAILED"


class UnsupportedMediaType(ValidationFailed):
    """The body is not JSON at all (HTTP 415), as opposed to JSON that fails validation."""

    code = "UNSUPPORTED_MEDIA_TYPE"

    @property
    def status(self) -> int:
        return 415


class PayloadTooLarge(ValidationFailed):
    """The body is larger than the runner accepts (HTTP 413)."""

    code = "PAYLOAD_TOO_LARGE"

    @property
    def status(self) -> int:
        return 413


class SchemaMismatch(RunnerError):
    """A capability returned something its own ``Output`` schema rejects: its bug."""

    category = "SCHEMA_MISMATCH"
    code = "OUTPUT_SCHEMA_MISMATCH"


class NotFound(RunnerError):
    """Something the job refers to does not exist."""

    category = "RESOURCE_NOT_FOUND"
    code = "NOT_FOUND"


class Conflict(RunnerError):
    """The job clashes with the current state of a resource."""

    category = "RESOURCE_CONFLICT"
    code = "CONFLICT"


class RateLimited(RunnerError):
    """Too much work right now; retry after ``retry_after`` seconds."""

    category = "RATE_LIMITED"
    code = "RATE_LIMITED"
    retryable = True


class Unavailable(RunnerError):
    """A dependency is down or the runner is not taking work; a retry later may succeed."""

    category = "SERVICE_UNAVAILABLE"
    code = "SERVICE_UNAVAILABLE"
    retryable = True


class Timeout(RunnerError):
    """The job did not finish before its deadline."""

    category = "TIMEOUT"
    code = "TIMEOUT"
    retryable = True


class Unauthenticated(RunnerError):
    """The caller could not be authenticated."""

    category = "AUTHENTICATION_ERROR"
    code = "UNAUTHENTICATED"


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
        "id": str(uuid.uuid4()),
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


SEVERITIES = ("fatal", "error", "warning", "info")
_DETAIL_KEYS = ("message", "path", "code", "value")


def conform(exc: RunnerError) -> None:
    """Make ``exc``'s fields what the ErrorEnvelope contract accepts, in place.

    A capability may raise ``RunnerError(None, code=5, severity="critical", retry_after=-1,
    details=[{"path": ["items", 0]}])``; a Zod peer would reject the whole answer for any one
    of those. What can be coerced is (numbers in a path become strings, ``"5"`` seconds
    becomes 5.0), what cannot is replaced by a default or dropped, and one warning names every
    change so the capability's author can fix it.
    """
    changes: list[str] = []
    cls = type(exc)
    if exc.category not in STATUS_BY_CATEGORY:
        changes.append(f"category {exc.category!r} → RUNNER_ERROR")
        exc.category = "RUNNER_ERROR"
    if not isinstance(exc.code, str) or not exc.code:
        fixed = str(exc.code) if exc.code not in (None, "") else "RUNNER_ERROR"
        changes.append(f"code {exc.code!r} → {fixed!r}")
        exc.code = fixed
    if not isinstance(exc.message, str):
        fixed = (
            f"{cls.__name__} raised without a message" if exc.message is None else str(exc.message)
        )
        changes.append(f"message of type {type(exc.message).__name__} → a string")
        exc.message = fixed
    if exc.severity not in SEVERITIES:
        changes.append(f"severity {exc.severity!r} → 'error'")
        exc.severity = "error"
    if not isinstance(exc.retryable, bool):
        changes.append(f"retryable {exc.retryable!r} → {bool(exc.retryable)}")
        exc.retryable = bool(exc.retryable)
    if exc.retry_after is not None:
        seconds = _seconds(exc.retry_after)
        if seconds != exc.retry_after:
            changes.append(f"retry_after {exc.retry_after!r} → {seconds!r}")
            exc.retry_after = seconds
    details: list[dict[str, Any]] = []
    for index, detail in enumerate(exc.details if isinstance(exc.details, list) else ()):
        fixed_detail, detail_changes = _conform_detail(detail)
        details.append(fixed_detail)
        changes.extend(f"details[{index}]: {change}" for change in detail_changes)
    if not isinstance(exc.details, list):
        changes.append("details that are not a list dropped")
    exc.details = details
    if changes:
        log.warning(
            "%s would break the ErrorEnvelope contract; sent with: %s",
            cls.__name__,
            "; ".join(changes),
        )


def _seconds(value: Any) -> float | None:
    """``retry_after`` as the contract's nonnegative finite number, or None (left out)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        return None
    return value


def _conform_detail(detail: Any) -> tuple[dict[str, Any], list[str]]:
    """One ErrorDetail the contract accepts (message string; path string list; code string;
    value JSON), and what had to change."""
    if not isinstance(detail, Mapping):
        return {"message": _text(detail)}, [f"a {type(detail).__name__} → an ErrorDetail"]
    out: dict[str, Any] = {}
    changes: list[str] = []
    message = detail.get("message")
    out["message"] = message if isinstance(message, str) else _text(message)
    if not isinstance(message, str):
        changes.append("message missing" if message is None else "message made a string")
    path = detail.get("path")
    if path is not None:
        items = [path] if isinstance(path, str) else path
        if isinstance(items, list | tuple):
            out["path"] = [p if isinstance(p, str) else str(p) for p in items]
            if out["path"] != list(items):
                changes.append("path items made strings")
        else:
            changes.append("path that is not a list dropped")
    code = detail.get("code")
    if code is not None:
        out["code"] = code if isinstance(code, str) else str(code)
        if out["code"] is not code:
            changes.append("code made a string")
    if "value" in detail:
        value = detail["value"]
        if _is_json(value):
            out["value"] = value
        else:
            out["value"] = _text(value)
            changes.append("value that is not JSON made a string")
    dropped = sorted(str(k) for k in detail if k not in _DETAIL_KEYS)
    if dropped:
        changes.append(f"unknown keys {', '.join(dropped)} dropped")
    return out, changes


def _text(value: Any) -> str:
    """A short string for ``value`` (``"invalid"`` for nothing)."""
    if value is None:
        return "invalid"
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= MAX_VALUE_EXCERPT else text[: MAX_VALUE_EXCERPT - 1] + "…"


def _is_json(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        return False
    return True


def redact_detail(detail: Mapping[str, Any]) -> dict[str, Any]:
    """An ErrorDetail as it may leave the process: its ``value`` is redacted when its path
    names a secret, and secret-looking keys inside the value are (details a capability
    raises come here unfiltered, and error envelopes reach JobForge, TruthCore and logs)."""
    out = dict(detail)
    if "value" in out:
        path = out.get("path") or ()
        secret = any(is_secret_key(part) for part in path)
        out["value"] = REDACTED if secret else redact(out["value"])
    return out


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


def details_from_validation_error(
    exc: ValidationError, prefix: Sequence[str] = (), data: Any = None
) -> list[dict[str, Any]]:
    """Flatten marshmallow's nested messages into ErrorDetails with string-list paths.

    ``{"items": {3: {"name": ["Missing data"]}}}`` under prefix ``("payload",)`` becomes one
    detail with ``path == ["payload", "items", "3", "name"]``. ``data`` (the input that failed)
    lets each detail echo a short excerpt of the offending value.
    """
    messages = exc.messages if isinstance(exc.messages, dict) else {"_schema": exc.messages}
    source = data if data is not None else exc.data
    return details_from_messages(messages, list(prefix), source)


def details_from_messages(messages: Any, path: list[str], data: Any = None) -> list[dict[str, Any]]:
    """Recursive worker of :func:`details_from_validation_error`."""
    details: list[dict[str, Any]] = []
    if isinstance(messages, Mapping):
        for key, sub in messages.items():
            if key == "_schema":
                details.extend(details_from_messages(sub, path, data))
                continue
            child = _child(data, key)
            details.extend(details_from_messages(sub, [*path, str(key)], child))
    elif isinstance(messages, list | tuple):
        for message in messages:
            if isinstance(message, Mapping | list | tuple):
                details.extend(details_from_messages(message, path, data))
            else:
                detail: dict[str, Any] = {"message": _scrub(str(message), data), "path": list(path)}
                detail["code"] = _code_for(str(message))
                secret = any(is_secret_key(part) for part in path)
                excerpt = None if secret else _excerpt(data)
                if excerpt is not None:
                    detail["value"] = excerpt
                details.append(detail)
    else:
        details.append({"message": _scrub(str(messages), data), "path": list(path)})
    return details


#: Strings shorter than this are not taken out of messages: they would cut words, not secrets.
_SCRUB_MIN_CHARS = 4


def _scrub(message: str, data: Any) -> str:
    """``message`` without any string the offending value holds.

    marshmallow's own messages name no value, but a validator's may (``OneOf(error="{input}
    is not allowed")``, a ``ValidationError(f"... {value}")``); the value's place is the
    detail's ``value``, which is redacted under secret-looking keys, never its message.
    """
    for text in sorted(_strings(data), key=len, reverse=True):
        if text in message:
            message = message.replace(text, "<value>")
    return message


def _strings(data: Any, found: set[str] | None = None, depth: int = 0) -> set[str]:
    """The strings (keys included) in ``data``, up to a bounded number and depth."""
    found = set() if found is None else found
    if len(found) >= 256 or depth > 32:
        return found
    if isinstance(data, str):
        if len(data) >= _SCRUB_MIN_CHARS:
            found.add(data)
    elif isinstance(data, Mapping):
        for key, value in data.items():
            _strings(key, found, depth + 1)
            _strings(value, found, depth + 1)
    elif isinstance(data, list | tuple):
        for item in data:
            _strings(item, found, depth + 1)
    return found


def _child(data: Any, key: Any) -> Any:
    if isinstance(data, Mapping):
        return data.get(key, data.get(str(key)))
    if isinstance(data, list) and isinstance(key, int) and 0 <= key < len(data):
        return data[key]
    return None


def _code_for(message: str) -> str:
    lowered = message.lower()
    if "missing data" in lowered or "required" in lowered:
        return "required"
    if "null" in lowered:
        return "null"
    if "unknown field" in lowered:
        return "unknown_field"
    return "invalid"


def _excerpt(value: Any) -> Any:
    """A short echo of a scalar offending value; containers and secrets are not echoed.

    Non-finite floats are not echoed either: ``Infinity``/``NaN`` would make the answer itself
    invalid JSON.
    """
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, int | float):
        return value
    if isinstance(value, str):
        if len(value) > MAX_VALUE_EXCERPT:
            return value[: MAX_VALUE_EXCERPT - 1] + "…"
        return value
    return None


def should_retry(envelope: Mapping[str, Any], policy: Mapping[str, Any]) -> bool:
    """The contract's retry decision for one failed attempt.

    Not if the envelope says it is not retryable; not if its category is listed as
    non-retryable; yes if listed as retryable; otherwise yes unless the severity is fatal.
    """
    if not envelope.get("retryable", False):
        return False
    category = envelope.get("category")
    if category in policy.get("nonRetryableCategories", ()):
        return False
    if category in policy.get("retryableCategories", ()):
        return True
    return envelope.get("severity") != "fatal"


def retry_delay(attempt: int, policy: Mapping[str, Any]) -> float:
    """Milliseconds to wait before retry number ``attempt`` (0-based), per the contract."""
    backoff = float(policy.get("backoffMs", 1000))
    multiplier = float(policy.get("backoffMultiplier", 2))
    cap = float(policy.get("maxBackoffMs", 30000))
    try:
        delay = backoff * multiplier**attempt
    except OverflowError:
        return cap
    return min(delay, cap)
