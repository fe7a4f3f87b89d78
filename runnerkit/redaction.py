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
