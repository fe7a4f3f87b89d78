"""Strict marshmallow fields that accept exactly what the ControlPlane Zod schemas accept.

marshmallow's stock fields are lenient where Zod is strict: ``String`` takes bytes, ``Integer``
and ``Float`` coerce ``"5"``, ``Boolean`` takes ``"true"``/``1``, ``UUID`` takes braces and
``urn:uuid:`` forms, ``DateTime`` takes offsets and writes ``+00:00``. Every contract schema
uses the fields below instead (see CONTRACTS.md, "Validation semantics").

Each field subclasses the closest stock field so apispec still documents it with the right
JSON type.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from random import getrandbits
from typing import Any

import ada_url
from marshmallow import Schema, fields

__all__ = [
    "PROTO_KEY",
    "AnyJSON",
    "Object",
    "Record",
    "StrictBoolean",
    "StrictInteger",
    "StrictNumber",
    "StrictString",
    "StringList",
    "URLString",
    "UUIDString",
    "ZDateTime",
    "format_timestamp",
    "is_absolute_url",
    "is_uuid",
    "is_zdatetime",
    "new_uuid",
    "parse_timestamp",
    "utc_now",
]


def _with_format(metadata: Mapping[str, Any] | None, fmt: str) -> dict[str, Any]:
    """Add an OpenAPI ``format`` hint (apispec copies it) unless the caller set one."""
    return {"format": fmt, **(metadata or {})}


# --------------------------------------------------------------------------- scalars


class StrictString(fields.String):
    """A JSON string only: stock ``String`` also accepts ``bytes``."""

    def _deserialize(
        self, value: Any, attr: str | None, data: Mapping[str, Any] | None, **kwargs: Any
    ) -> str:
        if not isinstance(value, str):
            raise self.make_error("invalid")
        return value


class StrictBoolean(fields.Boolean):
    """Only ``true``/``false``: stock ``Boolean`` also takes ``"true"``, ``"yes"``, ``1``..."""

    def _deserialize(
        self, value: Any, attr: str | None, data: Mapping[str, Any] | None, **kwargs: Any
    ) -> bool:
        if value is True or value is False:
            return value
        raise self.make_error("invalid", input=value)

    def _serialize(self, value: Any, attr: str | None, obj: Any, **kwargs: Any) -> bool | None:
        return None if value is None else bool(value)


def _is_json_number(value: Any) -> bool:
    """int or float, but not bool (a Python ``bool`` is an ``int``)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


class StrictNumber(fields.Float):
    """A finite JSON number; no ``"5"``, no ``true``, no NaN/Infinity.

    ints stay ints (exact, however large) and floats stay floats, because stock ``Float``
    would turn 9999999999999999 into 1e16.
    """

    default_error_messages = {"invalid": "Not a valid number."}

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(allow_nan=False, **kwargs)

    def _deserialize(
        self, value: Any, attr: str | None, data: Mapping[str, Any] | None, **kwargs: Any
    ) -> float:
        if not _is_json_number(value):
            raise self.make_error("invalid", input=value)
        if isinstance(value, float) and not math.isfinite(value):
            raise self.make_error("special")
        return value

    def _serialize(self, value: Any, attr: str | None, obj: Any, **kwargs: Any) -> Any:
        return value


class StrictInteger(fields.Integer):
    """A JSON number with no fractional part: ``5`` and ``5.0`` load as ``5``; ``5.5`` fails.

    Stock ``Integer`` truncates ``5.5`` and coerces ``"5"``; ``strict=True`` rejects ``5.0``.
    """

    def _deserialize(
        self, value: Any, attr: str | None, data: Mapping[str, Any] | None, **kwargs: Any
    ) -> int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value)
        raise self.make_error("invalid", input=value)

    def _serialize(self, value: Any, attr: str | None, obj: Any, **kwargs: Any) -> Any:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        return value


# --------------------------------------------------------------------------- uuid

_UUID_RE = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
)


#: A uuid's version (4) and variant bits, and the mask that clears the bits they take.
_V4_BITS = (4 << 76) | (2 << 62)
_V4_MASK = ~((0xF << 76) | (3 << 62)) & ((1 << 128) - 1)


def new_uuid() -> str:
    """A version 4 uuid drawn from the process's ``random`` generator (reseeded in every
    forked process), for ids that must be unique, not secret (an envelope's, an event's, an
    assertion's, a correlation id). ``uuid.uuid4`` reads ``os.urandom``, a system call that
    gives the GIL up: under load a thread switch per id, several per job."""
    digits = f"{getrandbits(128) & _V4_MASK | _V4_BITS:032x}"
    return f"{digits[:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-{digits[20:]}"


