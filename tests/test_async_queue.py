"""Asynchronous jobs wait for a slot in a bounded queue: past MAX_QUEUED_JOBS, a 429."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from runnerkit import Runner
from runnerkit.testing import JobForgeStub
from tests.helpers import assert_failure, request_body
from tests.support.waiting import wait_until

ASYNC = {"Prefer": "respond-async"}


def test_async_jobs_past_the_queue_limit_are_refused_with_429(
    runner: Runner, tmp_path: Path, jobforge_stub: JobForgeStub, release: threading.Event
) -> None:
    app = runner.create_app(
        {
            "RUNNERKIT_JOBFORGE_URL": jobforge_stub.url,
            "RUNNERKIT_STATE_DIR": str(tmp_path / "state"),
            "RUNNERKIT_MAX_QUEUED_JOBS": 2,
        }
    )
    client = app.test_client()
    ledger = runner.state.ledger
    try:
        _fill_the_queue(client, ledger, jobforge_stub, release)
    finally:
        runner.close()


def _fill_the_queue(client: Any, ledger: Any, jobforge_stub: JobForgeStub, release: Any) -> None:

    # The sleeper (maxConcurrency 1) takes the first job and blocks; two more may wait.
    first = client.post("/execute", json=request_body("sleeper", {"seconds": 10}), headers=ASYNC)
    assert first.status_code == 202, first.get_json()
    wait_until(lambda: ledger.queued() == 0, 5, "the first job to start")
    waiting = [
        client.post("/execute", json=request_body("sleeper", {"seconds": 10}), headers=ASYNC)
        for _ in range(2)
    ]
    assert [r.status_code for r in waiting] == [202, 202]
    assert ledger.queued() == 2

    refused_body = request_body("sleeper", {"seconds": 10})
    refused = client.post("/execute", json=refused_body, headers=ASYNC)
    error = assert_failure(refused, 429, "RATE_LIMITED")
    assert error["code"] == "QUEUE_FULL" and error["retryable"] is True
    assert refused.headers["Retry-After"] == "1"
    assert ledger.queued() == 2  # the refused job left nothing behind

    release.set()
    wait_until(lambda: ledger.queued() == 0, 5, "the waiting jobs to end")
    # Refused, not lost: once there is room the same job is accepted.
    again = client.post("/execute", json=refused_body, headers=ASYNC)
    assert again.status_code == 202, again.get_json()
    delivered = wait_until(
        lambda: {r.body["jobId"] for r in jobforge_stub.results()} >= {refused_body["jobId"]},
        10,
        "the accepted job's result",
    )
    assert delivered
