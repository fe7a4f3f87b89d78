"""The contract's retry decision: whether a failed attempt is retried, and after how long.

Pure functions of an ErrorEnvelope and a RetryPolicy document, shared by the forge's
dispatcher and the test doubles so both decide the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


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
