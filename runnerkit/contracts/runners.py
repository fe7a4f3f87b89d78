"""Runner registration, heartbeat, execution and manifest contracts (``types/runners.ts``)."""

from __future__ import annotations

import math
from typing import Any

from marshmallow import fields

from .base import NONNEGATIVE, PERCENT, POSITIVE, ContractSchema, one_of
from .common import ContractVersionSchema
from .errors import ErrorEnvelopeSchema
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
    URLString,
    UUIDString,
    ZDateTime,
    is_uuid,
)

__all__ = [
    "HEARTBEAT_STATUSES",
    "RUNNER_STATUSES",
    "ExecutionMetadataSchema",
    "HeartbeatMetricsSchema",
    "ModuleManifestSchema",
    "ResourceRequirementsSchema",
    "RunnerCapabilitySchema",
    "RunnerExecutionRequestSchema",
    "RunnerExecutionResponseSchema",
    "RunnerHeartbeatSchema",
    "RunnerMetadataSchema",
    "RunnerRegistrationRequestSchema",
    "RunnerRegistrationResponseSchema",
    "load_execution_request",
]

#: What a runner may report about itself in a heartbeat.
HEARTBEAT_STATUSES: tuple[str, ...] = ("healthy", "degraded", "unhealthy")
#: What JobForge records about a runner (adds ``offline`` for missed heartbeats).
RUNNER_STATUSES: tuple[str, ...] = ("healthy", "degraded", "unhealthy", "offline")


class ResourceRequirementsSchema(ContractSchema):
    """``{cpu?, memory?, gpu}``; ``gpu`` defaults to false."""

    cpu = StrictString()
    memory = StrictString()
    gpu = StrictBoolean(load_default=False)


class RunnerCapabilitySchema(ContractSchema):
    """One thing a runner can do, as advertised at registration."""

    id = StrictString(required=True)
    name = StrictString(required=True)
    version = StrictString(required=True)
    description = StrictString(required=True)
    inputSchema = Record(required=True)
    outputSchema = Record(required=True)
    supportedJobTypes = StringList(required=True)
    maxConcurrency = StrictInteger(load_default=1, validate=POSITIVE)
    timeoutMs = StrictNumber(load_default=30000, validate=POSITIVE)
    resourceRequirements = Object(ResourceRequirementsSchema, default_empty=True)


class RunnerRegistrationRequestSchema(ContractSchema):
    """Runner → JobForge, ``POST /runners/register``."""

    name = StrictString(required=True)
    version = StrictString(required=True)
    contractVersion = Object(ContractVersionSchema, required=True)
    capabilities = fields.List(Object(RunnerCapabilitySchema), required=True)
    healthCheckEndpoint = URLString(required=True)
    tags = StringList(load_default=list)


class RunnerRegistrationResponseSchema(ContractSchema):
    """JobForge → runner: the assigned ``runnerId`` and heartbeat interval."""

    runnerId = UUIDString(required=True)
    registeredAt = ZDateTime(required=True)
    heartbeatIntervalMs = StrictNumber(load_default=30000, validate=POSITIVE)


class HeartbeatMetricsSchema(ContractSchema):
    """Optional load figures carried by a heartbeat."""

    cpuUsage = StrictNumber(validate=PERCENT)
    memoryUsage = StrictNumber(validate=PERCENT)
    jobThroughput = StrictNumber(validate=NONNEGATIVE)


class RunnerHeartbeatSchema(ContractSchema):
    """Runner → JobForge, ``POST /runners/heartbeat``."""

    runnerId = UUIDString(required=True)
    timestamp = ZDateTime(required=True)
    status = StrictString(required=True, validate=one_of(HEARTBEAT_STATUSES))
    activeJobs = StrictInteger(load_default=0, validate=NONNEGATIVE)
    queuedJobs = StrictInteger(load_default=0, validate=NONNEGATIVE)
    metrics = Object(HeartbeatMetricsSchema, default_empty=True)


