"""marshmallow mirrors of the ControlPlane wire contracts (CONTRACTS.md, version 1.0.0).

Every schema strips unknown keys, applies defaults only to absent keys, rejects null and
never coerces types, as the Zod originals do. ``SCHEMAS`` maps contract names to schemas.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from marshmallow import Schema

from .base import NONNEGATIVE, PERCENT, POSITIVE, UNIT_INTERVAL, ContractSchema, one_of
from .common import (
    CONTRACT_VERSION,
    SEMVER_RE,
    ContractVersionSchema,
    format_version,
    is_compatible,
    parse_version,
)
from .errors import (
    CONTRACT_DEFAULT_RETRY_POLICY,
    DEFAULT_NON_RETRYABLE_CATEGORIES,
    DEFAULT_RETRYABLE_CATEGORIES,
    ERROR_CATEGORIES,
    JOB_DEFAULT_RETRY_POLICY,
    SEVERITIES,
    ErrorDetailSchema,
    ErrorEnvelopeSchema,
    RetryPolicySchema,
    job_default_retry_policy,
)
from .fields import (
    AnyJSON,
    Object,
    Record,
    StrictBoolean,
    StrictInteger,
    StrictNumber,
    StrictString,
    StringList,
    URLString,
    UUIDString,
    ZDateTime,
    format_timestamp,
    is_absolute_url,
    is_uuid,
    is_zdatetime,
    new_uuid,
    parse_timestamp,
    utc_now,
)
from .health import HEALTH_STATUSES, HealthCheckItemSchema, HealthCheckSchema, http_status_for
from .jobs import (
    JOB_EVENT_TYPES,
    JOB_STATUSES,
    JobEventMetadataSchema,
    JobEventSchema,
    JobMetadataSchema,
    JobPayloadSchema,
    JobRequestSchema,
    JobResponseSchema,
    JobResultMetadataSchema,
    JobResultSchema,
    PaginatedResponseSchema,
    load_job_request,
    paginated,
    paginated_schema,
)
from .runners import (
    HEARTBEAT_STATUSES,
    RUNNER_STATUSES,
    ExecutionMetadataSchema,
    HeartbeatMetricsSchema,
    ModuleManifestSchema,
    ResourceRequirementsSchema,
    RunnerCapabilitySchema,
    RunnerExecutionRequestSchema,
    RunnerExecutionResponseSchema,
    RunnerHeartbeatSchema,
    RunnerMetadataSchema,
    RunnerRegistrationRequestSchema,
    RunnerRegistrationResponseSchema,
    load_execution_request,
)
from .truth import (
    TruthAssertionSchema,
    TruthFiltersSchema,
    TruthPatternSchema,
    TruthQueryResultSchema,
    TruthQuerySchema,
)

#: Contract name (as in CONTRACTS.md) → schema class.
SCHEMAS: dict[str, type[Schema]] = {
    "ContractVersion": ContractVersionSchema,
    "RunnerCapability": RunnerCapabilitySchema,
    "RunnerRegistrationRequest": RunnerRegistrationRequestSchema,
    "RunnerRegistrationResponse": RunnerRegistrationResponseSchema,
    "RunnerHeartbeat": RunnerHeartbeatSchema,
    "RunnerMetadata": RunnerMetadataSchema,
    "RunnerExecutionRequest": RunnerExecutionRequestSchema,
    "RunnerExecutionResponse": RunnerExecutionResponseSchema,
    "ModuleManifest": ModuleManifestSchema,
    "ErrorEnvelope": ErrorEnvelopeSchema,
    "ErrorDetail": ErrorDetailSchema,
    "RetryPolicy": RetryPolicySchema,
    "JobPayload": JobPayloadSchema,
    "JobMetadata": JobMetadataSchema,
    "JobRequest": JobRequestSchema,
    "JobResult": JobResultSchema,
    "JobResponse": JobResponseSchema,
    "JobEvent": JobEventSchema,
    "TruthAssertion": TruthAssertionSchema,
    "TruthQuery": TruthQuerySchema,
    "TruthQueryResult": TruthQueryResultSchema,
    "HealthCheck": HealthCheckSchema,
}


def validate(schema: str | Schema | type[Schema], data: Any) -> dict[str, Any]:
    """Check ``data`` against a contract; marshmallow's error messages, ``{}`` when valid.

    ``schema`` is a name from ``SCHEMAS``, a schema class or a schema instance. An unknown
    name raises KeyError.
    """
    if isinstance(schema, str):
        instance: Schema = SCHEMAS[schema]()
    elif isinstance(schema, Schema):
        instance = schema
    else:
        instance = schema()
    errors: Mapping[str, Any] = instance.validate(data)
    return dict(errors)


__all__ = [
    "CONTRACT_DEFAULT_RETRY_POLICY",
    "CONTRACT_VERSION",
    "DEFAULT_NON_RETRYABLE_CATEGORIES",
    "DEFAULT_RETRYABLE_CATEGORIES",
    "ERROR_CATEGORIES",
    "HEALTH_STATUSES",
    "HEARTBEAT_STATUSES",
    "JOB_DEFAULT_RETRY_POLICY",
    "JOB_EVENT_TYPES",
    "JOB_STATUSES",
    "NONNEGATIVE",
    "PERCENT",
    "POSITIVE",
    "RUNNER_STATUSES",
    "SCHEMAS",
    "SEMVER_RE",
    "SEVERITIES",
    "UNIT_INTERVAL",
    "AnyJSON",
    "ContractSchema",
    "ContractVersionSchema",
    "ErrorDetailSchema",
    "ErrorEnvelopeSchema",
    "ExecutionMetadataSchema",
    "HealthCheckItemSchema",
    "HealthCheckSchema",
    "HeartbeatMetricsSchema",
    "JobEventMetadataSchema",
    "JobEventSchema",
    "JobMetadataSchema",
    "JobPayloadSchema",
    "JobRequestSchema",
    "JobResponseSchema",
    "JobResultMetadataSchema",
    "JobResultSchema",
    "ModuleManifestSchema",
    "Object",
    "PaginatedResponseSchema",
    "Record",
    "ResourceRequirementsSchema",
    "RetryPolicySchema",
    "RunnerCapabilitySchema",
    "RunnerExecutionRequestSchema",
    "RunnerExecutionResponseSchema",
    "RunnerHeartbeatSchema",
    "RunnerMetadataSchema",
    "RunnerRegistrationRequestSchema",
    "RunnerRegistrationResponseSchema",
    "StrictBoolean",
    "StrictInteger",
    "StrictNumber",
    "StrictString",
    "StringList",
    "TruthAssertionSchema",
    "TruthFiltersSchema",
    "TruthPatternSchema",
    "TruthQueryResultSchema",
    "TruthQuerySchema",
    "URLString",
    "UUIDString",
    "ZDateTime",
    "format_timestamp",
    "format_version",
    "http_status_for",
    "is_absolute_url",
    "is_compatible",
    "is_uuid",
    "is_zdatetime",
    "job_default_retry_policy",
    "load_execution_request",
    "load_job_request",
    "new_uuid",
    "one_of",
    "paginated",
    "paginated_schema",
    "parse_timestamp",
    "parse_version",
    "utc_now",
    "validate",
]
