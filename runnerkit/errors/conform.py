"""Make a raised :class:`RunnerError`'s fields what the ErrorEnvelope contract accepts.

A capability may raise an error with any values in its fields; a strict peer (Zod) would reject
the whole answer for one of them. :func:`conform` coerces what it can, drops what it cannot
and logs one warning naming every change, before the envelope is built.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from typing import Any

from runnerkit.errors.details import MAX_VALUE_EXCERPT
from runnerkit.errors.kinds import STATUS_BY_CATEGORY, RunnerError

log = logging.getLogger("runnerkit.errors")

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