def is_uuid(value: Any) -> bool:
    """True for an 8-4-4-4-12 hex string in either case, any version nibble (nil passes)."""
    return isinstance(value, str) and _UUID_RE.fullmatch(value) is not None


class UUIDString(fields.String):
    """A uuid kept as the string it came in as.

    Stock ``UUID`` returns a ``uuid.UUID`` and also accepts ``{...}``, ``urn:uuid:`` and
    unhyphenated forms, which Zod rejects.
    """

    default_error_messages = {"invalid_uuid": "Not a valid UUID."}

    def __init__(self, *, metadata: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(metadata=_with_format(metadata, "uuid"), **kwargs)

    def _deserialize(
        self, value: Any, attr: str | None, data: Mapping[str, Any] | None, **kwargs: Any
    ) -> str:
        if not is_uuid(value):
            raise self.make_error("invalid_uuid")
        return value

    def _serialize(self, value: Any, attr: str | None, obj: Any, **kwargs: Any) -> str | None:
        return None if value is None else str(value)  # also takes a uuid.UUID


# --------------------------------------------------------------------------- datetime

_ZDT_RE = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2})(?::(\d{2})(?:\.(\d+))?)?Z",
    re.ASCII,
)
_DAYS_IN_MONTH = (31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


def _is_leap(year: int) -> bool:
    return year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)


def _zdt_parts(value: Any) -> tuple[int, int, int, int, int, int, int] | None:
    """Split a Z timestamp into (y, mo, d, h, mi, s, µs), or None when it is not one."""
    if not isinstance(value, str):
        return None
    m = _ZDT_RE.fullmatch(value)
    if m is None:
        return None
    year, month, day, hour, minute = (int(g) for g in m.group(1, 2, 3, 4, 5))
    second = int(m.group(6) or 0)
    micro = int((m.group(7) or "").ljust(6, "0")[:6])
    if not 1 <= month <= 12 or hour > 23 or minute > 59 or second > 59:
        return None
    days = 29 if month == 2 and _is_leap(year) else _DAYS_IN_MONTH[month - 1]
    if not 1 <= day <= days:
        return None
    return year, month, day, hour, minute, second, micro


def is_zdatetime(value: Any) -> bool:
    """True for ``YYYY-MM-DDTHH:MM[:SS[.fraction]]Z`` naming a real UTC instant.

    Mirrors Zod's ``z.string().datetime()``: literal ``T`` and ``Z``, no offsets, the calendar
    date must exist (year 0000 is a leap year, as in Zod's regex), hours 00-23, no leap second.
    """
    return _zdt_parts(value) is not None


def parse_timestamp(value: str) -> datetime:
    """Parse a Z timestamp into an aware UTC ``datetime`` (fraction truncated to µs).

    Raises ValueError for anything ``ZDateTime`` rejects, and for year 0000, which Zod
    accepts but Python's ``datetime`` cannot hold.
    """
    parts = _zdt_parts(value)
    if parts is None:
        raise ValueError(f"not a UTC timestamp ending in Z: {value!r}")
    return datetime(*parts, tzinfo=UTC)


def format_timestamp(dt: datetime) -> str:
    """Write ``dt`` as ``YYYY-MM-DDTHH:MM:SS.mmmZ`` (UTC, milliseconds, literal Z).

    ``isoformat()`` writes ``+00:00``, which a Zod peer rejects. Naive datetimes are taken
    as UTC. Sub-millisecond digits are truncated, as a JS ``Date`` would hold them.
    """
    d = dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)
    return (
        f"{d.year:04d}-{d.month:02d}-{d.day:02d}T"
        f"{d.hour:02d}:{d.minute:02d}:{d.second:02d}.{d.microsecond // 1000:03d}Z"
    )


def utc_now() -> str:
    """The current time as a contract timestamp."""
    return format_timestamp(datetime.now(UTC))


