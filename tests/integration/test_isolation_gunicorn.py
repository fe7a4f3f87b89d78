"""Process isolation under the product's gunicorn settings: forks from gthread workers.

Real ``gunicorn tests.integration.isolated_app:app`` with two workers on a loopback port.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import requests

from runnerkit.testing import documents
from tests.helpers import new_uuid
from tests.integration.isolated_app import stubborn_pids
from tests.support import GunicornProcess, running
from tests.support.waiting import wait_until

APP = "tests.integration.isolated_app:app"


def _execute(proc: GunicornProcess, capability: str, payload: dict[str, Any]) -> Any:
    body = {
        "jobId": new_uuid(),
        "moduleId": "isolation-test",
        "capabilityId": capability,
        "payload": payload,
    }
    return requests.post(f"{proc.url}/execute", json=body, timeout=30)


def test_jobs_run_in_children_of_the_workers(start_gunicorn: Any) -> None:
    proc = start_gunicorn(app_spec=APP, all_workers=True)
    workers = set(proc.worker_pids())

    answers = [_execute(proc, "where", {}) for _ in range(6)]

    for answer in answers:
        assert answer.status_code == 200, answer.text
        data = answer.json()["data"]
        assert data["parentPid"] in workers, (data, workers, proc.log_text()[-2000:])
        assert data["pid"] not in workers


def test_a_stubborn_job_is_killed_at_its_deadline_and_frees_its_slot(
    start_gunicorn: Any, tmp_path: Path
) -> None:
    proc = start_gunicorn(app_spec=APP, all_workers=True)
    first_pids = tmp_path / "first"

    started = time.monotonic()
    first = _execute(proc, "stubborn", {"pidFile": str(first_pids)})
    elapsed = time.monotonic() - started

    assert first.status_code == 504, first.text
    assert first.json()["error"]["category"] == "TIMEOUT"
    assert elapsed < 5.0, f"answered after {elapsed:.1f} s; the deadline is 0.4 s"
    pids = stubborn_pids(first_pids)
    wait_until(
        lambda: not any(running(pid) for pid in pids),
        timeout=5.0,
        message=lambda: f"outlived the deadline: {[p for p in pids if running(p)]}",
    )
    # maxConcurrency 1 for the instance: the next job runs (and is killed in turn) instead of
    # meeting 429 CAPACITY_EXCEEDED, whichever worker it reaches.
    second = _execute(proc, "stubborn", {"pidFile": str(tmp_path / "second")})
    assert second.status_code == 504, second.text
    assert (tmp_path / "second").exists()
    health = requests.get(f"{proc.url}/health", timeout=5)
    assert health.status_code == 200, health.text


def _wait_for_job(forge: str, job_id: str, timeout: float = 30.0) -> dict[str, Any]:
    """The JobResponse of ``job_id`` once it has ended (completed, failed or cancelled)."""

    def ended() -> dict[str, Any] | None:
        job: dict[str, Any] = requests.get(f"{forge}/jobs/{job_id}", timeout=5).json()
        return job if job["status"] in ("completed", "failed", "cancelled") else None

    job = wait_until(ended, timeout=timeout, message=f"job {job_id} did not end")
    assert job is not None
    return job


def test_through_the_forge_progress_and_results_cross_from_the_child(
    forge_server: str, start_gunicorn: Any
) -> None:
    """Asynchronous jobs (timeoutMs above the forge's async threshold): the child's progress
    and answer go worker → outbox → forge; a killed job is recorded as a TIMEOUT failure."""
    proc = start_gunicorn(
        app_spec=APP,
        standalone=False,
        env={"RUNNERKIT_JOBFORGE_URL": forge_server},
        ready_path="/health/ready",
        all_workers=True,
    )
    wait_until(
        lambda: requests.get(f"{forge_server}/runners", timeout=5).json()["total"] == 1,
        timeout=20.0,
        message="the runner did not register",
    )
    where = documents.job_request("isolated.where", {"note": "async"}, timeoutMs=20_000)
    stubborn = documents.job_request(
        "isolated.stubborn",
        {"pidFile": "/dev/null"},
        timeoutMs=20_000,
        retryPolicy={"maxRetries": 0},
    )
    for job in (where, stubborn):
        accepted = requests.post(f"{forge_server}/jobs", json=job, timeout=5)
        assert accepted.status_code == 202, accepted.text

    done = _wait_for_job(forge_server, where["id"])
    assert done["status"] == "completed", done
    assert done["result"]["data"]["parentPid"] in proc.worker_pids()

    def progress() -> list[dict[str, Any]]:
        events = requests.get(f"{forge_server}/jobs/{where['id']}/events", timeout=5).json()
        return [e["data"] for e in events["items"] if e["type"] == "job.progress"]

    # Progress travels through the outbox: it may arrive after the result, and is then
    # marked with the attempt it belongs to.
    reported = wait_until(progress, timeout=15.0, message="no job.progress event arrived")
    halfway = {"percent": 50, "message": "halfway"}
    assert reported in ([halfway], [{**halfway, "attempt": 1}])

    killed = _wait_for_job(forge_server, stubborn["id"])
    assert killed["status"] == "failed", killed
    assert killed["error"]["category"] == "TIMEOUT", killed
