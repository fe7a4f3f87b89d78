"""The forge's OpenAPI 3.1 document, built from the contract schemas that validate its bodies."""

from __future__ import annotations

from typing import Any

from runnerkit._version import __version__
from runnerkit.contracts import (
    ErrorEnvelopeSchema,
    HealthCheckSchema,
    JobEventSchema,
    JobRequestSchema,
    JobResponseSchema,
    RunnerExecutionResponseSchema,
    RunnerHeartbeatSchema,
    RunnerMetadataSchema,
    RunnerRegistrationRequestSchema,
    RunnerRegistrationResponseSchema,
    TruthAssertionSchema,
    TruthQueryResultSchema,
    TruthQuerySchema,
)
from runnerkit.contracts.json_schema import new_spec

_COMPONENTS = (
    ("ErrorEnvelope", ErrorEnvelopeSchema),
    ("HealthCheck", HealthCheckSchema),
    ("JobRequest", JobRequestSchema),
    ("JobResponse", JobResponseSchema),
    ("JobEvent", JobEventSchema),
    ("RunnerRegistrationRequest", RunnerRegistrationRequestSchema),
    ("RunnerRegistrationResponse", RunnerRegistrationResponseSchema),
    ("RunnerHeartbeat", RunnerHeartbeatSchema),
    ("RunnerMetadata", RunnerMetadataSchema),
    ("RunnerExecutionResponse", RunnerExecutionResponseSchema),
    ("TruthAssertion", TruthAssertionSchema),
    ("TruthQuery", TruthQuerySchema),
    ("TruthQueryResult", TruthQueryResultSchema),
)


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _page(item: str) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["items", "total", "limit", "offset", "hasMore"],
        "properties": {
            "items": {"type": "array", "items": _ref(item)},
            "total": {"type": "integer", "minimum": 0},
            "limit": {"type": "integer", "minimum": 0},
            "offset": {"type": "integer", "minimum": 0},
            "hasMore": {"type": "boolean"},
        },
    }


_ERROR = {
    "type": "object",
    "required": ["success", "error"],
    "properties": {"success": {"const": False}, "error": _ref("ErrorEnvelope")},
}
_ERRORS = {
    code: _json(_ERROR, text)
    for code, text in (
        ("400", "Invalid body or query (VALIDATION_ERROR, every problem in details)"),
        ("401", "Missing or wrong bearer token (the TOKEN, or the runner's runnerToken)"),
        ("403", "Not loopback without a TOKEN, another runner's credential, or cross-site"),
        ("404", "Unknown job or runner"),
        ("409", "Conflict"),
        ("413", "Body over MAX_BODY_BYTES"),
        ("415", "Not JSON"),
    )
}


def _op(summary: str, responses: dict[str, Any], body: str | None = None) -> dict[str, Any]:
    operation: dict[str, Any] = {"summary": summary, "responses": {**responses, **_ERRORS}}
    if body:
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": _ref(body)}},
        }
    return operation


def _path_id(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}


def openapi_document(service: str = "jobforge") -> dict[str, Any]:
    """The OpenAPI document of the forge's JSON routes."""
    spec, _ = new_spec(title=service, version=__version__)
    for name, schema in _COMPONENTS:
        if name not in spec.components.schemas:
            spec.components.schema(name, schema=schema)
    job_id, runner_id = [_path_id("job_id")], [_path_id("runner_id")]
    paths: dict[str, dict[str, Any]] = {
        "/runners/register": {
            "post": _op(
                "Register a runner",
                {
                    "201": _json(
                        _ref("RunnerRegistrationResponse"),
                        "Registered; also runnerToken, the runner's own bearer credential for "
                        "its heartbeats, deregistration, results and events",
                    )
                },
                "RunnerRegistrationRequest",
            )
        },
        "/runners/heartbeat": {
            "post": _op(
                "A runner's heartbeat", {"200": {"description": "Recorded"}}, "RunnerHeartbeat"
            )
        },
        "/runners": {
            "get": _op(
                "Runners with their live status",
                {"200": _json(_page("RunnerMetadata"), "PaginatedResponse")},
            )
        },
        "/runners/{runner_id}": {
            "parameters": runner_id,
            "get": _op("One runner", {"200": _json(_ref("RunnerMetadata"), "RunnerMetadata")}),
            "delete": _op("Deregister a runner", {"204": {"description": "Deregistered"}}),
        },
        "/violations": {
            "get": _op(
                "What runners sent that broke a contract (?runnerId=, ?jobId=; by default "
                "what no runner could be tied to)",
                {
                    "200": {
                        "description": "{items: [{runnerId, jobId, attempt, source, contract,"
                        " path, message, at}], total}"
                    }
                },
            )
        },
        "/jobs": {
            "post": _op(
                "Submit a job",
                {
                    "202": _json(_ref("JobResponse"), "Queued"),
                    "200": _json(_ref("JobResponse"), "The same job again"),
                },
                "JobRequest",
            ),
            "get": _op(
                "Jobs, newest first (status, type, limit, offset)",
                {"200": _json(_page("JobResponse"), "PaginatedResponse")},
            ),
        },
        "/jobs/{job_id}": {
            "parameters": job_id,
            "get": _op("One job", {"200": _json(_ref("JobResponse"), "JobResponse")}),
        },
        "/jobs/{job_id}/cancel": {
            "parameters": job_id,
            "post": _op("Cancel a job", {"200": _json(_ref("JobResponse"), "Cancelled")}),
        },
        "/jobs/{job_id}/result": {
            "parameters": job_id,
            "post": _op(
                "An asynchronous job's result, from its runner",
                {"200": _json(_ref("JobResponse"), "Recorded (or a duplicate)")},
                "RunnerExecutionResponse",
            ),
        },
        "/jobs/{job_id}/events": {
            "parameters": job_id,
            "post": _op(
                "A job.progress event from the runner",
                {"202": {"description": "Recorded"}},
                "JobEvent",
            ),
            "get": _op(
                "The job's events, oldest first by their timestamp (progress a runner delivers "
                "after its attempt ended carries data.attempt)",
                {"200": _json(_page("JobEvent"), "PaginatedResponse")},
            ),
        },
        "/assert": {
            "post": _op(
                "Record an assertion (TruthCore)",
                {"201": _json(_ref("TruthAssertion"), "Stored")},
                "TruthAssertion",
            )
        },
        "/query": {
            "post": _op(
                "Query assertions (TruthCore)",
                {"200": _json(_ref("TruthQueryResult"), "TruthQueryResult")},
                "TruthQuery",
            )
        },
        "/health": {
            "get": {
                "summary": "Database and dispatcher health",
                "responses": {"200": _json(_ref("HealthCheck"), "HealthCheck (503 unhealthy)")},
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
                "responses": {"200": {"description": "text exposition format"}},
            }
        },
    }
    for path, item in paths.items():
        parameters = item.pop("parameters", None)
        spec.path(path, operations=item, parameters=parameters)
    document: dict[str, Any] = spec.to_dict()
    return document
