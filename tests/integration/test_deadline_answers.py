"""Under gunicorn a job's code runs on its request's thread, and its ``TIMEOUT`` is sent at the
deadline by the process's deadline watcher while the code runs on (``runnerkit.runner.deadlines``).

Real ``gunicorn tests.integration.deadline_app:app`` (the product's settings, two workers) on a
loopback port; the capability sleeps past its 300 ms deadline without looking at it.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import requests

from tests.helpers import new_uuid
from tests.support import GunicornProcess
from tests.support.waiting import wait_until

APP = "tests.integration.deadline_app:app"
#: How long the stubborn job sleeps: well past its 300 ms deadline.
SLEEP_MS = 3_000


def _body(ms: int, job_id: str | None = None) -> dict[str, Any]:
    return {
        "jobId": job_id or new_uuid(),
        "moduleId": "deadline-test",
        "capabilityId": "sleepy",
        "payload": {"ms": ms},
    }


def _job_lines(proc: GunicornProcess, job_id: str) -> list[dict[str, Any]]:
    lines = []
    for line in proc.log_text().splitlines():
        if job_id in line and line.startswith("{"):
            record = json.loads(line)
            if record.get("component") == "runnerkit.job":
                lines.append(record)
    return lines


@pytest.fixture
def runner(start_gunicorn: Any) -> GunicornProcess:
    proc: GunicornProcess = start_gunicorn(app_spec=APP, all_workers=True)
    return proc


def test_a_job_past_its_deadline_is_answered_then_while_its_code_runs_on(
    runner: GunicornProcess,
) -> None:
    body = _body(SLEEP_MS)
    started = time.monotonic()
    answer = requests.post(f"{runner.url}/execute", json=body, timeout=30)
    elapsed = time.monotonic() - started
    code_ends = started + SLEEP_MS / 1000.0

    assert answer.status_code == 504, answer.text
    assert answer.json()["error"]["code"] == "DEADLINE_EXCEEDED"
    assert answer.json()["jobId"] == body["jobId"]
    assert answer.headers["X-Correlation-Id"]
    # The request's thread stays with the code: the connection is not kept for another.
    assert answer.headers["Connection"] == "close"
    assert elapsed < SLEEP_MS / 1000.0 - 1.0, f"answered after {elapsed:.2f} s, not at 0.3 s"

    # While the code runs on, the job still holds its slot and its claim, in any worker.
    assert time.monotonic() < code_ends - 0.5
    again = requests.post(f"{runner.url}/execute", json=body, timeout=30)
    assert again.status_code == 409, again.text
    assert again.json()["error"]["code"] == "JOB_ALREADY_RUNNING"
    other = requests.post(f"{runner.url}/execute", json=_body(1), timeout=30)
    assert other.status_code == 429, other.text
    assert time.monotonic() < code_ends, "the code returned before the checks were done"

    # Once it returns, its slot is free and the timed-out job may be sent again (TIMEOUT is
    # retryable: a new attempt, which this time finishes in time).
    def slot_free() -> requests.Response | None:
        response = requests.post(f"{runner.url}/execute", json=_body(1), timeout=30)
        return response if response.status_code == 200 else None

    wait_until(slot_free, timeout=20, message="the slot was never given back")
    retry = requests.post(f"{runner.url}/execute", json=_body(1, body["jobId"]), timeout=30)
    assert retry.status_code == 200, retry.text

    # One log line for the timed-out attempt (sent at the deadline), one for the retry.
    lines = _job_lines(runner, body["jobId"])
    outcomes = [line.get("outcome") for line in lines if line.get("status") != 409]
    assert outcomes == ["TIMEOUT", "success"], lines


def test_jobs_in_time_keep_the_connection_and_never_meet_the_watcher(
    runner: GunicornProcess,
) -> None:
    with requests.Session() as session:
        answers = [
            session.post(f"{runner.url}/execute", json=_body(1), timeout=30) for _ in range(20)
        ]
    assert [a.status_code for a in answers] == [200] * 20
    assert all(a.headers.get("Connection", "keep-alive") != "close" for a in answers)
    assert all(a.json()["data"] == {"slept": 1} for a in answers)
