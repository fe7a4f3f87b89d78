"""``POST /execute``: one test per row of the answer table, plus logs and the example runner."""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

import pytest
from flask.testing import FlaskClient

from runnerkit import Runner
from runnerkit.contracts import is_uuid
from runnerkit.runner.job_threads import JobThread
from tests.helpers import (
    CORRELATION_ID,
    JOB_ID,
    SECRET,
    JobLog,
    assert_execution_response,
    assert_failure,
    new_uuid,
    post_execute,
    request_body,
    strict_json,
)

# --------------------------------------------------------------------------- success


def test_valid_request_answers_200_with_output_data(client: FlaskClient) -> None:
    response = post_execute(client, "echo", {"message": "ab", "repeat": 3}, jobId=JOB_ID)

    assert response.status_code == 200
    body = response.get_json()
    assert_execution_response(body)
    assert body["success"] is True
    assert body["jobId"] == JOB_ID
    assert body["data"] == {"message": "ababab", "repeat": 3}
    assert "error" not in body


def test_an_undeclared_key_is_schema_mismatch_naming_it_without_its_value(
    client: FlaskClient,
) -> None:
    # The advertised outputSchema says additionalProperties: false; the check says the same.
    response = post_execute(client, "bad-output", {"kind": "undeclared"})

    envelope = assert_failure(response, 500, "SCHEMA_MISMATCH")
    assert "internal" in envelope["message"]
    assert [d["path"] for d in envelope["details"]] == [["data", "internal"]]
    assert envelope["details"][0]["code"] == "unknown_field"
    assert SECRET not in response.get_data(as_text=True)


def test_input_defaults_apply_before_run(client: FlaskClient) -> None:
    body = post_execute(client, "echo", {"message": "x"}).get_json()

    assert body["data"]["repeat"] == 1


def test_execution_time_is_measured(client: FlaskClient) -> None:
    fast = post_execute(client, "echo", {"message": "x"}).get_json()
    slow = post_execute(client, "echo", {"message": "x", "delay_ms": 120}).get_json()

    assert 0 <= fast["executionTimeMs"] < 120
    assert slow["executionTimeMs"] >= 120


def test_runner_id_is_a_uuid_stable_per_instance(client: FlaskClient, runner: Runner) -> None:
    first = post_execute(client).get_json()["runnerId"]
    second = post_execute(client, "raiser", {"kind": "conflict"}).get_json()["runnerId"]

    assert is_uuid(first)
    assert first == second == runner.runner_id


def test_runner_id_differs_between_runners(runner: Runner) -> None:
    other = Runner("another-runner", capabilities=[])

    assert is_uuid(other.runner_id)
    assert other.runner_id != runner.runner_id


def test_nested_list_payload_is_accepted(client: FlaskClient) -> None:
    payload = {"items": [{"name": "a", "quantity": 2}, {"name": "b", "quantity": 3, "kind": "b"}]}

    response = post_execute(client, "order", payload)

    assert response.status_code == 200
    assert response.get_json()["data"] == {"total": 5, "names": ["a", "b"]}


# --------------------------------------------------------------------------- rejections


def test_unknown_capability_is_404_not_retryable(client: FlaskClient) -> None:
    response = post_execute(client, "no-such-capability")

    envelope = assert_failure(response, 404, "RESOURCE_NOT_FOUND")
    assert envelope["retryable"] is False
    assert "no-such-capability" in envelope["message"]
    assert any(d.get("path") == ["capabilityId"] for d in envelope["details"])


@pytest.mark.parametrize(
    ("overrides", "path"),
    [
        ({"moduleId": None}, ["moduleId"]),
        ({"payload": ["not", "an", "object"]}, ["payload"]),
        ({"timeoutMs": 0}, ["timeoutMs"]),
        ({"timeoutMs": "1000"}, ["timeoutMs"]),
        ({"metadata": {"correlationId": "not-a-uuid"}}, ["metadata", "correlationId"]),
    ],
)
def test_request_violating_the_contract_is_400_with_paths(
    client: FlaskClient, overrides: dict[str, Any], path: list[str]
) -> None:
    response = client.post("/execute", json=request_body(**overrides))

    envelope = assert_failure(response, 400, "VALIDATION_ERROR")
    assert path in [d.get("path") for d in envelope["details"]], envelope["details"]


