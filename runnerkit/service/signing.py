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
    """A request failed verification.

    ``message`` says which check failed (missing, stale or future, wrong) so that an operator
    can fix the sender; it never holds a secret or the signature that was expected.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _digest(secret: str, timestamp: str, body: bytes) -> str:
    # One call into OpenSSL: an hmac.HMAC object and its updates cost more than the hashing
    # of a job request does (the copy of the body is cheaper than either).
    message = timestamp.encode("ascii") + b"." + body
    return hmac.digest(secret.encode("utf-8"), message, "sha256").hex()


def _seconds(ms: int) -> str:
    """A time difference for a message: ``412 s``, or ``2.5 s`` below ten seconds."""
    return f"{ms / 1000:.1f} s" if ms < 10_000 else f"{ms // 1000} s"


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


def replay_key(headers: Mapping[str, str], body: bytes) -> bytes:
    """What the ledger keeps of a verified signed request to refuse a replay of it: the
    signed timestamp (8 bytes, big-endian milliseconds), then :func:`request_digest`.

    Led by the timestamp, the keys of a stream of requests come in about ascending order, so
    recording one adds to the end of the ledger's index instead of a random page of it: a
    quarter of the CPU, a seventh of the WAL (measured with 100,000 keys kept). Call it only
    after :func:`verify` accepted ``headers`` and ``body`` (the timestamp is then digits).
    """
    stamp = int(headers.get(TIMESTAMP_HEADER) or 0)
    return stamp.to_bytes(8, "big") + request_digest(headers, body)


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
        raise SignatureError(
            "SIGNATURE_MISSING",
            f"The request is not signed: it has no {SIGNATURE_HEADER} header, "
            "and this runner accepts signed requests only",
        )
    if not stamp:
        raise SignatureError(
            "TIMESTAMP_MISSING",
            f"The signature has no {TIMESTAMP_HEADER} header, so its age cannot be checked",
        )
    if not stamp.isascii() or not stamp.isdigit() or len(stamp) > 16:
        raise SignatureError(
            "TIMESTAMP_INVALID",
            f"The {TIMESTAMP_HEADER} header is not a time in Unix epoch milliseconds",
        )
    now = int(time.time() * 1000) if now_ms is None else now_ms
    age_ms = now - int(stamp)
    if age_ms > max_age_s * 1000:
        raise SignatureError(
            "TIMESTAMP_EXPIRED",
            f"The signature is stale: signed {_seconds(age_ms)} ago, and requests signed more "
            f"than {max_age_s:g} s ago are refused (a clock behind, or a request kept too long)",
        )
    if -age_ms > max_future_s * 1000:
        raise SignatureError(
            "TIMESTAMP_IN_FUTURE",
            f"The signature is from the future: signed {_seconds(-age_ms)} ahead of this "
            f"runner's clock, and at most {max_future_s:g} s ahead is accepted (a clock ahead)",
        )
    scheme, _, given = signature.partition("=")
    # compare_digest refuses non-ASCII text (TypeError): such a signature is simply wrong.
    if scheme != SCHEME or not given or not given.isascii():
        raise SignatureError(
            "SIGNATURE_INVALID",
            f"The {SIGNATURE_HEADER} header is not of the form {SCHEME}=<hex HMAC-SHA256>",
        )
    valid = False
    given = given.strip().lower()
    for key in keys:
        # Check every key, so the time taken does not tell which one matched.
        valid |= hmac.compare_digest(_digest(key, stamp, body), given)
    if not valid:
        raise SignatureError(
            "SIGNATURE_INVALID",
            "The signature does not match the request: it was signed with another secret, "
            "or its body or timestamp changed after signing",
        )
    return headers.get(EVENT_ID_HEADER) or ""
