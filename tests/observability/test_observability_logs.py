"""Structured JSON logs and correlation ids, as a real gunicorn runner writes them to stderr.

The runner is tests/security/echo_app.py (2 workers); its ``echo`` capability logs through
``ctx.logger``, through a ``runnerkit.*`` logger, and through a plain third-party logger.

What runnerkit guarantees, and what is checked: runnerkit's own loggers (``runnerkit.*``, which
includes ``ctx.logger``) write one JSON object per line with the contract's field names, the
job's line carries jobId/capabilityId/outcome/durationMs, and every line written while a job
runs carries its correlationId, which is the one sent (metadata, else ``X-Correlation-Id``)
or a generated uuid, and is returned in the ``X-Correlation-Id`` answer header. A third-party
logger gets no handler from runnerkit: its WARNING reaches stderr only through Python's
last-resort handler, as plain text without ids (checked as such, not as a guarantee).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from runnerkit.contracts import is_uuid
from tests.security.stack import QUICK, Stack, failure_envelope
from tests.support import GunicornProcess
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

LEVELS = {"debug", "info", "warn", "error", "fatal"}
TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")
SERVICE, VERSION = "security-echo", "2.3.4"


@pytest.fixture(scope="module")
def echo_runner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GunicornProcess]:
    stack = Stack(tmp_path_factory.mktemp("logs"))
    try:
        yield stack.runner("tests.security.echo_app:app", workers=2)
    finally:
        stack.stop()


def execute(
    runner: GunicornProcess,
    capability: str = "echo",
    payload: Any = None,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> tuple[str, requests.Response]:
    job_id = str(uuid.uuid4())
    body = {
        "jobId": job_id,
        "moduleId": "observability",
        "capabilityId": capability,
        "payload": {"message": "hello"} if payload is None else payload,
        **extra,
    }
    response = requests.post(
        runner.url + "/execute", json=body, headers=headers or {}, timeout=QUICK
    )
    return job_id, response


def json_lines(runner: GunicornProcess) -> list[dict[str, Any]]:
    return [json.loads(x) for x in runner.log_text().splitlines() if x.startswith("{")]


def lines_of(runner: GunicornProcess, job_id: str, minimum: int = 1) -> list[dict[str, Any]]:
    """The JSON lines of one job (waiting briefly: the job line is written after answering)."""

    def found() -> list[dict[str, Any]]:
        lines = [x for x in json_lines(runner) if x.get("jobId") == job_id]
        return lines if len(lines) >= minimum else []

    result: list[dict[str, Any]] = wait_until(found, 5, f"{minimum} log lines of job {job_id}")
    return result


def assert_contract_fields(line: dict[str, Any]) -> None:
    assert TIMESTAMP.match(line["timestamp"]), line
    assert line["level"] in LEVELS, line
    assert isinstance(line["message"], str) and line["message"], line
    assert (line["service"], line["version"]) == (SERVICE, VERSION), line
    assert is_uuid(line["correlationId"]), line


def test_a_jobs_lines_have_the_contract_fields_and_the_sent_correlation_id(
    echo_runner: GunicornProcess,
) -> None:
    correlation = str(uuid.uuid4())
    job_id, response = execute(echo_runner, headers={"X-Correlation-Id": correlation})
    assert response.status_code == 200, response.text
    assert response.headers["X-Correlation-Id"] == correlation
    lines = lines_of(echo_runner, job_id, minimum=3)
    for line in lines:
        assert_contract_fields(line)
        assert line["correlationId"] == correlation, line
    by_message = {line["message"]: line for line in lines}
    job_line = by_message["job completed"]
    assert job_line["component"] == "runnerkit.job"
    assert job_line["capabilityId"] == "echo"
    assert job_line["outcome"] == "success"
    assert isinstance(job_line["durationMs"], int | float) and job_line["durationMs"] >= 0
    assert job_line["level"] == "info"
    # The capability's own lines: through ctx.logger, and through a runnerkit.* logger.
    ctx_line = by_message["echo received its payload"]
    assert ctx_line["capabilityId"] == "echo" and ctx_line["component"].startswith(
        "runnerkit.capability."
    )
    assert by_message["echo payload"]["input"] == {"message": "hello"}


def test_a_third_party_loggers_line_is_not_runnerkits_to_format(
    echo_runner: GunicornProcess,
) -> None:
    correlation = str(uuid.uuid4())
    job_id, response = execute(echo_runner, headers={"X-Correlation-Id": correlation})
    assert response.status_code == 200
    lines_of(echo_runner, job_id, minimum=3)
    text = f"thirdparty library line for job {job_id}"
    matching = [x for x in echo_runner.log_text().splitlines() if text in x]
    assert len(matching) == 1, "the WARNING reaches stderr (Python's last-resort handler)"
    # Only lines that pass a runnerkit formatter are JSON with ids; should this one ever be
    # formatted (a root handler), it must carry the job's correlation id like the others.
    if matching[0].startswith("{"):
        assert json.loads(matching[0])["correlationId"] == correlation


def test_the_metadata_correlation_id_wins_over_the_header(echo_runner: GunicornProcess) -> None:
    in_metadata, in_header = str(uuid.uuid4()), str(uuid.uuid4())
    job_id, response = execute(
        echo_runner,
        headers={"X-Correlation-Id": in_header},
        metadata={"correlationId": in_metadata},
    )
    assert response.status_code == 200
    assert response.headers["X-Correlation-Id"] == in_metadata
    assert {x["correlationId"] for x in lines_of(echo_runner, job_id, 3)} == {in_metadata}


@pytest.mark.parametrize("header", [None, "", "not-a-uuid", "x" * 300])
def test_a_correlation_id_is_generated_when_none_usable_is_sent(
    echo_runner: GunicornProcess, header: str | None
) -> None:
    headers = {} if header is None else {"X-Correlation-Id": header}
    job_id, response = execute(echo_runner, headers=headers)
    assert response.status_code == 200
    generated = response.headers["X-Correlation-Id"]
    assert is_uuid(generated) and generated != header
    assert {x["correlationId"] for x in lines_of(echo_runner, job_id, 3)} == {generated}


def test_every_request_gets_its_own_generated_correlation_id(
    echo_runner: GunicornProcess,
) -> None:
    seen = {execute(echo_runner)[1].headers["X-Correlation-Id"] for _ in range(5)}
    assert len(seen) == 5


@pytest.mark.parametrize(
    ("capability", "payload", "status", "outcome", "code"),
    [
        ("vault", {"count": 1}, 400, "VALIDATION_ERROR", "PAYLOAD_INVALID"),
        ("missing", {}, 404, "RESOURCE_NOT_FOUND", "CAPABILITY_NOT_FOUND"),
    ],
)
def test_a_failed_job_is_logged_with_its_outcome_and_error(
    echo_runner: GunicornProcess,
    capability: str,
    payload: dict[str, Any],
    status: int,
    outcome: str,
    code: str,
) -> None:
    correlation = str(uuid.uuid4())
    job_id, response = execute(
        echo_runner, capability, payload, headers={"X-Correlation-Id": correlation}
    )
    assert response.status_code == status
    envelope = failure_envelope(response)
    assert envelope["correlationId"] == correlation
    assert response.headers["X-Correlation-Id"] == correlation
    (line,) = lines_of(echo_runner, job_id)
    assert_contract_fields(line)
    assert line["message"] == "job failed"
    assert (line["outcome"], line["status"], line["capabilityId"]) == (outcome, status, capability)
    assert line["error"] == {"code": code, "category": envelope["category"]}
    assert line["correlationId"] == correlation


def test_a_request_without_a_job_id_is_logged_with_its_correlation_id(
    echo_runner: GunicornProcess,
) -> None:
    correlation = str(uuid.uuid4())
    response = requests.post(
        echo_runner.url + "/execute",
        data=b"{broken",
        headers={"Content-Type": "application/json", "X-Correlation-Id": correlation},
        timeout=QUICK,
    )
    assert response.status_code == 400
    assert response.headers["X-Correlation-Id"] == correlation

    def logged() -> list[dict[str, Any]]:
        return [x for x in json_lines(echo_runner) if x.get("correlationId") == correlation]

    (line,) = wait_until(logged, 5, "the refused request's log line")
    assert_contract_fields(line)
    assert line["jobId"] is None and line["outcome"] == "VALIDATION_ERROR"
    assert line["error"]["code"] == "INVALID_JSON"


def test_every_json_line_uses_the_contract_levels(echo_runner: GunicornProcess) -> None:
    execute(echo_runner)
    lines = json_lines(echo_runner)
    assert lines
    for line in lines:
        assert line["level"] in LEVELS, line
        assert TIMESTAMP.match(line["timestamp"]), line
        if line["component"].startswith("gunicorn.") and line["service"] == "gunicorn":
            continue  # gunicorn's own lines written before the app was loaded (the master's)
        assert (line["service"], line["version"]) == (SERVICE, VERSION), line
        if "correlationId" in line:
            assert is_uuid(line["correlationId"]), line


def test_ctx_logger_keeps_the_capabilitys_extra_fields(echo_runner: GunicornProcess) -> None:
    job_id, response = execute(echo_runner, payload={"message": "hi", "api_token": "t0k3n"})
    assert response.status_code == 200
    lines = lines_of(echo_runner, job_id, minimum=3)
    (ctx_line,) = [x for x in lines if x["message"] == "echo received its payload"]
    assert ctx_line["input"] == {"message": "hi", "api_token": "[REDACTED]"}


def test_runnerkits_startup_warnings_are_json_lines(echo_runner: GunicornProcess) -> None:
    def warnings() -> list[dict[str, Any]]:
        lines = echo_runner.log_text().splitlines()
        return [json.loads(x) for x in lines if "REQUEST SIGNING IS OFF" in x]

    # Each worker warns as it loads the app; the second may boot after the first answers.
    wait_until(lambda: len(warnings()) >= 2, 30, "both workers' startup warnings")
    # Jobs next: the warning is a worker's startup line, not one per request.
    for _ in range(4):
        assert execute(echo_runner)[1].status_code == 200
    entries = warnings()
    assert len(entries) == 2, "a runner without a secret warns once in each of its 2 workers"
    for entry in entries:
        assert entry["level"] == "warn" and entry["service"] == SERVICE


def test_a_413_answer_carries_the_correlation_id(echo_runner: GunicornProcess) -> None:
    correlation = str(uuid.uuid4())
    response = requests.post(
        echo_runner.url + "/execute",
        data=b"{" + b" " * 1_100_000 + b"}",
        headers={"Content-Type": "application/json", "X-Correlation-Id": correlation},
        timeout=QUICK,
    )
    assert response.status_code == 413
    assert failure_envelope(response).get("correlationId") == correlation
    assert response.headers.get("X-Correlation-Id") == correlation
