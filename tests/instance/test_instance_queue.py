"""The instance's line of asynchronous jobs waiting for a slot (issue 15, item 10).

Jobs accepted with ``Prefer: respond-async`` wait for a slot of their capability. Whichever
worker accepted each, they get slots first come, first served; and when the instance drains,
those that have not started never do: each is answered with a retryable ``SHUTTING_DOWN``
through the outbox, delivered, like the result of the job still running, before the
instance's one DELETE.

The runner is ``tests/instance/queue_app.py``: one capability with a single slot whose jobs
note their start in one file, so the start order across workers is read, not inferred from
timing.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest

from runnerkit.contracts import RunnerExecutionResponseSchema
from tests.instance.instance_support import (
    Instance,
    InstanceFactory,
    PinnedConnection,
    job_request,
    pin_connections,
)
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

QUEUE_APP = "tests.instance.queue_app:app"
ASYNC = {"Prefer": "respond-async"}


def _queue_instance(make_instance: InstanceFactory, tmp_path: Path) -> tuple[Instance, Path, Path]:
    starts, release = tmp_path / "starts.txt", tmp_path / "release"
    instance = make_instance(
        app=QUEUE_APP,
        env={"QUEUE_APP_STARTS": str(starts), "QUEUE_APP_RELEASE": str(release)},
    )
    instance.wait_registered()
    return instance, starts, release


def _started(starts: Path) -> list[int]:
    return [int(line) for line in starts.read_text().split()] if starts.exists() else []


def _hold_the_slot(instance: Instance, starts: Path) -> dict[str, Any]:
    """An asynchronous job that takes the one slot and keeps it until released."""
    blocker = job_request("one-at-a-time", {"tag": 0, "hold": True})
    conn = PinnedConnection(instance.proc)
    try:
        accepted = conn.request("POST", "/execute", blocker, ASYNC)
    finally:
        conn.close()
    assert accepted.status == 202, instance.explain(f"the blocker: {accepted}")
    wait_until(
        lambda: _started(starts) == [0],
        15.0,
        lambda: instance.explain(f"the blocker did not start: {_started(starts)}"),
    )
    return blocker


def _queue_on_every_worker(instance: Instance, tags: list[int]) -> list[dict[str, Any]]:
    """Asynchronous jobs accepted one after another, by the workers in turn."""
    pinned = pin_connections(instance.proc, [(len(tags) + 2) // 3] * 3)
    conns = [conn for _, worker_conns in pinned for conn in worker_conns]
    jobs = []
    try:
        for n, tag in enumerate(tags):
            conn = pinned[n % 3][1][n // 3]
            job = job_request("one-at-a-time", {"tag": tag})
            reply = conn.request("POST", "/execute", job, ASYNC)
            assert reply.status == 202, instance.explain(f"job {tag}: {reply}")
            jobs.append(job)
    finally:
        for conn in conns:
            conn.close()
    return jobs


def _result(instance: Instance, job: dict[str, Any]) -> Any:
    found = [r for r in instance.stub.results() if r.path == f"/jobs/{job['jobId']}/result"]
    return found[0] if found else None


def test_waiting_jobs_get_the_slot_first_come_first_served_whichever_worker_took_them(
    make_instance: InstanceFactory, tmp_path: Path
) -> None:
    instance, starts, release = _queue_instance(make_instance, tmp_path)
    blocker = _hold_the_slot(instance, starts)
    waiting = _queue_on_every_worker(instance, list(range(1, 10)))
    release.touch()

    jobs = [blocker, *waiting]
    wait_until(
        lambda: all(_result(instance, j) for j in jobs),
        30.0,
        lambda: instance.explain(f"not every result came; started {_started(starts)}"),
    )
    assert _started(starts) == list(range(10)), instance.explain("started out of turn")
    for n, job in enumerate(jobs):
        body = RunnerExecutionResponseSchema().load(_result(instance, job).body)
        assert body["success"] is True and body["data"] == {"tag": n}, body


def test_on_sigterm_jobs_not_started_are_answered_shutting_down_before_deregistration(
    make_instance: InstanceFactory, tmp_path: Path
) -> None:
    instance, starts, release = _queue_instance(make_instance, tmp_path)
    runner_id = instance.runner_id()
    blocker = _hold_the_slot(instance, starts)
    waiting = _queue_on_every_worker(instance, [1, 2, 3, 4])

    instance.proc.signal(signal.SIGTERM)
    # Answered during the drain, while the running job still holds its worker (and so the
    # master, and the deregistration): the outbox is delivered while the instance drains.
    wait_until(
        lambda: all(_result(instance, j) for j in waiting),
        8.0,
        lambda: instance.explain("the waiting jobs were not answered during the drain"),
    )
    assert instance.deletes() == [], instance.explain("deregistered with a job running")
    release.touch()

    deleted = instance.deregistered_once(runner_id).time

    assert _started(starts) == [0], instance.explain("a waiting job started during the drain")
    for job in waiting:
        result = _result(instance, job)
        assert result.time < deleted, instance.explain("answered after the DELETE")
        body = RunnerExecutionResponseSchema().load(result.body)
        assert body["success"] is False, body
        error = body["error"]
        assert error["code"] == "SHUTTING_DOWN", error
        assert error["category"] == "SERVICE_UNAVAILABLE", error
        assert error["retryable"] is True, error
    done = wait_until(lambda: _result(instance, blocker), 5.0, "the running job's result")
    assert done.time < deleted, instance.explain("the running job's result after the DELETE")
    body = RunnerExecutionResponseSchema().load(done.body)
    assert body["success"] is True and body["data"] == {"tag": 0}, body
