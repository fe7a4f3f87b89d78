"""Signed execution requests: the ControlPlane webhook scheme, without its two weaknesses.

JobForge signs each request it sends to a runner::

    x-webhook-signature: v1=<hex HMAC-SHA256(secret, "<timestamp>.<raw body bytes>")>
    x-webhook-timestamp: <unix epoch milliseconds>
    x-webhook-event-id:  <id>

:func:`sign` produces those headers (for any JobForge written in Python) and :func:`verify`
checks them before anything else looks at the request. Unlike ControlPlane's own verifier, a
missing timestamp is a failure (it would skip the replay window), and nothing is recorded
about a request before its signature has been checked.

The event id is not covered by the signature, so anyone holding a captured request can change
it: replays are recognised by :func:`request_digest` instead, a digest of exactly what the
signature covers (timestamp and body), the same whichever of the rotating secrets signed it.
"""

from __future__ import annotations

import hashlib
import hmac
import time
import uuid
from collections.abc import Iterable, Mapping

SIGNATURE_HEADER = "x-webhook-signature"
TIMESTAMP_HEADER = "x-webhook-timestamp"
EVENT_ID_HEADER = "x-webhook-event-id"
SCHEME = "v1"

#: Requests older than this are refused (seconds).
DEFAULT_MAX_AGE_S = 300.0
#: Requests stamped further in the future than this are refused (seconds).
DEFAULT_MAX_FUTURE_S = 60.0


class SignatureError(Exception):
    """A request failed verification; ``code`` is short and tells an attacker nothing more."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _digest(secret: str, timestamp: str, body: bytes) -> str:
    mac = hmac.new(secret.encode("utf-8"), digestmod=hashlib.sha256)
    mac.update(timestamp.encode("ascii"))
    mac.update(b".")
    mac.update(body)
    return mac.hexdigest()


def request_digest(headers: Mapping[str, str], body: bytes) -> bytes:
    """The identity of a verified signed request: SHA-256 of ``"<timestamp>.<body>"``.

    It covers what the signature covers and nothing else, so a copy with another (or no)
    ``x-webhook-event-id`` is the same request, and so is the same content signed with the
    previous secret during a rotation; JobForge's own retries are signed with a new timestamp
    and are new requests. Call it only after :func:`verify` accepted ``headers`` and ``body``.
    """
    digest = hashlib.sha256((headers.get(TIMESTAMP_HEADER) or "").encode("ascii"))
    digest.update(b".")
    digest.update(body)  # no copy of the body, however large
    return digest.digest()


def sign(
    body: bytes,
    secret: str,
    *,
    timestamp_ms: int | None = None,
    event_id: str | None = None,
) -> dict[str, str]:
    """The three headers that make ``body`` a signed request."""
    if not secret:
        raise ValueError("a signing secret is required")
    stamp = str(int(time.time() * 1000) if timestamp_ms is None else timestamp_ms)
    return {
        SIGNATURE_HEADER: f"{SCHEME}={_digest(secret, stamp, body)}",
        TIMESTAMP_HEADER: stamp,
        EVENT_ID_HEADER: event_id or str(uuid.uuid4()),
    }


def verify(
    headers: Mapping[str, str],
    body: bytes,
    secrets: Iterable[str],
    *,
    now_ms: int | None = None,
    max_age_s: float = DEFAULT_MAX_AGE_S,
    max_future_s: float = DEFAULT_MAX_FUTURE_S,
) -> str:
    """Check a signed request; returns its event id ("" when absent), raises
    :class:`SignatureError`. The event id is not signed: key replays on :func:`request_digest`.

    Any of ``secrets`` may have signed it (two at once during a rotation). Comparison is in
    constant time. ``headers`` lookups must be case-insensitive (werkzeug's are).
    """
    keys = [s for s in secrets if s]
    if not keys:
        raise SignatureError("NO_SECRET", "no signing secret is configured")
    signature = headers.get(SIGNATURE_HEADER) or ""
    stamp = headers.get(TIMESTAMP_HEADER) or ""
    if not signature:
        raise SignatureError("SIGNATURE_MISSING", "the request is not signed")
    if not stamp:
        raise SignatureError("TIMESTAMP_MISSING", "the signature has no timestamp")
    if not stamp.isascii() or not stamp.isdigit() or len(stamp) > 16:
        raise SignatureError("TIMESTAMP_INVALID", "the signature timestamp is not valid")
    now = int(time.time() * 1000) if now_ms is None else now_ms
    age_ms = now - int(stamp)
    if age_ms > max_age_s * 1000:
        raise SignatureError("TIMESTAMP_EXPIRED", "the signature has expired")
    if -age_ms > max_future_s * 1000:
        raise SignatureError("TIMESTAMP_IN_FUTURE", "the signature timestamp is in the future")
    scheme, _, given = signature.partition("=")
    # compare_digest refuses non-ASCII text (TypeError): such a signature is simply wrong.
    if scheme != SCHEME or not given or not given.isascii():
        raise SignatureError("SIGNATURE_INVALID", "the signature is not valid")
    valid = False
    for key in keys:
        # Check every key, so the time taken does not tell which one matched.
        valid |= hmac.compare_digest(_digest(key, stamp, body), given.strip().lower())
    if not valid:
        raise SignatureError("SIGNATURE_INVALID", "the signature is not valid")
    return headers.get(EVENT_ID_HEADER) or ""
