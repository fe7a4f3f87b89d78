"""How the forge writes values into its store: canonical JSON text and time-ordered ids.

Wire values are stored as JSON text (:func:`dumps`: sorted keys, no spaces, integral floats
as ints), so a stored document compares and hashes the same however it was built. The forge
names its own events and assertions with version 7 uuids (:func:`time_ordered_id`) so their
unique indexes grow at one end. Every query module and most of the forge use these: they
import nothing of the store.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from random import getrandbits
from typing import Any


def time_ordered_id() -> str:
    """A version 7 uuid (RFC 9562: Unix milliseconds, then random bits), as a string.

    The forge names its own events and assertions with these: consecutive ids sort together,
    so their unique indexes grow at one end instead of touching a random page per row. The
    random bits come from the process's ``random`` generator (reseeded in every forked
    process): these ids must be unique, not secret, and ``os.urandom`` gives the GIL up.
    """
    value = (time.time_ns() // 1_000_000) << 80 | getrandbits(80)
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
