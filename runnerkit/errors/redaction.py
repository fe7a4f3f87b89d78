"""Keep secrets out of logs, envelopes and pages.

The observability contract names the key fragments that mark a value as secret; any key that
contains one of them, at any depth, has its value replaced before the structure leaves the
process.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Any

SECRET_KEY_RE = re.compile(
    r"password|secret|token|api_key|apikey|authorization|private_key|signature|hmac",
    re.IGNORECASE,
)
REDACTED = "[REDACTED]"
#: Values with nothing inside to redact: answered before the (slower) ABC checks.
_SCALARS = frozenset({str, int, float, bool, type(None)})


def is_secret_key(key: object) -> bool:
    """Whether a mapping key names a secret-like value."""
    return isinstance(key, str) and _is_secret_name(key)


@functools.lru_cache(maxsize=4096)
def _is_secret_name(key: str) -> bool:
    # The same few key names come by again and again: remember the regex's verdict.
    return SECRET_KEY_RE.search(key) is not None


def redact(value: Any, _depth: int = 0) -> Any:
    """A copy of ``value`` with every secret-like key's value replaced by ``[REDACTED]``."""
    if type(value) in _SCALARS:
        return value
    if _depth > 64:
        return REDACTED
    if isinstance(value, Mapping):
        return {
            k: (REDACTED if is_secret_key(k) else redact(v, _depth + 1)) for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [redact(v, _depth + 1) for v in value]
    return value


#: The fragments of ``SECRET_KEY_RE`` (an alternation of plain words): substring tests on the
#: lower-cased text cost a tenth of the case-insensitive regex search on a typical request.
_SECRET_FRAGMENTS = tuple(SECRET_KEY_RE.pattern.split("|"))
assert all(f.replace("_", "").isalnum() for f in _SECRET_FRAGMENTS), _SECRET_FRAGMENTS


def might_hold_secrets(text: str | None) -> bool:
    """Whether JSON text has a secret-like name anywhere (a key or, harmlessly, a value):
    the cheap test in front of :func:`redact`, so only such documents pay for it."""
    if not text:
        return False
    if "\\u" in text:
        # Escaped non-ASCII (the forge stores JSON as ASCII): a key may match the regex
        # through Unicode case folding (a long s for "s"), which substrings cannot see.
        return True
    lowered = text.lower()
    return any(fragment in lowered for fragment in _SECRET_FRAGMENTS)


def redact_job(body: dict[str, Any], *texts: str | None) -> dict[str, Any]:
    """``body`` (a stored job or assertion) with secret-like values redacted (:func:`redact`)
    when any of the stored JSON ``texts`` it was made from may hold one; else ``body`` itself."""
    return redact(body) if any(might_hold_secrets(t) for t in texts) else body
