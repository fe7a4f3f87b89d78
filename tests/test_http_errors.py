"""Everything that can go wrong before or around a job leaves as a JSON ErrorEnvelope."""

from __future__ import annotations

import json
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from runnerkit import Runner
from runnerkit.service.settings import ConfigError
from tests.helpers import (
    JOB_ID,
    SECRET,
    assert_envelope,
    assert_failure,
    request_body,
    strict_json,
)

# --------------------------------------------------------------------------- the body


@pytest.mark.parametrize(
    "raw",
    [b"{", b"", b"not json", b'{"jobId": }', b"\xff\xfe{}", b'{"a": 1}{"b": 2}'],
    ids=["truncated", "empty", "text", "syntax", "not-utf8", "two-values"],
)
def test_body_that_is_not_json_is_400(client: FlaskClient, raw: bytes) -> None:
    response = client.post("/execute", data=raw, content_type="application/json")

    envelope = assert_failure(response, 400, "VALIDATION_ERROR", job_known=False)
    assert envelope["code"] == "INVALID_JSON"


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_wrong_or_missing_content_type_is_415(
    client: FlaskClient, content_type: str | None
) -> None:
    raw = json.dumps(request_body()).encode()

    response = client.post("/execute", data=raw, content_type=content_type)

    envelope = assert_failure(response, 415, "VALIDATION_ERROR", job_known=False)
    assert envelope["code"] == "UNSUPPORTED_MEDIA_TYPE"


@pytest.mark.parametrize(
    "content_type", ["application/json; charset=utf-8", "application/vnd.jobforge+json"]
)
def test_json_content_types_with_parameters_or_suffix_are_accepted(
    client: FlaskClient, content_type: str
) -> None:
    raw = json.dumps(request_body()).encode()

    response = client.post("/execute", data=raw, content_type=content_type)

    assert response.status_code == 200


@pytest.mark.parametrize("value", [[request_body()], "text", 5, None, True])
def test_json_that_is_not_an_object_is_400(client: FlaskClient, value: Any) -> None:
    response = client.post("/execute", data=json.dumps(value), content_type="application/json")

    envelope = assert_failure(response, 400, "VALIDATION_ERROR", job_known=False)
    assert envelope["code"] == "INVALID_BODY"


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
@pytest.mark.parametrize("where", ["payload", "timeoutMs"])
def test_nan_and_infinity_are_rejected(client: FlaskClient, constant: str, where: str) -> None:
    if where == "payload":
        raw = json.dumps(request_body(payload={"message": "PLACEHOLDER"}))
        raw = raw.replace('"PLACEHOLDER"', constant)
    else:
        raw = json.dumps(request_body(timeoutMs="PLACEHOLDER")).replace('"PLACEHOLDER"', constant)

    response = client.post("/execute", data=raw, content_type="application/json")

    assert_failure(response, 400, "VALIDATION_ERROR", job_known=False)


def test_a_number_overflowing_to_infinity_is_not_echoed_in_the_400(client: FlaskClient) -> None:
    raw = json.dumps(request_body(payload={"message": "PLACEHOLDER"}))
    raw = raw.replace('"PLACEHOLDER"', "1e400")

    response = client.post("/execute", data=raw, content_type="application/json")

    envelope = assert_failure(response, 400, "VALIDATION_ERROR", job_known=False)
    assert envelope["code"] == "INVALID_JSON"
    assert any("out of range" in d["message"] for d in envelope["details"])


def test_a_number_overflowing_to_infinity_is_rejected(client: FlaskClient) -> None:
    raw = json.dumps(request_body(payload={"message": "x", "note": "PLACEHOLDER"}))
    raw = raw.replace('"PLACEHOLDER"', "1e400")

    response = client.post("/execute", data=raw, content_type="application/json")

    assert response.status_code == 400
    strict_json(response)


# --------------------------------------------------------------------------- size limit


@pytest.mark.parametrize("app_config", [{"RUNNERKIT_MAX_BODY_BYTES": 200}])
def test_body_under_the_limit_is_accepted(client: FlaskClient) -> None:
    raw = json.dumps(request_body()).encode()
    assert len(raw) < 200

    response = client.post("/execute", data=raw, content_type="application/json")

    assert response.status_code == 200


@pytest.mark.parametrize("app_config", [{"RUNNERKIT_MAX_BODY_BYTES": 200}])
def test_body_over_the_configured_limit_is_413(client: FlaskClient) -> None:
    raw = json.dumps(request_body(payload={"message": "x" * 300})).encode()

    response = client.post("/execute", data=raw, content_type="application/json")

    envelope = assert_failure(response, 413, "VALIDATION_ERROR", job_known=False)
    assert envelope["code"] == "PAYLOAD_TOO_LARGE"


def test_default_limit_is_one_mebibyte(client: FlaskClient) -> None:
    raw = b"{" + b" " * (1_048_576 - 1)  # exactly 1 MiB + 1 byte with the closing brace
    raw += b"}"
    assert len(raw) == 1_048_576 + 1

    response = client.post("/execute", data=raw, content_type="application/json")

    envelope = assert_failure(response, 413, "VALIDATION_ERROR", job_known=False)
    assert envelope["code"] == "PAYLOAD_TOO_LARGE"