def test_missing_required_fields_are_each_reported(client: FlaskClient) -> None:
    response = client.post("/execute", json={"jobId": JOB_ID})

    envelope = assert_failure(response, 400, "VALIDATION_ERROR")
    paths = [d.get("path") for d in envelope["details"]]
    assert ["moduleId"] in paths
    assert ["capabilityId"] in paths
    assert ["payload"] in paths


def test_without_a_valid_job_id_the_body_is_only_success_and_error(client: FlaskClient) -> None:
    response = client.post("/execute", json=request_body(jobId="job-1"))

    envelope = assert_failure(response, 400, "VALIDATION_ERROR", job_known=False)
    assert ["jobId"] in [d.get("path") for d in envelope["details"]]


def test_payload_failing_input_reports_paths_under_payload(client: FlaskClient) -> None:
    items = [{"name": f"item{i}", "quantity": 1} for i in range(3)]
    items.append({"quantity": 1})  # index 3 has no name
    items.append({"name": "bad", "quantity": 0, "kind": "c"})

    response = post_execute(client, "order", {"items": items, "customer": {}})

    envelope = assert_failure(response, 400, "VALIDATION_ERROR")
    paths = [d.get("path") for d in envelope["details"]]
    assert ["payload", "items", "3", "name"] in paths
    assert ["payload", "items", "4", "quantity"] in paths
    assert ["payload", "items", "4", "kind"] in paths
    assert ["payload", "customer", "email"] in paths
    assert envelope["retryable"] is False


def test_payload_with_unknown_key_is_rejected_by_input(client: FlaskClient) -> None:
    response = post_execute(client, "echo", {"message": "x", "surprise": 1})

    envelope = assert_failure(response, 400, "VALIDATION_ERROR")
    assert ["payload", "surprise"] in [d.get("path") for d in envelope["details"]]


# --------------------------------------------------------------------------- errors raised


@pytest.mark.parametrize(
    ("kind", "status", "category", "retryable"),
    [
        ("validation", 400, "VALIDATION_ERROR", False),
        ("not_found", 404, "RESOURCE_NOT_FOUND", False),
        ("conflict", 409, "RESOURCE_CONFLICT", False),
        ("rate_limited", 429, "RATE_LIMITED", True),
        ("unavailable", 503, "SERVICE_UNAVAILABLE", True),
        ("timeout", 504, "TIMEOUT", True),
        ("unauthenticated", 401, "AUTHENTICATION_ERROR", False),
        ("schema_mismatch", 500, "SCHEMA_MISMATCH", False),
        ("runner_error", 500, "RUNNER_ERROR", False),
    ],
)
def test_runner_error_answers_with_its_category_status_and_envelope(
    client: FlaskClient, kind: str, status: int, category: str, retryable: bool
) -> None:
    response = post_execute(client, "raiser", {"kind": kind})

    envelope = assert_failure(response, status, category)
    assert envelope["retryable"] is retryable
    assert envelope["service"] == "test-runner"
    assert envelope["operation"] == "execute"


