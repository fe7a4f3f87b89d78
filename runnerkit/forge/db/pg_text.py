"""Text PostgreSQL can store: NUL and the escape character written as escapes, read back.

PostgreSQL's text cannot hold NUL, which a JSON string (a job type, a runner's name, an
assertion's subject) may: such strings are stored with NUL written as ESC "0" and ESC itself
as ESC ESC (ESC a private-use character), and read back as they were. The forge's JSON
documents are ASCII (``\\u0000`` escaped), so only strings stored raw ever change. Every
connection of the store's pool sends and reads ``str`` this way (:func:`configure`);
:mod:`.pg_rows` escapes the strings it packs into JSON itself.
"""

from __future__ import annotations

import re
from typing import Any

import psycopg
from psycopg.types.string import StrDumperUnknown, TextLoader

_ESC = "\ue000"
_ESCAPED = re.compile(f"{_ESC}(.)", re.DOTALL)


def escape_text(value: str) -> str:
    if "\x00" not in value and _ESC not in value:
        return value
    return value.replace(_ESC, _ESC + _ESC).replace("\x00", _ESC + "0")


def unescape_text(value: str) -> str:
    return _ESCAPED.sub(lambda m: "\x00" if m.group(1) == "0" else m.group(1), value)


class _NulSafeDumper(StrDumperUnknown):
    def dump(self, obj: str) -> Any:
        return super().dump(escape_text(obj))


class _NulSafeLoader(TextLoader):
    def load(self, data: Any) -> Any:
        value = super().load(data)
        if isinstance(value, str) and _ESC in value:
            return unescape_text(value)
        return value


def configure(conn: psycopg.Connection[Any]) -> None:
    """Strings sent to and read from ``conn`` NUL-safe (a pool's ``configure``)."""
    conn.adapters.register_dumper(str, _NulSafeDumper)
    conn.adapters.register_loader("text", _NulSafeLoader)