@pytest.mark.parametrize("limit", [0, -5])
def test_a_non_positive_body_limit_in_app_config_is_refused(
    runner: Runner, base_config: dict[str, Any], limit: int
) -> None:
    with pytest.raises(ConfigError, match="MAX_BODY_BYTES"):
        runner.create_app({**base_config, "RUNNERKIT_MAX_BODY_BYTES": limit})


def test_the_413_answer_is_a_json_envelope(runner: Runner, base_config: dict[str, Any]) -> None:
    """With Flask's own limit in force, the blueprint turns it into the contract's shape."""
    app = runner.create_app({**base_config, "MAX_CONTENT_LENGTH": 100})
    raw = json.dumps(request_body(payload={"message": "x" * 300})).encode()

    response = app.test_client().post("/execute", data=raw, content_type="application/json")

    envelope = assert_failure(response, 413, "VALIDATION_ERROR", job_known=False)
    assert envelope["code"] == "PAYLOAD_TOO_LARGE"
    assert "100 bytes" in envelope["message"]  # the limit in force, not the runner default


# --------------------------------------------------------------------------- routes


@pytest.mark.parametrize(("method", "path"), [("GET", "/nope"), ("POST", "/execute/extra")])
def test_unknown_route_is_404_json(client: FlaskClient, method: str, path: str) -> None:
    response = client.open(path, method=method)

    envelope = assert_failure(response, 404, "RESOURCE_NOT_FOUND", job_known=False)
    assert path in envelope["message"]
    assert b"<html" not in response.data.lower()


@pytest.mark.parametrize(("method", "path"), [("GET", "/execute"), ("POST", "/health")])
def test_wrong_method_is_405_json_with_allow(client: FlaskClient, method: str, path: str) -> None:
    response = client.open(path, method=method)

    envelope = assert_failure(response, 405, "VALIDATION_ERROR", job_known=False)
    assert method in envelope["message"]
    assert "Allow" in response.headers
    assert b"<html" not in response.data.lower()


def test_exception_in_a_route_is_a_500_json_envelope(
    client: FlaskClient, runner: Runner, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken() -> Any:
        raise RuntimeError(f"database password is {SECRET}")

    monkeypatch.setattr(runner, "health", broken)

    response = client.get("/health")

    envelope = assert_failure(response, 500, "INTERNAL_ERROR", job_known=False)
    text = response.get_data(as_text=True)
    assert SECRET not in text
    assert "Traceback" not in text
    assert b"<html" not in response.data.lower()
    assert envelope["retryable"] is True


def test_exception_inside_the_execute_pipeline_is_a_json_envelope(
    client: FlaskClient, runner: Runner, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any) -> Any:
        raise ZeroDivisionError(SECRET)

    monkeypatch.setattr(runner.executor, "execute", broken)

    response = client.post("/execute", json=request_body())

    assert_failure(response, 500, "INTERNAL_ERROR", job_known=False)
    assert SECRET not in response.get_data(as_text=True)


def test_exception_in_an_app_route_of_the_author_is_json_too(app: Flask) -> None:
    @app.get("/custom")
    def custom() -> str:
        raise ValueError(SECRET)

    response = app.test_client().get("/custom")

    assert_failure(response, 500, "INTERNAL_ERROR", job_known=False)
    assert SECRET not in response.get_data(as_text=True)


def test_http_errors_raised_by_routes_keep_their_status(app: Flask) -> None:
    from werkzeug.exceptions import Forbidden

    @app.get("/forbidden")
    def forbidden() -> str:
        raise Forbidden()

    response = app.test_client().get("/forbidden")

    assert_failure(response, 403, "AUTHORIZATION_ERROR", job_known=False)


def test_every_error_body_of_execute_is_a_valid_envelope(client: FlaskClient) -> None:
    """A sweep over the failure answers: each one validates, whatever produced it."""
    answers = [
        client.post("/execute", data=b"[", content_type="application/json"),
        client.post("/execute", data=b"{}", content_type="text/plain"),
        client.post("/execute", json={"jobId": JOB_ID}),
        client.post("/execute", json=request_body("missing")),
        client.post("/execute", json=request_body("raiser", {"kind": "runtime"})),
        client.post("/execute", json=request_body("bad-output", {"kind": "wrong_type"})),
        client.get("/does-not-exist"),
        client.delete("/execute"),
    ]

    for response in answers:
        assert response.status_code >= 400
        body = response.get_json()
        assert body["success"] is False
        assert_envelope(body["error"])


def test_invented_http_methods_do_not_grow_metrics_labels(client: FlaskClient) -> None:
    invented = [f"BREW{index}" for index in range(5)]
    for method in invented:
        response = client.open("/execute", method=method)
        assert response.status_code == 405
        assert_envelope(response.get_json()["error"])

    text = client.get("/metrics").get_data(as_text=True)

    assert 'method="other"' in text
    assert not any(f'method="{method}"' in text for method in invented)
