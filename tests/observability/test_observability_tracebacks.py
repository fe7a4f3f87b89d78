"""An unhandled exception in a capability is logged in the job's own line, with its ids.

A real runner (``tests/observability/crash_app.py``, gunicorn, 2 workers) runs a capability
that raises ``ValueError`` on a job thread, in a forked child (``isolation = "process"``) and
on the request's thread (``isolation = "inline"``). For each, the one JSON line of the job
carries ``jobId``, ``correlationId`` and ``capabilityId`` and, as ``exception``, the traceback
down to the capability's own frame; no separate line holds the traceback without them. A job
that succeeds has no ``exception`` field.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import requests

from tests.observability.test_observability_logs import json_lines, lines_of
from tests.security.stack import QUICK, Stack, failure_envelope
from tests.support import GunicornProcess

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def crash_runner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GunicornProcess]:
    stack = Stack(tmp_path_factory.mktemp("tracebacks"))
    try:
        yield stack.runner("tests.observability.crash_app:app", workers=2)
    finally:
        stack.stop()


def run_job(runner: GunicornProcess, capability: str) -> tuple[str, str, requests.Response]:
    job_id, correlation_id = str(uuid.uuid4()), str(uuid.uuid4())
    body = {
        "jobId": job_id,
        "moduleId": "tracebacks",
        "capabilityId": capability,
        "payload": {},
        "metadata": {"correlationId": correlation_id},
    }
    response = requests.post(runner.url + "/execute", json=body, timeout=QUICK)
    return job_id, correlation_id, response


@pytest.mark.parametrize("capability", ["crash-thread", "crash-process", "crash-inline"])
def test_the_traceback_rides_in_the_jobs_own_line(
    crash_runner: GunicornProcess, capability: str
) -> None:
    job_id, correlation_id, response = run_job(crash_runner, capability)

    assert response.status_code == 500
    error = failure_envelope(response)
    assert (error["category"], error["code"]) == ("RUNTIME_ERROR", "UNHANDLED_EXCEPTION")
    assert "Traceback" not in response.text and "boom" not in response.text

    (line,) = lines_of(crash_runner, job_id)
    assert line["correlationId"] == correlation_id
    assert line["capabilityId"] == capability
    assert line["level"] == "error"
    assert line["error"] == {"code": "UNHANDLED_EXCEPTION", "category": "RUNTIME_ERROR"}
    mode = capability.removeprefix("crash-")
    assert line["exception"].startswith("Traceback (most recent call last)"), line
    assert "in explode_somewhere_deep" in line["exception"]
    assert line["exception"].endswith(f"ValueError: boom in {mode}")

    # No other line carries the traceback (the one without ids this replaces).
    loose = [
        x
        for x in json_lines(crash_runner)
        if f"boom in {mode}" in str(x.get("exception", "")) and x.get("jobId") != job_id
    ]
    assert loose == []


def test_a_successful_job_line_has_no_exception(crash_runner: GunicornProcess) -> None:
    job_id, _, response = run_job(crash_runner, "fine")
    assert response.status_code == 200
    (line,) = lines_of(crash_runner, job_id)
    assert line["outcome"] == "success" and line["level"] == "info"
    assert "exception" not in line
