"""Kept import path: the code lives in :mod:`runnerkit.service.signing`."""

from runnerkit.service.signing import (
    DEFAULT_MAX_AGE_S,
    DEFAULT_MAX_FUTURE_S,
    EVENT_ID_HEADER,
    SCHEME,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    SignatureError,
    request_digest,
    sign,
    verify,
)

__all__ = [
    "DEFAULT_MAX_AGE_S",
    "DEFAULT_MAX_FUTURE_S",
    "EVENT_ID_HEADER",
    "SCHEME",
    "SIGNATURE_HEADER",
    "TIMESTAMP_HEADER",
    "SignatureError",
    "request_digest",
    "sign",
    "verify",
]
