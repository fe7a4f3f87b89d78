"""ErrorDetails from marshmallow validation errors, scrubbed of the values they refuse.

A failed schema becomes one detail per offending field, each with a string-list path, a short
code and a short excerpt of the value; messages lose any string the input held and values
under secret-looking keys are never echoed, because details leave the process (answers,
JobForge, TruthCore, logs). :func:`redact_detail` does the same for details a capability
raises itself.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from marshmallow import ValidationError

from runnerkit.errors.redaction import REDACTED, is_secret_key, redact

#: The longest excerpt of an offending value echoed back in ``details``.
MAX_VALUE_EXCERPT = 64


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
