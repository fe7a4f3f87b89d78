"""Adversarial values through a real gunicorn runner: exact round trips, and no secret leaks.

The runner is tests/security/echo_app.py (2 workers, the product's gunicorn config); its
stdout and stderr go to one log file, which is read after each exchange.

Scope of "no leak": runnerkit must not put a secret into a log line, an error envelope or a
header. The ``echo`` capability's *result* is its own business: it returns its payload, secret
included, and runnerkit passes job results through unaltered (the contract's redaction rule
is about logs; ``data`` is ``unknown`` and JobForge needs it verbatim). So in a success answer
the secret appears exactly where the capability put it, and nowhere else.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from runnerkit.contracts import RunnerExecutionResponseSchema, is_uuid
from tests.security.stack import QUICK, Stack, failure_envelope, strict_loads
from tests.support import GunicornProcess

pytestmark = pytest.mark.integration

SECRET = "s3cr3t-7f2c91d4-adversarial"
BIG = 9999999999999999  # 2**53 < BIG: a double cannot hold it (it would become 1e16)

PAYLOAD: dict[str, Any] = {
    "emptyObject": {},
    "emptyArray": [],
    "nothing": None,
    "nulls": [None, {"inner": None}],
    "nested": {"level2": {"level3": {"level4": {"leaf": "deep", "list": [[[]]]}}}},
    "unicode": "Zürich — 東京 — مرحبا — Ωμέγα",
    "emoji": "🚀🔥👩‍💻🏳️‍🌈",
    "escapes": 'quote" backslash\\ newline\n tab\t nul\u0000 lone-ascii-del\u007f',
    "bigInt": BIG,
    "negativeBigInt": -BIG,
    "smallFloat": 0.1,
    "zero": 0,
    "bools": [True, False],
    "secretField_token": SECRET,
    "credentials": {"secretField_token": SECRET},
}


@pytest.fixture(scope="module")
def echo_runner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GunicornProcess]:
    stack = Stack(tmp_path_factory.mktemp("adversarial"))
    try:
        yield stack.runner("tests.security.echo_app:app", workers=2)
    finally:
        stack.stop()


def request_for(capability: str, payload: Any, **extra: Any) -> dict[str, Any]:
    return {
        "jobId": str(uuid.uuid4()),
        "moduleId": "security",
        "capabilityId": capability,
        "payload": payload,
        **extra,
    }


def post(
    runner: GunicornProcess, data: bytes, headers: dict[str, str] | None = None
) -> requests.Response:
    merged = {"Content-Type": "application/json", **(headers or {})}
    return requests.post(runner.url + "/execute", data=data, headers=merged, timeout=QUICK)


def log_lines_mentioning(runner: GunicornProcess, text: str) -> list[dict[str, Any]]:
    return [
        json.loads(line)
        for line in runner.log_text().splitlines()
        if line.startswith("{") and text in line
    ]


def assert_no_secret_in_log(runner: GunicornProcess) -> None:
    log = runner.log_text()
    assert SECRET not in log, [line for line in log.splitlines() if SECRET in line]


def test_adversarial_values_round_trip_exactly(echo_runner: GunicornProcess) -> None:
    body = request_for("echo", PAYLOAD)
    # ensure_ascii=False: the body carries raw UTF-8, emoji and all.
    raw = json.dumps(body, ensure_ascii=False).encode("utf-8")
    correlation = str(uuid.uuid4())
    response = post(
        echo_runner,
        raw,
        {"Authorization": f"Bearer {SECRET}", "X-Correlation-Id": correlation},
    )
    assert response.status_code == 200, response.text
    answer = strict_loads(response.content)
    RunnerExecutionResponseSchema().load(answer)
    echoed = answer["data"]["echo"]
    assert echoed == PAYLOAD
    # Exactly the same values, not merely equal ones: no int became a float.
    assert type(echoed["bigInt"]) is int and echoed["bigInt"] == BIG
    assert type(echoed["negativeBigInt"]) is int and echoed["negativeBigInt"] == -BIG
    text = response.text
    assert "9999999999999999" in text
    for rounded in ("1e16", "1e+16", "1.0e16", "10000000000000000"):
        assert rounded not in text
    # The secret comes back only where the capability returned it (twice), nowhere else.
    assert text.count(SECRET) == 2
    assert SECRET not in json.dumps(dict(response.headers))
    assert response.headers["X-Correlation-Id"] == correlation
    assert_no_secret_in_log(echo_runner)


def test_the_payload_reaches_the_log_redacted_and_exact(echo_runner: GunicornProcess) -> None:
    body = request_for("echo", PAYLOAD)
    response = post(echo_runner, json.dumps(body).encode(), {"Authorization": f"Bearer {SECRET}"})
    assert response.status_code == 200, response.text
    lines = [
        x
        for x in log_lines_mentioning(echo_runner, body["jobId"])
        if x["message"] == "echo payload"
    ]
    assert len(lines) == 1, echo_runner.log_tail()
    logged = lines[0]["input"]
    assert logged["secretField_token"] == "[REDACTED]"
    assert logged["credentials"] == {"secretField_token": "[REDACTED]"}
    assert type(logged["bigInt"]) is int and logged["bigInt"] == BIG
    expected = {k: v for k, v in PAYLOAD.items() if k not in ("secretField_token", "credentials")}
    assert {k: v for k, v in logged.items() if k in expected} == expected
    assert_no_secret_in_log(echo_runner)


def _nested(depth: int) -> Any:
    value: Any = []
    for _ in range(depth):
        value = [value]
    return value


#: name → (raw body, extra headers, expected status, expected category)
ERROR_CASES: dict[str, tuple[bytes, dict[str, str], int, str]] = {
    "secret-named field fails validation": (
        json.dumps(request_for("vault", {"name": "n", "secretField_token": SECRET})).encode(),
        {},
        400,
        "VALIDATION_ERROR",
    ),
    "broken JSON around the secret": (
        b'{"jobId": "'
        + str(uuid.uuid4()).encode()
        + b'", "payload": {"secretField_token": "'
        + SECRET.encode()
        + b'", ',
        {},
        400,
        "VALIDATION_ERROR",
    ),
    "JSON with the secret as a bare word": (
        b'{"payload": ' + SECRET.encode() + b"}",
        {},
        400,
        "VALIDATION_ERROR",
    ),
    "unknown capability": (
        json.dumps(request_for("no-such-capability", PAYLOAD)).encode(),
        {},
        404,
        "RESOURCE_NOT_FOUND",
    ),
    "request invalid, secret in the bearer header": (
        json.dumps({"jobId": "not-a-uuid", "payload": PAYLOAD}).encode(),
        {"Authorization": f"Bearer {SECRET}"},
        400,
        "VALIDATION_ERROR",
    ),
    "secret as the correlation id header": (
        json.dumps(request_for("vault", {"count": 1})).encode(),
        {"X-Correlation-Id": SECRET},
        400,
        "VALIDATION_ERROR",
    ),
    "secret in a body that is not JSON": (
        f"secretField_token={SECRET}".encode(),
        {"Content-Type": "application/x-www-form-urlencoded"},
        415,
        "VALIDATION_ERROR",
    ),
    "secret in a body nested too deeply": (
        json.dumps(
            request_for("echo", {"secretField_token": SECRET, "deep": _nested(80)})
        ).encode(),
        {},
        400,
        "VALIDATION_ERROR",
    ),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_error_answers_do_not_echo_secrets(echo_runner: GunicornProcess, case: str) -> None:
    raw, headers, status, category = ERROR_CASES[case]
    response = post(echo_runner, raw, headers)
    assert response.status_code == status, response.text
    error = failure_envelope(response)
    assert error["category"] == category
    assert SECRET not in response.text
    assert SECRET not in json.dumps(dict(response.headers))
    assert is_uuid(response.headers["X-Correlation-Id"])
    assert_no_secret_in_log(echo_runner)


def test_a_secret_named_field_is_named_but_its_value_not_echoed(
    echo_runner: GunicornProcess,
) -> None:
    body = request_for("vault", {"name": "n", "secretField_token": SECRET, "count": "seven"})
    response = post(echo_runner, json.dumps(body).encode())
    assert response.status_code == 400
    details = {tuple(d["path"]): d for d in failure_envelope(response)["details"]}
    assert "value" not in details[("payload", "secretField_token")]
    # A field that is not secret-named still gets its short excerpt (it helps the caller).
    assert details[("payload", "count")]["value"] == "seven"


def test_a_value_under_a_secret_named_object_is_not_echoed(echo_runner: GunicornProcess) -> None:
    body = request_for("vault", {"name": "n", "auth_token": {"value": SECRET}})
    response = post(echo_runner, json.dumps(body).encode())
    assert response.status_code == 400
    failure_envelope(response)
    assert SECRET not in response.text
