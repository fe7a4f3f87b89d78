"""How the dashboard writes values for people: JSON blocks and one-line previews, durations,
ages, timestamps and URLs without their credentials.

Pure functions of their arguments (no request, no database), so the view models of
:mod:`.dashboard_views` and the page routes share one way of showing each kind of value, and
tests can check it without an app. Values are redacted before they get here.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from runnerkit.contracts import parse_timestamp

#: A UTF-16 surrogate in a Python str is always a lone one (JSON's "\\ud800"): no UTF-8 page
#: can carry it, so the dashboard shows U+FFFD in its place.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def pretty_json(value: Any) -> str:
    """Indented JSON of an already redacted value, for a ``<pre>`` block."""
    text = json.dumps(value, indent=2, ensure_ascii=False, default=str)
    return _LONE_SURROGATE.sub("\ufffd", text)


def compact_json(value: Any, limit: int | None = None) -> str:
    """One-line JSON, cut to ``limit`` characters with an ellipsis."""
    text = json.dumps(value, ensure_ascii=False, separators=(", ", ": "), default=str)
    text = _LONE_SURROGATE.sub("\ufffd", text)
    if limit is not None and len(text) > limit:
        text = text[: limit - 1].rstrip() + "…"
    return text


def format_duration(ms: float | None) -> str:
    """``850 ms``, ``12.4 s``, ``3 min 05 s``, ``2 h 04 min``; '' when unknown."""
    if ms is None or not math.isfinite(ms) or ms < 0:
        return ""
    if ms < 1000:
        return f"{ms:.0f} ms"
    seconds = ms / 1000.0
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def format_age(seconds: float | None) -> str:
    """``just now``, ``12 s ago``, ``4 min ago``, ``3 h ago``, ``2 d ago``."""
    if seconds is None:
        return ""
    if seconds < 0:
        return "in the future"
    if seconds < 2:
        return "just now"
    if seconds < 90:
        return f"{seconds:.0f} s ago"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min ago"
    if seconds < 36 * 3600:
        return f"{seconds / 3600:.0f} h ago"
    return f"{seconds / 86400:.0f} d ago"


def epoch_of(timestamp: Any) -> float | None:
    """Epoch seconds of a contract timestamp; None when absent or unreadable."""
    if not isinstance(timestamp, str) or not timestamp:
        return None
    try:
        return parse_timestamp(timestamp).timestamp()
    except ValueError:
        return None


@dataclass(frozen=True)
class When:
    """A moment as a page shows it: the contract timestamp, a readable UTC form, its age."""

    iso: str
    text: str
    age: str

    @classmethod
    def of(cls, timestamp: Any, now: float) -> When | None:
        ts = epoch_of(timestamp)
        if ts is None:
            return None
        text = datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        return cls(iso=str(timestamp), text=text, age=format_age(now - ts))


def safe_url(url: Any) -> str:
    """A URL without any ``user:password@`` part, for display."""
    text = str(url or "")
    try:
        parts = urlsplit(text)
    except ValueError:
        return ""
    if parts.username is None and parts.password is None:
        return text
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
