"""ErrorEnvelope, ErrorDetail and RetryPolicy (``errors/index.ts``)."""

from __future__ import annotations

from typing import Any

from marshmallow import fields

from .base import NONNEGATIVE, POSITIVE, ContractSchema, one_of
from .common import ContractVersionSchema
from .fields import (
    AnyJSON,
    Object,
    StrictBoolean,
    StrictInteger,
    StrictNumber,
    StrictString,
    StringList,
    UUIDString,
    ZDateTime,
)

__all__ = [
    "CONTRACT_DEFAULT_RETRY_POLICY",
    "DEFAULT_NON_RETRYABLE_CATEGORIES",
    "DEFAULT_RETRYABLE_CATEGORIES",
    "ERROR_CATEGORIES",
    "JOB_DEFAULT_RETRY_POLICY",
    "SEVERITIES",
    "ErrorDetailSchema",
    "ErrorEnvelopeSchema",
    "RetryPolicySchema",
    "job_default_retry_policy",
]

#: The 14 ErrorCategory values. ``RATE_LIMIT`` and ``CONFLICT`` (seen in some docs) are not.
ERROR_CATEGORIES: tuple[str, ...] = (
    "VALIDATION_ERROR",
    "SCHEMA_MISMATCH",
    "RUNTIME_ERROR",
    "TIMEOUT",
    "NETWORK_ERROR",
    "AUTHENTICATION_ERROR",
    "AUTHORIZATION_ERROR",
    "RESOURCE_NOT_FOUND",
    "RESOURCE_CONFLICT",
    "RATE_LIMITED",
    "SERVICE_UNAVAILABLE",
    "RUNNER_ERROR",
    "TRUTHCORE_ERROR",
    "INTERNAL_ERROR",
)

SEVERITIES: tuple[str, ...] = ("fatal", "error", "warning", "info")

DEFAULT_RETRYABLE_CATEGORIES: tuple[str, ...] = (
    "TIMEOUT",
    "NETWORK_ERROR",
    "SERVICE_UNAVAILABLE",
    "RUNTIME_ERROR",
)
DEFAULT_NON_RETRYABLE_CATEGORIES: tuple[str, ...] = (
    "VALIDATION_ERROR",
    "SCHEMA_MISMATCH",
    "AUTHENTICATION_ERROR",
    "AUTHORIZATION_ERROR",
    "RESOURCE_NOT_FOUND",
)

#: What RetryPolicySchema loads ``{}`` to (the RetryPolicy table's defaults).
CONTRACT_DEFAULT_RETRY_POLICY: dict[str, Any] = {
    "maxRetries": 3,
    "backoffMs": 1000,
    "maxBackoffMs": 30000,
    "backoffMultiplier": 2,
    "retryableCategories": list(DEFAULT_RETRYABLE_CATEGORIES),
    "nonRetryableCategories": list(DEFAULT_NON_RETRYABLE_CATEGORIES),
}

#: What a JobRequest gets when ``retryPolicy`` is absent: the same numbers, both lists empty.
JOB_DEFAULT_RETRY_POLICY: dict[str, Any] = {
    **CONTRACT_DEFAULT_RETRY_POLICY,
    "retryableCategories": [],
    "nonRetryableCategories": [],
}


def _category_list(default: tuple[str, ...]) -> fields.List:
    """A list of ErrorCategory values whose default is a fresh copy of ``default``."""
    return fields.List(
        StrictString(validate=one_of(ERROR_CATEGORIES)), load_default=lambda: list(default)
    )


class ErrorDetailSchema(ContractSchema):
    """One problem inside an envelope: ``message`` plus optional ``path``, ``code``, ``value``."""

    message = StrictString(required=True)
    path = StringList()
    code = StrictString()
    value = AnyJSON()


class ErrorEnvelopeSchema(ContractSchema):
    """The one error shape every ControlPlane service emits and accepts."""

    id = UUIDString(required=True)
    timestamp = ZDateTime(required=True)
    category = StrictString(required=True, validate=one_of(ERROR_CATEGORIES))
    severity = StrictString(required=True, validate=one_of(SEVERITIES))
    code = StrictString(required=True)
    message = StrictString(required=True)
    details = fields.List(Object(ErrorDetailSchema), load_default=list)
    service = StrictString(required=True)
    operation = StrictString()
    correlationId = UUIDString()
    causationId = UUIDString()
    retryable = StrictBoolean(load_default=False)
    retryAfter = StrictNumber(validate=NONNEGATIVE)
    contractVersion = Object(ContractVersionSchema, required=True)


class RetryPolicySchema(ContractSchema):
    """Retry limits and backoff; a partial policy gets the table's defaults per key.

    JobRequest uses ``JOB_DEFAULT_RETRY_POLICY`` (empty category lists) when the whole
    ``retryPolicy`` key is absent, which is not what loading ``{}`` here gives.
    """

    maxRetries = StrictInteger(load_default=3, validate=NONNEGATIVE)
    backoffMs = StrictNumber(load_default=1000, validate=NONNEGATIVE)
    maxBackoffMs = StrictNumber(load_default=30000, validate=NONNEGATIVE)
    backoffMultiplier = StrictNumber(load_default=2, validate=POSITIVE)
    retryableCategories = _category_list(DEFAULT_RETRYABLE_CATEGORIES)
    nonRetryableCategories = _category_list(DEFAULT_NON_RETRYABLE_CATEGORIES)


def job_default_retry_policy() -> dict[str, Any]:
    """A fresh copy of ``JOB_DEFAULT_RETRY_POLICY`` (used as JobRequest's load_default).

    Its values are numbers and lists of strings: copying the lists is a deep copy, at a
    fraction of ``copy.deepcopy``'s cost (every ``POST /jobs`` without a policy makes one).
    """
    return {
        key: list(value) if isinstance(value, list) else value
        for key, value in JOB_DEFAULT_RETRY_POLICY.items()
    }