class ZDateTime(fields.String):
    """A UTC timestamp ending in a literal ``Z``, loaded as the original string.

    Stock ``DateTime`` accepts offsets and dumps ``+00:00``; keeping the string means a
    loaded value dumps back byte-for-byte. Dumping a ``datetime`` writes ``format_timestamp``.
    """

    default_error_messages = {
        "invalid": "Not a valid UTC datetime (expected YYYY-MM-DDTHH:MM[:SS[.fff]]Z)."
    }

    def __init__(self, *, metadata: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(metadata=_with_format(metadata, "date-time"), **kwargs)

    def _deserialize(
        self, value: Any, attr: str | None, data: Mapping[str, Any] | None, **kwargs: Any
    ) -> str:
        if not is_zdatetime(value):
            raise self.make_error("invalid")
        return value

    def _serialize(self, value: Any, attr: str | None, obj: Any, **kwargs: Any) -> str | None:
        if value is None:
            return None
        if isinstance(value, datetime):
            return format_timestamp(value)
        return str(value)


# --------------------------------------------------------------------------- url


def is_absolute_url(value: Any) -> bool:
    """Whether WHATWG ``new URL(value)`` without a base parses ``value``, as Zod's ``.url()``
    runs it: through ada, the WHATWG URL parser Node.js itself embeds, so host syntax (IPv4
    ranges, IPv6 literals, percent-encoded and internationalised hosts) is judged exactly as a
    Zod peer judges it. ``http://localhost:3000/health``, ``localhost:3000`` (scheme
    ``localhost:``) and ``mailto:x`` pass; ``/health``, ``http://1.2.3.256/``, ``http://[zz]/``
    and ``""`` fail.
    """
    if not isinstance(value, str):
        return False
    try:
        return bool(ada_url.check_url(value))
    except (UnicodeError, ValueError):  # a lone surrogate cannot be a URL's UTF-8
        return False


class URLString(fields.String):
    """An absolute URL as the WHATWG parser sees it (see ``is_absolute_url``), kept as given.

    Stock ``Url`` demands a known scheme and a dotted host, so it rejects
    ``http://localhost:3000/health``, which Zod accepts.
    """

    default_error_messages = {"invalid_url": "Not a valid URL."}

    def __init__(self, *, metadata: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(metadata=_with_format(metadata, "uri"), **kwargs)

    def _deserialize(
        self, value: Any, attr: str | None, data: Mapping[str, Any] | None, **kwargs: Any
    ) -> str:
        if not is_absolute_url(value):
            raise self.make_error("invalid_url")
        return value


# --------------------------------------------------------------------------- containers


#: The one key a Zod peer drops from a record it parses (its object merge skips it, so that
#: parsing cannot set a prototype); a record here drops it too, at its own level only.
PROTO_KEY = "__proto__"


class Record(fields.Dict):
    """A JSON object with any values (Zod ``z.record(z.unknown())``): not a list, not null.

    A ``__proto__`` key is dropped, as Zod drops it; values below are kept as they are, as
    Zod keeps ``z.unknown()`` values.
    """

    default_error_messages = {"invalid": "Not a valid object."}

    def _deserialize(
        self, value: Any, attr: str | None, data: Mapping[str, Any] | None, **kwargs: Any
    ) -> dict[str, Any]:
        if not isinstance(value, Mapping):
            raise self.make_error("invalid")
        if PROTO_KEY in value:
            return {k: v for k, v in value.items() if k != PROTO_KEY}
        return dict(value)


class AnyJSON(fields.Raw):
    """Any JSON value, including null (Zod ``z.unknown()``), passed through untouched."""

    def __init__(self, *, allow_none: bool = True, **kwargs: Any) -> None:
        super().__init__(allow_none=allow_none, **kwargs)


class StringList(fields.List):
    """A list of strict strings (the contracts' ``string[]``)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(StrictString(), **kwargs)


class Object(fields.Nested):
    """A nested contract object.

    ``default_empty=True`` mirrors Zod's ``.default({})``: when the key is absent, ``{}`` is
    loaded through the nested schema so its own defaults apply (``resourceRequirements``
    becomes ``{"gpu": False}``). ``null`` still fails, because null is not absent.
    """

    def __init__(
        self,
        nested: type[Schema],
        *,
        default_empty: bool = False,
        **kwargs: Any,
    ) -> None:
        if default_empty:
            kwargs["load_default"] = _empty_loader(nested)
        super().__init__(nested, **kwargs)


def _empty_loader(schema: type[Schema]) -> Callable[[], Any]:
    """A fresh ``load({})`` per call, so defaults are never shared mutable dicts.

    The schema instance is made once, on first use: building one per absent key would cost
    more than the load itself.
    """
    instance = functools.cache(schema)
    return lambda: instance().load({})