@pytest.mark.parametrize(
    ("kind", "status", "check"),
    [
        ("bad_path", 400, lambda e: e["details"][0]["path"] == ["i", "0"]),
        ("bad_details", 400, lambda e: [d["message"] for d in e["details"]][2] == "plain text"),
        ("bad_severity", 500, lambda e: e["severity"] == "error"),
        ("bad_retry_after", 429, lambda e: "retryAfter" not in e),
        ("nan_retry_after", 429, lambda e: "retryAfter" not in e),
        ("bad_code", 500, lambda e: e["code"] == "5"),
        ("no_message", 500, lambda e: "RunnerError" in e["message"]),
        ("bad_value", 400, lambda e: isinstance(e["details"][0]["value"], str)),
    ],
)
def test_whatever_a_capability_raises_leaves_as_a_valid_envelope(
    client: FlaskClient, kind: str, status: int, check: Any, caplog: pytest.LogCaptureFixture
) -> None:
    response = post_execute(client, "raiser", {"kind": kind})

    assert response.status_code == status, response.get_data(as_text=True)
    body = assert_execution_response(strict_json(response))
    assert check(body["error"]), body["error"]
    assert "would break the ErrorEnvelope contract" in caplog.text


def test_runner_error_keeps_its_message_and_details(client: FlaskClient) -> None:
    response = post_execute(client, "raiser", {"kind": "validation"})

    envelope = assert_failure(response, 400, "VALIDATION_ERROR")
    assert envelope["message"] == "name is taken"
    assert envelope["details"] == [{"message": "taken", "path": ["payload", "name"]}]


def test_rate_limited_carries_retry_after(client: FlaskClient) -> None:
    response = post_execute(client, "raiser", {"kind": "rate_limited"})

    envelope = assert_failure(response, 429, "RATE_LIMITED")
    assert envelope["retryAfter"] == 2
    assert response.headers["Retry-After"] == "2"


def test_retry_after_header_is_never_earlier_than_retry_after(client: FlaskClient) -> None:
    response = post_execute(client, "raiser", {"kind": "rate_limited_fraction"})

    envelope = assert_failure(response, 429, "RATE_LIMITED")
    assert int(response.headers["Retry-After"]) >= envelope["retryAfter"]


@pytest.mark.parametrize("kind", ["runtime", "key_error"])
def test_unexpected_exception_is_500_runtime_error_without_internals(
    client: FlaskClient, kind: str
) -> None:
    response = post_execute(client, "raiser", {"kind": kind})

    envelope = assert_failure(response, 500, "RUNTIME_ERROR")
    assert envelope["retryable"] is True
    text = response.get_data(as_text=True)
    assert "Traceback" not in text
    assert 'File "' not in text
    assert SECRET not in text


def test_marshmallow_error_inside_run_is_a_runtime_error(client: FlaskClient) -> None:
    response = post_execute(client, "raiser", {"kind": "marshmallow"})

    envelope = assert_failure(response, 500, "RUNTIME_ERROR")
    assert envelope["retryable"] is True


@pytest.mark.parametrize(
    ("kind", "field"),
    [("wrong_type", "count"), ("missing", "name"), ("null", "count"), ("coerced", "count")],
)
def test_output_mismatch_is_500_schema_mismatch_naming_the_field(
    client: FlaskClient, kind: str, field: str
) -> None:
    response = post_execute(client, "bad-output", {"kind": kind})

    envelope = assert_failure(response, 500, "SCHEMA_MISMATCH")
    assert envelope["retryable"] is False
    assert field in envelope["message"]
    assert ["data", field] in [d.get("path") for d in envelope["details"]]


def test_output_that_is_not_an_object_is_schema_mismatch(client: FlaskClient) -> None:
    response = post_execute(client, "bad-output", {"kind": "not_object"})

    envelope = assert_failure(response, 500, "SCHEMA_MISMATCH")
    assert envelope["retryable"] is False
    assert "list" in envelope["message"]


@pytest.mark.parametrize("kind", ["not_json", "nan"])
def test_output_json_cannot_carry_is_schema_mismatch_and_replayed(
    client: FlaskClient, kind: str
) -> None:
    job_id = new_uuid()
    response = post_execute(client, "bad-output", {"kind": kind}, jobId=job_id)

    envelope = assert_failure(response, 500, "SCHEMA_MISMATCH")
    assert envelope["retryable"] is False
    assert ["data"] in [d.get("path") for d in envelope["details"]]
    again = post_execute(client, "bad-output", {"kind": kind}, jobId=job_id)
    assert again.status_code == 500
    assert again.headers.get("Idempotent-Replayed") == "true"
    assert again.get_json()["error"]["category"] == "SCHEMA_MISMATCH"


