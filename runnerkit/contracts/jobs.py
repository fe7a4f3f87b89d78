"""Job submission, status, result and event contracts (``types/jobs.ts``)."""

from __future__ import annotations

from functools import cache

from marshmallow import Schema, fields

from .base import NONNEGATIVE, PERCENT, POSITIVE, ContractSchema, one_of
from .errors import ErrorEnvelopeSchema, RetryPolicySchema, job_default_retry_policy
from .fields import (
    AnyJSON,
    Object,
    Record,
    StrictBoolean,
    StrictInteger,
    StrictNumber,
    StrictString,
    StringList,
    UUIDString,
    ZDateTime,
)

__all__ = [
    "JOB_EVENT_TYPES",
    "JOB_STATUSES",
    "JobEventMetadataSchema",
    "JobEventSchema",
    "JobMetadataSchema",
    "JobPayloadSchema",
    "JobRequestSchema",
    "JobResponseSchema",
    "JobResultMetadataSchema",
    "JobResultSchema",
    "PaginatedResponseSchema",
    "paginated_schema",
]

JOB_STATUSES: tuple[str, ...] = (
    "pending",
    "queued",
    "running",
    "completed",
    "failed",
    "cancelled",
    "retrying",
)

JOB_EVENT_TYPES: tuple[str, ...] = (
    "job.created",
    "job.queued",
    "job.started",
    "job.progress",
    "job.completed",
    "job.failed",
    "job.cancelled",
    "job.retrying",
    "job.expired",
)


class JobPayloadSchema(ContractSchema):
    """What the job is about: ``type``, ``version`` (default 1.0.0), ``data``, ``options``."""

    type = StrictString(required=True)
    version = StrictString(load_default="1.0.0")
    data = Record(required=True)
    options = Record(load_default=dict)


class JobMetadataSchema(ContractSchema):
    """Who submitted the job and when; required on every JobRequest."""

    source = StrictString(required=True)
    userId = StrictString()
    sessionId = StrictString()
    correlationId = UUIDString()
    causationId = UUIDString()
    tags = StringList(load_default=list)
    createdAt = ZDateTime(required=True)
    scheduledAt = ZDateTime()
    expiresAt = ZDateTime()


class JobRequestSchema(ContractSchema):
    """Client → JobForge, ``POST /jobs``.

    An absent ``retryPolicy`` becomes ``JOB_DEFAULT_RETRY_POLICY`` (empty category lists);
    a partial one is completed with RetryPolicy's own defaults (the contract's lists).
    """

    id = UUIDString(required=True)
    type = StrictString(required=True)
    priority = StrictInteger(load_default=50, validate=PERCENT)
    payload = Object(JobPayloadSchema, required=True)
    metadata = Object(JobMetadataSchema, required=True)
    retryPolicy = Object(RetryPolicySchema, load_default=job_default_retry_policy)
    timeoutMs = StrictNumber(load_default=30000, validate=POSITIVE)


class JobResultMetadataSchema(ContractSchema):
    """Timing and provenance of a job result."""

    startedAt = ZDateTime()
    completedAt = ZDateTime(required=True)
    durationMs = StrictNumber(required=True, validate=NONNEGATIVE)
    attempts = StrictInteger(load_default=1, validate=POSITIVE)
    runnerId = StrictString()
    runnerVersion = StrictString()


class JobResultSchema(ContractSchema):
    """The outcome JobForge stores for a job."""

    success = StrictBoolean(required=True)
    data = AnyJSON()
    error = Object(ErrorEnvelopeSchema)
    metadata = Object(JobResultMetadataSchema, required=True)


class JobResponseSchema(ContractSchema):
    """``GET /jobs/{id}`` and the 202 answer to ``POST /jobs``."""

    id = UUIDString(required=True)
    status = StrictString(required=True, validate=one_of(JOB_STATUSES))
    request = Object(JobRequestSchema, required=True)
    result = Object(JobResultSchema)
    error = Object(ErrorEnvelopeSchema)
    updatedAt = ZDateTime(required=True)


class JobEventMetadataSchema(ContractSchema):
    """The emitting service and its version."""

    service = StrictString(required=True)
    version = StrictString(required=True)


class JobEventSchema(ContractSchema):
    """A job lifecycle event (``job.created`` ... ``job.expired``)."""

    id = UUIDString(required=True)
    type = StrictString(required=True, validate=one_of(JOB_EVENT_TYPES))
    jobId = UUIDString(required=True)
    timestamp = ZDateTime(required=True)
    data = Record()
    metadata = Object(JobEventMetadataSchema, required=True)


class PaginatedResponseSchema(ContractSchema):
    """``{items, total, limit, offset, hasMore}`` for list endpoints (``GET /jobs``...).

    A runnerkit forge convenience, not a ControlPlane contract; ``items`` are not checked
    here. Use ``paginated_schema(ItemSchema)`` for a typed variant.
    """

    items = fields.List(AnyJSON(), required=True)
    total = StrictInteger(required=True, validate=NONNEGATIVE)
    limit = StrictInteger(required=True, validate=NONNEGATIVE)
    offset = StrictInteger(required=True, validate=NONNEGATIVE)
    hasMore = StrictBoolean(required=True)


@cache
def paginated_schema(item_schema: type[Schema]) -> type[Schema]:
    """A PaginatedResponseSchema whose ``items`` are loaded with ``item_schema``."""
    return PaginatedResponseSchema.from_dict(
        {"items": fields.List(Object(item_schema), required=True)},
        name=f"Paginated{item_schema.__name__}",
    )
