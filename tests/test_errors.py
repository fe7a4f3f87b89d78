"""runnerkit.errors: the envelope every failure becomes, and the contract's retry decision."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from marshmallow import Schema, ValidationError, fields, validate

from runnerkit import (
    Conflict,
    NotFound,
    RateLimited,
    RunnerError,
    SchemaMismatch,
    Timeout,
    Unavailable,
    ValidationFailed,
    build_envelope,
    retry_delay,
    should_retry,
)
from runnerkit.contracts import CONTRACT_DEFAULT_RETRY_POLICY, JOB_DEFAULT_RETRY_POLICY
from runnerkit.errors import STATUS_BY_CATEGORY, PayloadTooLarge, UnsupportedMediaType
from tests.helpers import CORRELATION_ID, SECRET, assert_envelope

# --------------------------------------------------------------------------- should_retry


def _envelope(category: str, *, retryable: bool = True, severity: str = "error") -> dict:
    return {"category": category, "retryable": retryable, "severity": severity}


@pytest.mark.parametrize(
    ("envelope", "expected"),
    [
        # retryable false: never, even for a retryable category
        (_envelope("TIMEOUT", retryable=False), False),
        (_envelope("RESOURCE_CONFLICT", retryable=False), False),
        # a non-retryable category: never, even when the envelope says retryable
        (_envelope("VALIDATION_ERROR"), False),
        (_envelope("RESOURCE_NOT_FOUND"), False),
        (_envelope("SCHEMA_MISMATCH"), False),
        # a retryable category: yes, even when fatal
        (_envelope("TIMEOUT"), True),
        (_envelope("RUNTIME_ERROR", severity="fatal"), True),
        (_envelope("SERVICE_UNAVAILABLE"), True),
        # in neither list: yes unless fatal
        (_envelope("RESOURCE_CONFLICT"), True),
        (_envelope("RATE_LIMITED", severity="warning"), True),
        (_envelope("RESOURCE_CONFLICT", severity="fatal"), False),
    ],
)
def test_should_retry_with_the_default_policy(envelope: dict, expected: bool) -> None:
    assert should_retry(envelope, CONTRACT_DEFAULT_RETRY_POLICY) is expected


def test_should_retry_treats_a_missing_retryable_as_false() -> None:
    assert should_retry({"category": "TIMEOUT", "severity": "error"}, {}) is False


def test_non_retryable_list_wins_over_retryable_list() -> None:
    policy = {"retryableCategories": ["TIMEOUT"], "nonRetryableCategories": ["TIMEOUT"]}

    assert should_retry(_envelope("TIMEOUT"), policy) is False


def test_with_empty_category_lists_only_severity_decides() -> None:
    policy = JOB_DEFAULT_RETRY_POLICY

    assert should_retry(_envelope("VALIDATION_ERROR"), policy) is True
    assert should_retry(_envelope("TIMEOUT", severity="fatal"), policy) is False


def test_should_retry_accepts_a_real_envelope() -> None:
    envelope = build_envelope(Unavailable("down"), service="s")

    assert should_retry(envelope, CONTRACT_DEFAULT_RETRY_POLICY) is True
    assert should_retry(build_envelope(NotFound("x"), service="s"), {}) is False


# --------------------------------------------------------------------------- retry_delay


@pytest.mark.parametrize(
    ("attempt", "expected"),
    [(0, 1000), (1, 2000), (2, 4000), (3, 8000), (4, 16000), (5, 30000), (6, 30000)],
)
def test_retry_delay_doubles_up_to_the_cap(attempt: int, expected: float) -> None:
    assert retry_delay(attempt, CONTRACT_DEFAULT_RETRY_POLICY) == expected


def test_retry_delay_uses_the_policy_numbers() -> None:
    policy = {"backoffMs": 100, "backoffMultiplier": 1.5, "maxBackoffMs": 1000}

    assert [retry_delay(a, policy) for a in range(7)] == pytest.approx(
        [100, 150, 225, 337.5, 506.25, 759.375, 1000]
    )


def test_retry_delay_defaults_are_the_contract_defaults() -> None:
    assert retry_delay(0, {}) == 1000
    assert retry_delay(10, {}) == 30000


def test_retry_delay_with_zero_backoff_is_zero() -> None:
    assert retry_delay(3, {"backoffMs": 0, "maxBackoffMs": 500, "backoffMultiplier": 2}) == 0


def test_retry_delay_for_a_huge_attempt_is_the_cap() -> None:
    assert retry_delay(100_000, CONTRACT_DEFAULT_RETRY_POLICY) == 30000


# --------------------------------------------------------------------------- build_envelope


@pytest.mark.parametrize(
    ("error", "category", "code", "status", "retryable"),
    [
        (ValidationFailed("bad"), "VALIDATION_ERROR", "VALIDATION_FAILED", 400, False),
        (NotFound("gone"), "RESOURCE_NOT_FOUND", "NOT_FOUND", 404, False),
        (Conflict("clash"), "RESOURCE_CONFLICT", "CONFLICT", 409, False),
        (RateLimited("busy"), "RATE_LIMITED", "RATE_LIMITED", 429, True),
        (Unavailable("down"), "SERVICE_UNAVAILABLE", "SERVICE_UNAVAILABLE", 503, True),
        (Timeout("late"), "TIMEOUT", "TIMEOUT", 504, True),
        (SchemaMismatch("shape"), "SCHEMA_MISMATCH", "OUTPUT_SCHEMA_MISMATCH", 500, False),
        (RunnerError("plain"), "RUNNER_ERROR", "RUNNER_ERROR", 500, False),
        (UnsupportedMediaType("xml"), "VALIDATION_ERROR", "UNSUPPORTED_MEDIA_TYPE", 415, False),
        (PayloadTooLarge("big"), "VALIDATION_ERROR", "PAYLOAD_TOO_LARGE", 413, False),
    ],
)
def test_build_envelope_from_each_error_class(
    error: RunnerError, category: str, code: str, status: int, retryable: bool
) -> None:
    envelope = build_envelope(error, service="svc", operation="op", correlation_id=CORRELATION_ID)

    assert_envelope(envelope)
    assert envelope["category"] == category
    assert envelope["code"] == code
    assert envelope["retryable"] is retryable
    assert envelope["message"] == error.message
    assert envelope["severity"] == "error"
    assert envelope["service"] == "svc"
    assert envelope["operation"] == "op"
    assert envelope["correlationId"] == CORRELATION_ID
    assert envelope["contractVersion"] == {"major": 1, "minor": 0, "patch": 0}
    assert error.status == status


def test_rate_limited_retry_after_becomes_retry_after() -> None:
    envelope = build_envelope(RateLimited("busy", retry_after=2.5), service="svc")

    assert_envelope(envelope)
    assert envelope["retryAfter"] == 2.5


def test_optional_fields_are_absent_not_null() -> None:
    envelope = build_envelope(Conflict("clash"), service="svc")

    assert_envelope(envelope)
    for key in ("retryAfter", "operation", "correlationId", "causationId"):
        assert key not in envelope


def test_instance_overrides_win_over_class_defaults() -> None:
    error = Conflict(
        "clash",
        code="LOCKED",
        retryable=True,
        severity="warning",
        details=[{"message": "held by job 7", "path": ["document"], "code": "locked"}],
    )

    envelope = build_envelope(error, service="svc")

    assert_envelope(envelope)
    assert envelope["code"] == "LOCKED"
    assert envelope["retryable"] is True
    assert envelope["severity"] == "warning"
    assert envelope["details"] == [
        {"message": "held by job 7", "path": ["document"], "code": "locked"}
    ]
    assert Conflict("other").code == "CONFLICT"  # the class default is untouched


def test_each_envelope_gets_a_fresh_id() -> None:
    first = build_envelope(Conflict("x"), service="s")
    second = build_envelope(Conflict("x"), service="s")

    assert first["id"] != second["id"]


def test_every_category_has_a_status() -> None:
    from runnerkit.contracts import ERROR_CATEGORIES

    assert set(STATUS_BY_CATEGORY) == set(ERROR_CATEGORIES)


def _raise_secret() -> None:
    raise RuntimeError(f"connect failed: password={SECRET}")


def test_plain_exception_is_a_retryable_runtime_error_without_traceback(
    runnerkit_caplog: pytest.LogCaptureFixture,
) -> None:
    try:
        _raise_secret()
    except RuntimeError as exc:
        envelope = build_envelope(exc, service="svc", operation="execute")

    assert_envelope(envelope)
    assert envelope["category"] == "RUNTIME_ERROR"
    assert envelope["retryable"] is True
    assert "RuntimeError" in envelope["message"]
    assert SECRET not in str(envelope)
    assert "Traceback" not in str(envelope)
    assert "_raise_secret" not in str(envelope)

    logged = [r for r in runnerkit_caplog.records if r.name == "runnerkit.errors"]
    assert len(logged) == 1
    assert logged[0].levelno == logging.ERROR
    assert logged[0].exc_info is not None
    assert "_raise_secret" in runnerkit_caplog.text  # the stack trace went to the log
    assert "Traceback" in runnerkit_caplog.text


def test_runner_errors_are_not_logged_as_unhandled(
    runnerkit_caplog: pytest.LogCaptureFixture,
) -> None:
    build_envelope(Conflict("expected"), service="svc")

    assert not [r for r in runnerkit_caplog.records if r.name == "runnerkit.errors"]


class _Item(Schema):
    name = fields.String(required=True)
    api_token = fields.String()


class _Order(Schema):
    items = fields.List(fields.Nested(_Item), required=True)
    note = fields.String(validate=validate.Length(max=10))


def _validation_error(data: Any) -> ValidationError:
    with pytest.raises(ValidationError) as info:
        _Order().load(data)
    return info.value


def test_validation_error_details_have_string_paths() -> None:
    data = {"items": [{"name": "a"}, {"name": "b"}, {"name": "c"}, {}], "note": 5}

    envelope = build_envelope(_validation_error(data), service="svc")

    assert_envelope(envelope)
    assert envelope["category"] == "VALIDATION_ERROR"
    assert envelope["retryable"] is False
    paths = [d["path"] for d in envelope["details"]]
    assert ["items", "3", "name"] in paths
    assert ["note"] in paths
    for detail in envelope["details"]:
        assert all(isinstance(part, str) for part in detail["path"])
        assert detail["message"]


def test_validation_details_echo_short_scalars_but_not_secrets() -> None:
    data = {"items": [{"name": 7, "api_token": 12345}], "note": "x" * 500}

    envelope = build_envelope(_validation_error(data), service="svc")

    assert_envelope(envelope)
    by_path = {tuple(d["path"]): d for d in envelope["details"]}
    assert by_path[("items", "0", "name")]["value"] == 7
    assert "value" not in by_path[("items", "0", "api_token")]
    assert "12345" not in str(envelope)
    assert by_path[("note",)]["value"] == "x" * 63 + "…"  # long values are cut short


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_values_are_not_echoed(value: float) -> None:
    """Infinity/NaN in ``details[].value`` would make the whole answer invalid JSON."""
    envelope = build_envelope(_validation_error({"items": [], "note": value}), service="svc")

    assert_envelope(envelope)
    assert "value" not in envelope["details"][0]
    json.dumps(envelope, allow_nan=False)


def test_validation_error_for_a_non_object_has_an_empty_path() -> None:
    envelope = build_envelope(_validation_error(["not", "an", "object"]), service="svc")

    assert_envelope(envelope)
    assert [d["path"] for d in envelope["details"]] == [[]]


def test_details_a_capability_raises_are_redacted_before_they_leave() -> None:
    error = ValidationFailed(
        "bad credentials",
        details=[
            {"message": "wrong", "path": ["payload", "login"], "value": {"password": "hunter2"}},
            {"message": "expired", "path": ["payload", "api_key"], "value": "sk-live-123"},
            {"message": "fine", "path": ["payload", "name"], "value": "Ada"},
        ],
    )
    envelope = build_envelope(error, service="t")
    assert_envelope(envelope)
    values = [d["value"] for d in envelope["details"]]
    assert values == [{"password": "[REDACTED]"}, "[REDACTED]", "Ada"]
    assert "hunter2" not in json.dumps(envelope) and "sk-live" not in json.dumps(envelope)
    # The error keeps its own details: only what leaves is redacted.
    assert error.details[0]["value"] == {"password": "hunter2"}