# --------------------------------------------------------------------------- deadlines


def _timed(client: FlaskClient, **extra: Any) -> tuple[Any, float]:
    started = time.monotonic()
    response = post_execute(client, "sleeper", {}, **extra)
    return response, time.monotonic() - started


def test_request_timeout_is_answered_at_the_deadline_even_if_code_ignores_it(
    client: FlaskClient,
) -> None:
    response, elapsed = _timed(client, timeoutMs=150)

    envelope = assert_failure(response, 504, "TIMEOUT")
    assert envelope["retryable"] is True
    assert 0.15 <= elapsed < 1.0
    assert response.get_json()["executionTimeMs"] >= 150


def test_capability_timeout_caps_a_longer_request_timeout(client: FlaskClient) -> None:
    response, elapsed = _timed(client, timeoutMs=30_000)  # the sleeper's own limit is 400 ms

    assert_failure(response, 504, "TIMEOUT")
    assert 0.4 <= elapsed < 1.5


def test_job_that_finishes_in_time_is_not_a_timeout(client: FlaskClient, release: Any) -> None:
    response = post_execute(client, "sleeper", {"seconds": 0.01})

    assert response.status_code == 200
    assert response.get_json()["data"] == {"slept": True}


# --------------------------------------------------------------------------- correlation, logs


def test_correlation_id_from_metadata_is_echoed(client: FlaskClient) -> None:
    response = post_execute(
        client, "raiser", {"kind": "conflict"}, metadata={"correlationId": CORRELATION_ID}
    )

    assert response.headers["X-Correlation-Id"] == CORRELATION_ID
    assert response.get_json()["error"]["correlationId"] == CORRELATION_ID


def test_correlation_id_header_is_used_without_metadata(client: FlaskClient) -> None:
    response = client.post(
        "/execute", json=request_body(), headers={"X-Correlation-Id": CORRELATION_ID}
    )

    assert response.headers["X-Correlation-Id"] == CORRELATION_ID


def test_a_correlation_id_is_made_up_when_none_is_given(client: FlaskClient) -> None:
    response = post_execute(client)

    assert is_uuid(response.headers["X-Correlation-Id"])


def test_one_json_log_line_per_job(client: FlaskClient, job_log: JobLog) -> None:
    ok_id, failed_id = new_uuid(), new_uuid()
    post_execute(client, jobId=ok_id, metadata={"correlationId": CORRELATION_ID})
    post_execute(client, "raiser", {"kind": "conflict"}, jobId=failed_id)

    entries = job_log.entries()
    assert len(entries) == 2
    ok, failed = entries
    assert ok["jobId"] == ok_id
    assert ok["capabilityId"] == "echo"
    assert ok["correlationId"] == CORRELATION_ID
    assert ok["outcome"] == "success"
    assert isinstance(ok["durationMs"], int | float) and ok["durationMs"] >= 0
    assert failed["jobId"] == failed_id
    assert failed["capabilityId"] == "raiser"
    assert is_uuid(failed["correlationId"])
    assert failed["outcome"] == "RESOURCE_CONFLICT"


def test_rejected_request_is_logged_once_too(client: FlaskClient, job_log: JobLog) -> None:
    client.post("/execute", data=b"{", content_type="application/json")

    entries = job_log.entries()
    assert len(entries) == 1
    assert entries[0]["outcome"] == "VALIDATION_ERROR"
    assert "durationMs" in entries[0]


# --------------------------------------------------------------------------- example runner


