"""One test per row of CONTRACTS.md's "Validation semantics" table, each checked both ways."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from marshmallow import Schema, ValidationError

from runnerkit.contracts import (
    CONTRACT_DEFAULT_RETRY_POLICY,
    CONTRACT_VERSION,
    ERROR_CATEGORIES,
    JOB_DEFAULT_RETRY_POLICY,
    SCHEMAS,
    AnyJSON,
    ContractSchema,
    ErrorEnvelopeSchema,
    HealthCheckSchema,
    JobRequestSchema,
    PaginatedResponseSchema,
    Record,
    RetryPolicySchema,
    RunnerCapabilitySchema,
    RunnerExecutionRequestSchema,
    RunnerExecutionResponseSchema,
    RunnerHeartbeatSchema,
    RunnerRegistrationRequestSchema,
    StrictBoolean,
    StrictInteger,
    StrictNumber,
    StrictString,
    TruthAssertionSchema,
    URLString,
    UUIDString,
    ZDateTime,
    format_timestamp,
    format_version,
    is_compatible,
    paginated_schema,
    parse_version,
    validate,
)

UUID = "550e8400-e29b-41d4-a716-446655440000"
TS = "2026-11-28T05:02:06.123Z"


def _field_schema(field: Any) -> Schema:
    """A one-field schema ``{"v": field}`` to test a field on its own."""
    return ContractSchema.from_dict({"v": field})()


def ok(field: Any, value: Any) -> Any:
    return _field_schema(field).load({"v": value})["v"]


def bad(field: Any, value: Any) -> None:
    with pytest.raises(ValidationError) as info:
        _field_schema(field).load({"v": value})
    assert "v" in info.value.messages


def capability(**extra: Any) -> dict[str, Any]:
    return {
        "id": "cap",
        "name": "Cap",
        "version": "1.0.0",
        "description": "d",
        "inputSchema": {"type": "object"},
        "outputSchema": {"type": "object"},
        "supportedJobTypes": ["t"],
        **extra,
    }


def execution_request(**extra: Any) -> dict[str, Any]:
    return {"jobId": UUID, "moduleId": "m", "capabilityId": "c", "payload": {}, **extra}


def envelope(**extra: Any) -> dict[str, Any]:
    return {
        "id": UUID,
        "timestamp": TS,
        "category": "RUNTIME_ERROR",
        "severity": "error",
        "code": "BOOM",
        "message": "boom",
        "service": "svc",
        "contractVersion": dict(CONTRACT_VERSION),
        **extra,
    }


def job_request(**extra: Any) -> dict[str, Any]:
    return {
        "id": UUID,
        "type": "t",
        "payload": {"type": "t", "data": {}},
        "metadata": {"source": "cli", "createdAt": TS},
        **extra,
    }


def heartbeat(**extra: Any) -> dict[str, Any]:
    return {"runnerId": UUID, "timestamp": TS, "status": "healthy", **extra}


# ---------------------------------------------------------------- unknown keys


def test_unknown_keys_are_dropped() -> None:
    loaded = RunnerExecutionRequestSchema().load(execution_request(attempt=2, x={"y": 1}))
    assert "attempt" not in loaded and "x" not in loaded
    assert loaded["jobId"] == UUID


def test_unknown_keys_dropped_in_nested_objects() -> None:
    value = execution_request(metadata={"userId": "u", "tenant": "t"})
    assert RunnerExecutionRequestSchema().load(value)["metadata"] == {"userId": "u"}


def test_known_keys_still_validated_next_to_unknown_ones() -> None:
    with pytest.raises(ValidationError) as info:
        RunnerExecutionRequestSchema().load(execution_request(jobId="nope", extra=1))
    assert set(info.value.messages) == {"jobId"}


@pytest.mark.parametrize("value", [[], "x", None, 5, [heartbeat()]])
def test_top_level_must_be_an_object(value: Any) -> None:
    assert "_schema" in validate("RunnerHeartbeat", value)


# ---------------------------------------------------------------- defaults vs null


def test_default_applies_when_key_absent() -> None:
    loaded = RunnerExecutionRequestSchema().load(execution_request())
    assert loaded["timeoutMs"] == 30000
    assert loaded["metadata"] == {}


def test_default_does_not_apply_to_null() -> None:
    for key in ("timeoutMs", "metadata"):
        with pytest.raises(ValidationError) as info:
            RunnerExecutionRequestSchema().load(execution_request(**{key: None}))
        assert key in info.value.messages


def test_truth_query_filters_default_to_min_confidence_zero() -> None:
    schema = SCHEMAS["TruthQuery"]()
    query = {"id": "5f0c6f4e-3c39-4a57-9d0e-7c1f1a2b3c4d", "pattern": {}}

    assert schema.load(query)["filters"] == {"minConfidence": 0}
    with pytest.raises(ValidationError) as info:
        schema.load({**query, "filters": None})
    assert "filters" in info.value.messages


def test_present_value_wins_over_default() -> None:
    loaded = RunnerExecutionRequestSchema().load(execution_request(timeoutMs=5))
    assert loaded["timeoutMs"] == 5


def test_defaults_are_fresh_objects() -> None:
    schema = RunnerRegistrationRequestSchema()
    value = {
        "name": "r",
        "version": "1",
        "contractVersion": dict(CONTRACT_VERSION),
        "capabilities": [],
        "healthCheckEndpoint": "http://localhost:3000/health",
    }
    first = schema.load(value)
    first["tags"].append("mutated")
    assert schema.load(value)["tags"] == []


def test_null_rejected_for_required_and_optional_fields() -> None:
    assert "jobId" in validate("RunnerExecutionRequest", execution_request(jobId=None))
    assert "operation" in validate("ErrorEnvelope", envelope(operation=None))
    assert "error" in validate(
        "RunnerExecutionResponse",
        {"jobId": UUID, "success": False, "error": None, "executionTimeMs": 1, "runnerId": UUID},
    )


def test_null_allowed_only_where_nullable() -> None:
    response = {"jobId": UUID, "success": True, "executionTimeMs": 1, "runnerId": UUID}
    assert RunnerExecutionResponseSchema().load({**response, "data": None})["data"] is None
    assert "data" not in RunnerExecutionResponseSchema().load(response)


def test_missing_required_field_fails() -> None:
    value = execution_request()
    del value["payload"]
    assert validate(RunnerExecutionRequestSchema, value) == {
        "payload": ["Missing data for required field."]
    }


# ---------------------------------------------------------------- string


def test_string_accepts_str() -> None:
    assert ok(StrictString(), "") == ""
    assert ok(StrictString(), "5") == "5"


@pytest.mark.parametrize("value", [5, 5.0, True, False, b"x", ["x"], {"x": 1}])
def test_string_rejects_non_strings(value: Any) -> None:
    bad(StrictString(), value)


# ---------------------------------------------------------------- number


@pytest.mark.parametrize("value", [0, 5, -3, 5.0, 12.7, 1e300, -0.0, 9999999999999999])
def test_number_accepts_numbers(value: Any) -> None:
    loaded = ok(StrictNumber(), value)
    assert loaded == value and type(loaded) is type(value)


@pytest.mark.parametrize("value", ["5", "5.0", "", True, False, None, [5], {"n": 5}])
def test_number_rejects_non_numbers(value: Any) -> None:
    bad(StrictNumber(), value)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_number_rejects_nan_and_infinity(value: float) -> None:
    bad(StrictNumber(), value)
    bad(StrictInteger(), value)


def test_number_5_and_5_0_are_the_same_number() -> None:
    assert ok(StrictNumber(), 5) == ok(StrictNumber(), 5.0)


def test_large_int_keeps_exact_value() -> None:
    assert ok(StrictNumber(), 9999999999999999) == 9999999999999999
    assert StrictNumber()._serialize(9999999999999999, None, None) == 9999999999999999


def test_string_timeout_not_coerced() -> None:
    assert "timeoutMs" in validate("RunnerExecutionRequest", execution_request(timeoutMs="30000"))


# ---------------------------------------------------------------- int


def test_int_accepts_integral_float() -> None:
    loaded = ok(StrictInteger(), 5.0)
    assert loaded == 5 and type(loaded) is int
    assert ok(StrictInteger(), 5) == 5


@pytest.mark.parametrize("value", [5.5, 0.1, "5", True, False, None])
def test_int_rejects_non_integers(value: Any) -> None:
    bad(StrictInteger(), value)


def test_int_rule_in_a_schema() -> None:
    assert RunnerCapabilitySchema().load(capability(maxConcurrency=4.0))["maxConcurrency"] == 4
    assert "maxConcurrency" in validate("RunnerCapability", capability(maxConcurrency=4.5))


# ---------------------------------------------------------------- positive / nonnegative


def test_positive_rejects_zero_and_negative() -> None:
    for value in (0, -1, -0.5):
        assert "timeoutMs" in validate("RunnerExecutionRequest", execution_request(timeoutMs=value))
    assert validate("RunnerExecutionRequest", execution_request(timeoutMs=0.001)) == {}


def test_nonnegative_accepts_zero_rejects_negative() -> None:
    assert validate("RunnerHeartbeat", heartbeat(activeJobs=0)) == {}
    assert "activeJobs" in validate("RunnerHeartbeat", heartbeat(activeJobs=-1))


def test_ranges() -> None:
    assert validate("RunnerHeartbeat", heartbeat(metrics={"cpuUsage": 100})) == {}
    assert "metrics" in validate("RunnerHeartbeat", heartbeat(metrics={"cpuUsage": 100.1}))
    assert "metrics" in validate("RunnerHeartbeat", heartbeat(metrics={"jobThroughput": -1}))
    assert validate("JobRequest", job_request(priority=0)) == {}
    assert "priority" in validate("JobRequest", job_request(priority=-1))
    assert "priority" in validate("JobRequest", job_request(priority=50.5))


# ---------------------------------------------------------------- boolean


def test_boolean_accepts_true_false() -> None:
    assert ok(StrictBoolean(), True) is True
    assert ok(StrictBoolean(), False) is False


@pytest.mark.parametrize("value", ["true", "false", "True", 1, 0, 1.0, "yes", "on", None])
def test_boolean_rejects_everything_else(value: Any) -> None:
    bad(StrictBoolean(), value)


# ---------------------------------------------------------------- uuid

UUIDS_OK = [
    UUID,
    UUID.upper(),
    "6F1c2D3e-4b5A-4c7d-8e9f-0a1b2c3d4e5f",
    "00000000-0000-0000-0000-000000000000",
    "ffffffff-ffff-ffff-ffff-ffffffffffff",
    "6f1c2d3e-4b5a-0c7d-0e9f-0a1b2c3d4e5f",  # version nibble 0, variant 0
    "6f1c2d3e-4b5a-fc7d-8e9f-0a1b2c3d4e5f",  # version nibble f
]
UUIDS_BAD = [
    "runner-example-001",
    "550e8400e29b41d4a716446655440000",
    "{550e8400-e29b-41d4-a716-446655440000}",
    "urn:uuid:550e8400-e29b-41d4-a716-446655440000",
    "550e8400-e29b-41d4-a716-44665544000",
    "550e8400-e29b-41d4-a716-4466554400000",
    "550e8400-e29b-41d4-a716-44665544000g",
    "550e8400-e29b-41d4-a716-446655440000\n",
    " 550e8400-e29b-41d4-a716-446655440000",
    "550e8400-e29b41d4-a716-446655440000-",
    "",
    123,
]


@pytest.mark.parametrize("value", UUIDS_OK)
def test_uuid_accepts_any_case_and_version(value: str) -> None:
    loaded = ok(UUIDString(), value)
    assert loaded == value and isinstance(loaded, str)


@pytest.mark.parametrize("value", UUIDS_BAD)
def test_uuid_rejects_other_shapes(value: Any) -> None:
    bad(UUIDString(), value)


# ---------------------------------------------------------------- datetime

DATETIMES_OK = [
    TS,
    "2026-01-01T10:00Z",
    "2026-01-01T10:00:59Z",
    "2026-01-01T23:59:59.999999999Z",
    "2026-01-01T00:00:00.1Z",
    "2024-02-29T12:00:00Z",
    "2000-02-29T12:00:00Z",
    "2026-12-31T00:00:00Z",
    "0000-01-01T00:00:00Z",
]
DATETIMES_BAD = [
    "2026-11-28T05:02:06.123+00:00",
    "2026-11-28T05:02:06.123000+00:00",
    "2026-11-28T05:02:06",
    "2026-11-28T05:02:06.123z",
    "2026-11-28t05:02:06.123Z",
    "2026-11-28 05:02:06Z",
    "2023-02-29T12:00:00Z",
    "1900-02-29T12:00:00Z",
    "2026-04-31T12:00:00Z",
    "2026-13-01T12:00:00Z",
    "2026-00-01T12:00:00Z",
    "2026-01-00T12:00:00Z",
    "2026-01-01T24:00:00Z",
    "2026-01-01T10:60:00Z",
    "2026-01-01T10:00:60Z",
    "2026-01-01T10Z",
    "2026-01-01T10:00:00.Z",
    "2026-01-01Z",
    "26-01-01T10:00:00Z",
    "2026-1-01T10:00:00Z",
    "2026-01-01T10:00:00Z\n",
    "١٢٣٤-01-01T10:00:00Z",
    "",
    1764306126123,
]


@pytest.mark.parametrize("value", DATETIMES_OK)
def test_datetime_accepts_z_timestamps(value: str) -> None:
    assert ok(ZDateTime(), value) == value


@pytest.mark.parametrize("value", DATETIMES_BAD)
def test_datetime_rejects_others(value: Any) -> None:
    bad(ZDateTime(), value)


def test_datetime_dumps_strings_unchanged_and_datetimes_with_z() -> None:
    schema = _field_schema(ZDateTime())
    assert schema.dump({"v": "2026-01-01T10:00Z"}) == {"v": "2026-01-01T10:00Z"}
    aware = datetime(2026, 11, 28, 7, 2, 6, 123456, tzinfo=timezone(timedelta(hours=2)))
    assert schema.dump({"v": aware}) == {"v": TS}
    naive = datetime(2026, 11, 28, 5, 2, 6, 123999)
    assert schema.dump({"v": naive}) == {"v": TS}
    assert format_timestamp(datetime(5, 1, 2, tzinfo=UTC)) == "0005-01-02T00:00:00.000Z"


# ---------------------------------------------------------------- url

URLS_OK = [
    "http://localhost:3000/health",
    "https://example.com",
    "HTTP://EXAMPLE.COM/x?y#z",
    "localhost:3000",
    "mailto:someone@example.com",
    "http://127.0.0.1:8080",
    "http://[::1]:3000/health",
    "http:example.com",
    "foo:",
    "  http://example.com  ",
    # WHATWG parses these where a hand-written check would not:
    "foo://a\x7fb/",  # an opaque host percent-encodes DEL
    "https://münchen.de/",
    "http://Ex%41mple.com/",
    "http://0x7f.1/",  # IPv4 number syntax: 127.0.0.1
]
URLS_BAD = [
    "/health",
    "not a url",
    "",
    "example.com",
    "http://",
    "http://:3000",
    "http://exa mple.com",
    "http://localhost:99999",
    "http://localhost:abc",
    "3000:localhost",
    "://example.com",
    5,
    # ... and refuses these, which only look like URLs:
    "http://1.2.3.256/",
    "http://[zz]/",
    "http://a%20b/",
    "http://[::1/",
    "http://\ud800/",  # a lone surrogate
]


@pytest.mark.parametrize("value", URLS_OK)
def test_url_accepts_absolute_urls(value: str) -> None:
    assert ok(URLString(), value) == value


@pytest.mark.parametrize("value", URLS_BAD)
def test_url_rejects_relative_and_garbage(value: Any) -> None:
    bad(URLString(), value)


# ---------------------------------------------------------------- __proto__


def test_a_proto_key_is_dropped_from_records_as_zod_drops_it() -> None:
    from runnerkit.contracts import load_execution_request, load_job_request

    nested = {"keep": {"__proto__": {"polluted": True}}}
    body = execution_request(payload={"__proto__": {"polluted": True}, **nested})
    loaded = load_execution_request(json.loads(json.dumps(body)))
    # Zod's record merge skips "__proto__"; values below a record are z.unknown(), kept.
    assert loaded["payload"] == nested

    job = {
        "id": "5f0c6f4e-3c39-4a57-9d0e-7c1f1a2b3c4d",
        "type": "t",
        "payload": {"type": "t", "data": {"__proto__": 1, "a": 2}, "options": {"__proto__": 3}},
        "metadata": {"source": "s", "createdAt": "2026-01-01T00:00:00Z", "__proto__": 4},
    }
    loaded_job = load_job_request(job)
    assert loaded_job["payload"]["data"] == {"a": 2}
    assert loaded_job["payload"]["options"] == {}
    assert "__proto__" not in loaded_job["metadata"]


# ---------------------------------------------------------------- record


def test_record_accepts_any_object() -> None:
    value = {"a": [1, None], "b": {"c": "d"}}
    assert ok(Record(), value) == value
    assert ok(Record(), {}) == {}


@pytest.mark.parametrize("value", [[], [1, 2], None, "{}", 5, True])
def test_record_rejects_non_objects(value: Any) -> None:
    bad(Record(), value)


def test_payload_array_rejected() -> None:
    assert "payload" in validate("RunnerExecutionRequest", execution_request(payload=[1, 2]))


# ---------------------------------------------------------------- unknown


@pytest.mark.parametrize("value", [None, 1, 1.5, "s", True, [1, "a"], {"k": None}])
def test_unknown_accepts_any_json_value(value: Any) -> None:
    assert ok(AnyJSON(), value) == value


def test_unknown_may_be_absent_but_truth_object_is_required() -> None:
    assertion = {"id": UUID, "subject": "s", "predicate": "p", "source": "r", "timestamp": TS}
    assert "object" in validate("TruthAssertion", assertion)
    loaded = TruthAssertionSchema().load({**assertion, "object": None})
    assert loaded["object"] is None and loaded["confidence"] == 1 and loaded["metadata"] == {}


# ---------------------------------------------------------------- enum


def test_enum_exact_values_accepted() -> None:
    for category in ERROR_CATEGORIES:
        assert validate("ErrorEnvelope", envelope(category=category)) == {}


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("category", "RATE_LIMIT"),
        ("category", "CONFLICT"),
        ("category", "validation_error"),
        ("severity", "Error"),
        ("severity", "ERROR"),
        ("severity", "critical"),
    ],
)
def test_enum_rejects_other_spellings(key: str, value: str) -> None:
    assert key in validate("ErrorEnvelope", envelope(**{key: value}))


def test_heartbeat_status_enum() -> None:
    assert validate("RunnerHeartbeat", heartbeat(status="degraded")) == {}
    assert "status" in validate("RunnerHeartbeat", heartbeat(status="Healthy"))
    assert "status" in validate("RunnerHeartbeat", heartbeat(status="offline"))
    assert len(ERROR_CATEGORIES) == 14


# ---------------------------------------------------------------- the contract's defaults


def test_runner_capability_defaults() -> None:
    loaded = RunnerCapabilitySchema().load(capability())
    assert loaded["maxConcurrency"] == 1
    assert loaded["timeoutMs"] == 30000
    assert loaded["resourceRequirements"] == {"gpu": False}


def test_resource_requirements_defaults_inside_a_present_object() -> None:
    loaded = RunnerCapabilitySchema().load(capability(resourceRequirements={"cpu": "1"}))
    assert loaded["resourceRequirements"] == {"cpu": "1", "gpu": False}
    assert "resourceRequirements" in validate(
        "RunnerCapability", capability(resourceRequirements=None)
    )


def test_error_envelope_defaults() -> None:
    loaded = ErrorEnvelopeSchema().load(envelope())
    assert loaded["details"] == []
    assert loaded["retryable"] is False


def test_heartbeat_defaults() -> None:
    loaded = RunnerHeartbeatSchema().load(heartbeat())
    assert (loaded["activeJobs"], loaded["queuedJobs"], loaded["metrics"]) == (0, 0, {})


def test_health_check_defaults() -> None:
    value = {"service": "s", "status": "unknown", "timestamp": TS, "version": "1", "uptime": 0}
    assert HealthCheckSchema().load(value)["checks"] == []


def test_job_request_defaults_when_retry_policy_absent() -> None:
    loaded = JobRequestSchema().load(job_request())
    assert loaded["priority"] == 50
    assert loaded["timeoutMs"] == 30000
    assert loaded["payload"]["version"] == "1.0.0" and loaded["payload"]["options"] == {}
    assert loaded["metadata"]["tags"] == []
    assert loaded["retryPolicy"] == JOB_DEFAULT_RETRY_POLICY
    assert loaded["retryPolicy"]["retryableCategories"] == []
    assert loaded["retryPolicy"]["nonRetryableCategories"] == []
    assert loaded["retryPolicy"]["maxRetries"] == 3


def test_job_request_partial_retry_policy_gets_contract_lists() -> None:
    loaded = JobRequestSchema().load(job_request(retryPolicy={"maxRetries": 5}))
    expected = {**CONTRACT_DEFAULT_RETRY_POLICY, "maxRetries": 5}
    assert loaded["retryPolicy"] == expected
    assert "TIMEOUT" in loaded["retryPolicy"]["retryableCategories"]
    assert "VALIDATION_ERROR" in loaded["retryPolicy"]["nonRetryableCategories"]


def test_job_request_default_policy_is_not_shared() -> None:
    first = JobRequestSchema().load(job_request())
    first["retryPolicy"]["retryableCategories"].append("TIMEOUT")
    assert JOB_DEFAULT_RETRY_POLICY["retryableCategories"] == []
    assert JobRequestSchema().load(job_request())["retryPolicy"]["retryableCategories"] == []


def test_retry_policy_schema_defaults_and_rules() -> None:
    assert RetryPolicySchema().load({}) == CONTRACT_DEFAULT_RETRY_POLICY
    assert "backoffMultiplier" in validate("RetryPolicy", {"backoffMultiplier": 0})
    assert "retryableCategories" in validate("RetryPolicy", {"retryableCategories": ["NOPE"]})


# ---------------------------------------------------------------- versions, registry, dump


def test_version_helpers() -> None:
    assert parse_version("1.2.3") == {"major": 1, "minor": 2, "patch": 3}
    assert parse_version("1.2.3-beta.1") == {
        "major": 1,
        "minor": 2,
        "patch": 3,
        "preRelease": "beta.1",
    }
    assert format_version(parse_version("1.2.3-rc1")) == "1.2.3-rc1"
    for text in ("1.2", "v1.2.3", "1.2.3-", "1.2.3 ", "a.b.c"):
        with pytest.raises(ValueError):
            parse_version(text)
    assert is_compatible({"major": 1, "minor": 9, "patch": 0})
    assert is_compatible("1.4.0")
    assert not is_compatible({"major": 2, "minor": 0, "patch": 0})
    assert "major" in validate("ContractVersion", {"major": -1, "minor": 0, "patch": 0})
    assert "minor" in validate("ContractVersion", {"major": 1, "minor": "0", "patch": 0})


def test_schema_registry_names() -> None:
    assert len(SCHEMAS) == 22
    assert all(issubclass(cls, ContractSchema) for cls in SCHEMAS.values())
    with pytest.raises(KeyError):
        validate("NoSuchContract", {})


def test_paginated_response() -> None:
    page = {"items": [{"a": 1}], "total": 1, "limit": 10, "offset": 0, "hasMore": False}
    assert PaginatedResponseSchema().load(page) == page
    assert "total" in validate(PaginatedResponseSchema, {**page, "total": -1})
    typed = paginated_schema(HealthCheckSchema)
    assert typed is paginated_schema(HealthCheckSchema)
    assert "items" in validate(typed, page)


def test_dump_of_loaded_value_round_trips_as_json() -> None:
    value = job_request(retryPolicy={"backoffMs": 9999999999999999})
    schema = JobRequestSchema()
    loaded = schema.load(value)
    dumped = json.loads(json.dumps(schema.dump(loaded)))
    assert dumped["metadata"]["createdAt"] == TS
    assert dumped["retryPolicy"]["backoffMs"] == 9999999999999999
    assert schema.load(copy.deepcopy(dumped)) == loaded