class RunnerMetadataSchema(ContractSchema):
    """What JobForge keeps about a registered runner."""

    id = UUIDString(required=True)
    name = StrictString(required=True)
    version = StrictString(required=True)
    contractVersion = Object(ContractVersionSchema, required=True)
    capabilities = fields.List(Object(RunnerCapabilitySchema), required=True)
    supportedContracts = StringList(required=True)
    healthCheckEndpoint = URLString(required=True)
    registeredAt = ZDateTime(required=True)
    lastHeartbeatAt = ZDateTime(required=True)
    status = StrictString(load_default="healthy", validate=one_of(RUNNER_STATUSES))
    tags = StringList(load_default=list)


class ExecutionMetadataSchema(ContractSchema):
    """``RunnerExecutionRequest.metadata``: ``{correlationId?, userId?}``."""

    correlationId = UUIDString()
    userId = StrictString()


class RunnerExecutionRequestSchema(ContractSchema):
    """JobForge → runner, ``POST /execute``."""

    jobId = UUIDString(required=True)
    moduleId = StrictString(required=True)
    capabilityId = StrictString(required=True)
    payload = Record(required=True)
    timeoutMs = StrictNumber(load_default=30000, validate=POSITIVE)
    metadata = Object(ExecutionMetadataSchema, default_empty=True)


_EXECUTION_REQUEST = RunnerExecutionRequestSchema()


def load_execution_request(body: Any) -> dict[str, Any]:
    """``RunnerExecutionRequestSchema().load(body)``, quicker for a well-formed request.

    Every job passes through here, and the schema's generic machinery costs more than the
    rest of a trivial job's validation. A body whose six fields all have the plain types the
    contract asks for is loaded by hand to exactly what the schema would return; anything
    else, an error included, goes through the schema, which alone words the error details.
    """
    fast = _load_execution_request_fast(body)
    if fast is not None:
        return fast
    loaded: dict[str, Any] = _EXECUTION_REQUEST.load(body)
    return loaded


def _load_execution_request_fast(body: Any) -> dict[str, Any] | None:
    """The schema's result for a plainly valid body, or None to let the schema decide."""
    if type(body) is not dict:
        return None
    job_id = body.get("jobId")
    module_id = body.get("moduleId")
    capability_id = body.get("capabilityId")
    payload = body.get("payload")
    if not (
        is_uuid(job_id)
        and type(module_id) is str
        and type(capability_id) is str
        and type(payload) is dict
        and PROTO_KEY not in payload
    ):
        return None
    timeout_ms = body.get("timeoutMs", 30000)
    kind = type(timeout_ms)
    if not ((kind is int or (kind is float and math.isfinite(timeout_ms))) and timeout_ms > 0):
        return None
    metadata: dict[str, Any] = {}
    if "metadata" in body:
        given = body["metadata"]
        if type(given) is not dict:
            return None
        if "correlationId" in given:
            if not is_uuid(given["correlationId"]):
                return None
            metadata["correlationId"] = given["correlationId"]
        if "userId" in given:
            if type(given["userId"]) is not str:
                return None
            metadata["userId"] = given["userId"]
    return {
        "jobId": job_id,
        "moduleId": module_id,
        "capabilityId": capability_id,
        "payload": dict(payload),
        "timeoutMs": timeout_ms,
        "metadata": metadata,
    }


class RunnerExecutionResponseSchema(ContractSchema):
    """Runner → JobForge: the outcome of one execution."""

    jobId = UUIDString(required=True)
    success = StrictBoolean(required=True)
    data = AnyJSON()
    error = Object(ErrorEnvelopeSchema)
    executionTimeMs = StrictNumber(required=True, validate=NONNEGATIVE)
    runnerId = UUIDString(required=True)


class ModuleManifestSchema(ContractSchema):
    """A module's static description: entry point, capabilities, config."""

    id = StrictString(required=True)
    name = StrictString(required=True)
    version = StrictString(required=True)
    description = StrictString(required=True)
    entryPoint = StrictString(required=True)
    contractVersion = Object(ContractVersionSchema, required=True)
    capabilities = fields.List(Object(RunnerCapabilitySchema), required=True)
    dependencies = StringList(load_default=list)
    configSchema = Record()
    defaultConfig = Record(load_default=dict)