def test_example_text_stats(example_client: FlaskClient) -> None:
    response = post_execute(
        example_client, "text-stats", {"text": "The cat. The dog!\nA cat?", "top": 2}
    )

    assert response.status_code == 200
    body = response.get_json()
    assert_execution_response(body)
    assert body["data"] == {
        "characters": 24,
        "words": 6,
        "sentences": 3,
        "lines": 2,
        "top_words": [{"word": "the", "count": 2}, {"word": "cat", "count": 2}],
    }


def test_example_text_stats_rejects_a_number_as_text(example_client: FlaskClient) -> None:
    response = post_execute(example_client, "text-stats", {"text": 5})

    envelope = assert_failure(response, 400, "VALIDATION_ERROR")
    assert ["payload", "text"] in [d.get("path") for d in envelope["details"]]


def test_example_checksum_of_text(example_client: FlaskClient) -> None:
    response = post_execute(example_client, "checksum", {"data": "hello"})

    assert response.status_code == 200
    assert response.get_json()["data"] == {
        "algorithm": "sha256",
        "digest": hashlib.sha256(b"hello").hexdigest(),
        "bytes": 5,
    }


def test_example_checksum_of_base64(example_client: FlaskClient) -> None:
    response = post_execute(
        example_client, "checksum", {"data": "AAEC/w==", "encoding": "base64", "algorithm": "md5"}
    )

    assert response.status_code == 200
    assert response.get_json()["data"] == {
        "algorithm": "md5",
        "digest": hashlib.md5(b"\x00\x01\x02\xff").hexdigest(),
        "bytes": 4,
    }


def test_example_checksum_invalid_base64_is_400(example_client: FlaskClient) -> None:
    response = post_execute(
        example_client, "checksum", {"data": "not*base64", "encoding": "base64"}
    )

    envelope = assert_failure(response, 400, "VALIDATION_ERROR")
    assert envelope["code"] == "INVALID_BASE64"
    assert ["payload", "data"] in [d.get("path") for d in envelope["details"]]


def test_example_checksum_unknown_algorithm_is_400(example_client: FlaskClient) -> None:
    response = post_execute(example_client, "checksum", {"data": "x", "algorithm": "crc32"})

    envelope = assert_failure(response, 400, "VALIDATION_ERROR")
    assert ["payload", "algorithm"] in [d.get("path") for d in envelope["details"]]


def test_example_slow_count_completes(example_client: FlaskClient) -> None:
    response = post_execute(example_client, "slow-count", {"steps": 3, "step_ms": 5})

    assert response.status_code == 200
    assert response.get_json()["data"] == {"completed_steps": 3, "cancelled": False}


def test_example_slow_count_stopped_by_its_deadline_is_a_timeout(
    example_client: FlaskClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = JobThread.wait

    def late_wait(self: JobThread, timeout_s: float) -> bool:
        finished = original(self, timeout_s)
        time.sleep(0.1)  # the request thread is scheduled a moment late, as on a busy worker
        return finished

    monkeypatch.setattr(JobThread, "wait", late_wait)

    response = post_execute(
        example_client, "slow-count", {"steps": 100, "step_ms": 50}, timeoutMs=150
    )

    assert_failure(response, 504, "TIMEOUT")


def test_an_integer_beyond_any_double_is_a_400_not_a_500(client: FlaskClient) -> None:
    huge = "1" + "0" * 400
    body = json.dumps(request_body(timeoutMs=1000)).replace(
        '"timeoutMs": 1000', f'"timeoutMs": {huge}'
    )
    assert "0" * 400 in body
    response = client.post("/execute", data=body, content_type="application/json")
    error = assert_failure(response, 400, "VALIDATION_ERROR", job_known=False)
    assert error["code"] == "INVALID_JSON"


def test_there_is_no_static_route(client: FlaskClient) -> None:
    # Flask's default /static/<path> would serve a "static" folder of the working directory.
    response = client.get("/static/app.py")
    assert response.status_code == 404
    assert response.get_json()["error"]["code"] == "ROUTE_NOT_FOUND"
    assert not any(
        rule.rule.startswith("/static") for rule in client.application.url_map.iter_rules()
    )
