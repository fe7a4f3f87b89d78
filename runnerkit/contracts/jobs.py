"""Job submission, status, result and event contracts (``types/jobs.ts``)."""

from __future__ import annotations

import math
from functools import cache
from typing import Any

from marshmallow import Schema, fields

from .base import NONNEGATIVE, PERCENT, POSITIVE, ContractSchema, one_of
from .errors import ErrorEnvelopeSchema, RetryPolicySchema, job_default_retry_policy
from .fields import (
    PROTO_KEY,
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
    is_uuid,
    is_zdatetime,
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
    "load_job_request",
    "paginated",
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


_JOB_REQUEST = JobRequestSchema()


def load_job_request(body: Any) -> dict[str, Any]:
    """``JobRequestSchema().load(body)``, quicker for a well-formed request.

    Every ``POST /jobs`` of the forge comes through here, and the schema's generic machinery
    (three nested schemas, a dozen fields) costs more than the rest of taking the job. A body
    whose fields all have the plain types the contract asks for is loaded by hand to exactly
    what the schema would return; anything else (a ``retryPolicy`` of its own, a value to
    coerce, an error) goes through the schema, which alone words the error details.
    """
    fast = _load_job_request_fast(body)
    if fast is not None:
        return fast
    loaded: dict[str, Any] = _JOB_REQUEST.load(body)
    return loaded


_OPTIONAL_STRINGS = ("userId", "sessionId")
_OPTIONAL_UUIDS = ("correlationId", "causationId")
_OPTIONAL_TIMES = ("scheduledAt", "expiresAt")


def _load_job_request_fast(body: Any) -> dict[str, Any] | None:
    """The schema's result for a plainly valid body, or None to let the schema decide."""
    if type(body) is not dict or "retryPolicy" in body:
        return None
    job_id, job_type = body.get("id"), body.get("type")
    priority = body.get("priority", 50)
    timeout_ms = body.get("timeoutMs", 30000)
    kind = type(timeout_ms)
    if not (
        is_uuid(job_id)
        and type(job_type) is str
        and type(priority) is int
        and 0 <= priority <= 100
        and (kind is int or (kind is float and math.isfinite(timeout_ms)))
        and timeout_ms > 0
    ):
        return None
    payload = _job_payload(body.get("payload"))
    metadata = _job_metadata(body.get("metadata"))
    if payload is None or metadata is None:
        return None
    return {
        "id": job_id,
        "type": job_type,
        "priority": priority,
        "payload": payload,
        "metadata": metadata,
        "retryPolicy": job_default_retry_policy(),
        "timeoutMs": timeout_ms,
    }


def _job_payload(given: Any) -> dict[str, Any] | None:
    if type(given) is not dict:
        return None
    payload_type, version = given.get("type"), given.get("version", "1.0.0")
    data, options = given.get("data"), given.get("options", {})
    if not (
        type(payload_type) is str
        and type(version) is str
        and type(data) is dict
        and type(options) is dict
        and PROTO_KEY not in data
        and PROTO_KEY not in options
    ):
        return None
    return {"type": payload_type, "version": version, "data": dict(data), "options": dict(options)}


def _job_metadata(given: Any) -> dict[str, Any] | None:
    if type(given) is not dict:
        return None
    source, created, tags = given.get("source"), given.get("createdAt"), given.get("tags", [])
    if not (
        type(source) is str
        and is_zdatetime(created)
        and type(tags) is list
        and all(type(tag) is str for tag in tags)
    ):
        return None
    metadata: dict[str, Any] = {"source": source}
    for key in _OPTIONAL_STRINGS:
        if key in given:
            if type(given[key]) is not str:
                return None
            metadata[key] = given[key]
    for key in _OPTIONAL_UUIDS:
        if key in given:
            if not is_uuid(given[key]):
                return None
            metadata[key] = given[key]
    metadata["tags"] = list(tags)
    metadata["createdAt"] = created
    for key in _OPTIONAL_TIMES:
        if key in given:
            if not is_zdatetime(given[key]):
                return None
            metadata[key] = given[key]
    return metadata


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


def paginated(items: list[Any], total: int, limit: int, offset: int) -> dict[str, Any]:
    """The PaginatedResponse of one page: ``items`` from ``offset`` of ``total``."""
    return {
        "items": items,
        "total": total,
        "limit": limit,
        "offset": offset,
        "hasMore": offset + len(items) < total,
    }


@cache
def paginated_schema(item_schema: type[Schema]) -> type[Schema]:
    """A PaginatedResponseSchema whose ``items`` are loaded with ``item_schema``."""
    return PaginatedResponseSchema.from_dict(
        {"items": fields.List(Object(item_schema), required=True)},
        name=f"Paginated{item_schema.__name__}",
    )
