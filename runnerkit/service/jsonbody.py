"""Request bodies as a Zod peer reads them: strict JSON objects within size limits.

Shared by the runner's ``/execute`` and the forge's API, so both refuse the same bodies with
the same envelopes: a non-JSON content type (415), bytes that are not JSON, ``NaN`` or
``Infinity`` (which Python's json module lets through), a body that is not an object, nesting
deeper or keys more numerous than the limits, and lone UTF-16 surrogates (400).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from runnerkit.errors import UnsupportedMediaType, ValidationFailed

#: Defaults of the limits (the runner's and the forge's MAX_JSON_DEPTH / MAX_JSON_KEYS).
DEFAULT_MAX_DEPTH = 64
DEFAULT_MAX_KEYS = 10_000


def parse_json_object(raw: bytes, content_type: str | None) -> dict[str, Any]:
    """Decode a request body the way a Zod peer would see it.

    Raises :class:`RunnerError` with status 415 for a non-JSON content type and 400 for bytes
    that are not JSON or not an object. ``NaN``/``Infinity`` (which Python's json module would
    let through) are rejected.
    """
    if not is_json_content_type(content_type):
        raise UnsupportedMediaType(
            "The request body must be JSON (Content-Type: application/json)",
            details=[{"message": f"Content-Type is {content_type or 'missing'}", "path": []}],
        )
    try:
        value = _DECODER.decode(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValidationFailed(
            "The request body is not valid JSON",
            code="INVALID_JSON",
            details=[{"message": _json_error_message(exc), "path": []}],
        ) from None
    except RecursionError:
        raise ValidationFailed(
            "The request body is nested too deeply", code="INVALID_JSON"
        ) from None
    if not isinstance(value, dict):
        raise ValidationFailed(
            "The request body must be a JSON object",
            code="INVALID_BODY",
            details=[{"message": f"Expected object, received {_json_type(value)}", "path": []}],
        )
    return value


def check_json_limits(value: Any, max_depth: int, max_keys: int, raw: bytes | None = None) -> None:
    """Refuse bodies nested deeper than ``max_depth`` or with more than ``max_keys`` keys.

    Both would cost every later step (validation, logging, storage) dearly; counting them is
    one cheap walk, done without recursion so a deep body cannot exhaust the stack. Given the
    ``raw`` JSON text the walk is skipped when byte counts already prove the body within the
    limits, as for almost every real request.
    """
    if raw is not None and _within_limits(raw, max_depth, max_keys):
        return
    keys = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > max_depth:
            raise ValidationFailed(
                f"The request body is nested deeper than {max_depth} levels",
                code="BODY_TOO_DEEP",
            )
        if isinstance(node, str):
            _check_text(node)
            continue
        if isinstance(node, dict):
            keys += len(node)
            if keys > max_keys:
                raise ValidationFailed(
                    f"The request body has more than {max_keys} keys", code="BODY_TOO_MANY_KEYS"
                )
            for key in node:
                _check_text(key)
            stack.extend((child, depth + 1) for child in node.values())
        elif isinstance(node, list):
            stack.extend((child, depth + 1) for child in node)


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _within_limits(raw: bytes, max_depth: int, max_keys: int) -> bool:
    """True when the JSON text ``raw`` cannot break the limits, judged from its bytes alone.

    Every key is followed by a ``:``, every level of nesting opens with ``{`` or ``[``, and a
    lone surrogate can only come from a ``\\uD8xx``-``\\uDFxx`` escape (UTF-8 itself cannot
    carry one). Those bytes inside strings only make the bounds more cautious.
    """
    return (
        raw.count(b":") <= max_keys
        and raw.count(b"{") + raw.count(b"[") + 1 <= max_depth
        and _SURROGATE_ESCAPE.search(raw) is None
    )


def _check_text(text: str) -> None:
    """JSON may spell a lone surrogate (``"\\ud800"``); it is no Unicode text: refuse it."""
    if _LONE_SURROGATE.search(text):
        raise ValidationFailed(
            "The request body contains a lone UTF-16 surrogate, which is not text",
            code="INVALID_JSON",
        )


def is_json_content_type(content_type: str | None) -> bool:
    """``application/json`` or any ``application/*+json``, parameters allowed."""
    if not content_type:
        return False
    mime = content_type.split(";", 1)[0].strip().lower()
    return mime == "application/json" or (
        mime.startswith("application/") and mime.endswith("+json")
    )


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    """A JSON number such as ``1e400`` overflows to inf in Python; JSON has no infinity."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:32]} is out of range for a JSON number")
    return value


#: One decoder for every body (``json.loads`` with hooks builds a new one per call).
def _finite_int(text: str) -> int:
    """An integer too large for a double (``1`` and 400 zeros) is no JSON number a Zod peer
    can hold either; refused like ``1e400`` instead of failing later in a ``float()``."""
    value = int(text)
    if len(text) > 300:
        try:
            float(value)
        except OverflowError:
            raise ValueError(f"{text[:32]}… is out of range for a JSON number") from None
    return value


_DECODER = json.JSONDecoder(
    parse_constant=_reject_constant, parse_float=_finite_float, parse_int=_finite_int
)


def _json_error_message(exc: Exception) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return f"{exc.msg} at line {exc.lineno} column {exc.colno}"
    if isinstance(exc, UnicodeDecodeError):
        return "The body is not UTF-8"
    return str(exc)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"
