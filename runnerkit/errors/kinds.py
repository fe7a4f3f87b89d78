"""The exception kinds a capability raises, and the HTTP status of each error category.

Each class fixes an ErrorEnvelope category, code and whether a retry may help, so a
capability's author picks a meaning by picking a class; the status table sits here because
:attr:`RunnerError.status` is the one place an error becomes an HTTP answer code.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

#: HTTP status for each error category, used wherever an envelope becomes a response.
STATUS_BY_CATEGORY: dict[str, int] = {
    "VALIDATION_ERROR": 400,
    "SCHEMA_MISMATCH": 500,
    "RUNTIME_ERROR": 500,
    "TIMEOUT": 504,
    "NETWORK_ERROR": 502,
    "AUTHENTICATION_ERROR": 401,
    "AUTHORIZATION_ERROR": 403,
    "RESOURCE_NOT_FOUND": 404,
    "RESOURCE_CONFLICT": 409,
    "RATE_LIMITED": 429,
    "SERVICE_UNAVAILABLE": 503,
    "RUNNER_ERROR": 500,
    "TRUTHCORE_ERROR": 502,
    "INTERNAL_ERROR": 500,
}


class RunnerError(Exception):
    """Base of every error a capability may raise on purpose.

    Subclasses fix ``category``, ``code``, ``severity`` and whether a retry may help; an
    instance may override any of them, and add ``details`` and ``retry_after`` (seconds).
    """

    category = "RUNNER_ERROR"
    code = "RUNNER_ERROR"
    severity = "error"
    retryable = False

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        details: Sequence[Mapping[str, Any]] | None = None,
        retryable: bool | None = None,
        retry_after: float | None = None,
        severity: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if retryable is not None:
            self.retryable = retryable
        if severity is not None:
            self.severity = severity
        # Kept as given (a capability may pass anything); made contract-valid on the way out.
        self.details: list[dict[str, Any]] = [
            dict(d) if isinstance(d, Mapping) else d for d in details or ()
        ]
        self.retry_after = retry_after

    @property
    def status(self) -> int:
        """The HTTP status this error is answered with (500 for a category not in the contract)."""
        return STATUS_BY_CATEGORY.get(self.category, 500)


class ValidationFailed(RunnerError):
    """The input is wrong; retrying the same input cannot help."""

    category = "VALIDATION_ERROR"
    code = "VALIDATION_FAILED"


class UnsupportedMediaType(ValidationFailed):
    """The body is not JSON at all (HTTP 415), as opposed to JSON that fails validation."""

    code = "UNSUPPORTED_MEDIA_TYPE"

    @property
    def status(self) -> int:
        return 415


class PayloadTooLarge(ValidationFailed):
    """The body is larger than the runner accepts (HTTP 413)."""

    code = "PAYLOAD_TOO_LARGE"

    @property
    def status(self) -> int:
        return 413


class SchemaMismatch(RunnerError):
    """A capability returned something its own ``Output`` schema rejects: its bug."""

    category = "SCHEMA_MISMATCH"
    code = "OUTPUT_SCHEMA_MISMATCH"


class NotFound(RunnerError):
    """Something the job refers to does not exist."""

    category = "RESOURCE_NOT_FOUND"
    code = "NOT_FOUND"


class Conflict(RunnerError):
    """The job clashes with the current state of a resource."""

    category = "RESOURCE_CONFLICT"
    code = "CONFLICT"


class RateLimited(RunnerError):
    """Too much work right now; retry after ``retry_after`` seconds."""

    category = "RATE_LIMITED"
    code = "RATE_LIMITED"
    retryable = True


class Unavailable(RunnerError):
    """A dependency is down or the runner is not taking work; a retry later may succeed."""

    category = "SERVICE_UNAVAILABLE"
    code = "SERVICE_UNAVAILABLE"
    retryable = True


class Timeout(RunnerError):
    """The job did not finish before its deadline."""

    category = "TIMEOUT"
    code = "TIMEOUT"
    retryable = True


class Unauthenticated(RunnerError):
    """The caller could not be authenticated."""

    category = "AUTHENTICATION_ERROR"
    code = "UNAUTHENTICATED"
