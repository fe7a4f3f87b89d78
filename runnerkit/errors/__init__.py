"""Errors a capability raises, the ErrorEnvelope they become, and the retry decision.

Capability authors raise one of the exception classes below; everything that leaves the runner
as an error (an HTTP answer, a delivered result, a log line) is built by :func:`build_envelope`,
so every failure has the same contract-valid shape whatever raised it.

This package's face: users write ``from runnerkit.errors import …``. The code lives in
:mod:`~runnerkit.errors.kinds` (the exception classes), :mod:`~runnerkit.errors.envelopes`
(building envelopes), :mod:`~runnerkit.errors.conform` (making raised fields contract-valid),
:mod:`~runnerkit.errors.details` (validation-error details and scrubbing),
:mod:`~runnerkit.errors.retry` (the retry decision) and :mod:`~runnerkit.errors.redaction`.
"""

from __future__ import annotations

from runnerkit.errors.conform import SEVERITIES, conform
from runnerkit.errors.details import (
    MAX_VALUE_EXCERPT,
    details_from_messages,
    details_from_validation_error,
    redact_detail,
)
from runnerkit.errors.envelopes import (
    TRACEBACK_ATTR,
    build_envelope,
    make_envelope,
    traceback_text,
    unexpected_envelope,
)
from runnerkit.errors.kinds import (
    STATUS_BY_CATEGORY,
    Conflict,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    RunnerError,
    SchemaMismatch,
    Timeout,
    Unauthenticated,
    Unavailable,
    UnsupportedMediaType,
    ValidationFailed,
)
from runnerkit.errors.redaction import REDACTED, is_secret_key, redact
from runnerkit.errors.retry import retry_delay, should_retry

__all__ = [
    "MAX_VALUE_EXCERPT",
    "REDACTED",
    "SEVERITIES",
    "STATUS_BY_CATEGORY",
    "TRACEBACK_ATTR",
    "Conflict",
    "NotFound",
    "PayloadTooLarge",
    "RateLimited",
    "RunnerError",
    "SchemaMismatch",
    "Timeout",
    "Unauthenticated",
    "Unavailable",
    "UnsupportedMediaType",
    "ValidationFailed",
    "build_envelope",
    "conform",
    "details_from_messages",
    "details_from_validation_error",
    "is_secret_key",
    "make_envelope",
    "redact",
    "redact_detail",
    "retry_delay",
    "should_retry",
    "traceback_text",
    "unexpected_envelope",
]
