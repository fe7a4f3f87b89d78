"""A runner configured with several JobForge URLs (forges sharing one database) fails over
when the one it uses is unreachable: heartbeats and async results go to the next, under the
same runnerId and without registering again; the deregistration follows."""

from __future__ import annotations

import time

import pytest

from tests.instance.instance_support import (
    InstanceFactory,
    PinnedConnection,
    StubFactory,
    job_request,
    stop_instance,
)
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration


def test_heartbeats_and_results_move_to_the_second_forge_when_the_first_stops(
    make_stub: StubFactory, make_instance: InstanceFactory
) -> None:
    first = make_stub()
    second = make_stub().share_database(first)
    instance = make_instance(
        stub=first, env={"RUNNERKIT_JOBFORGE_URL": f"{first.url},{second.url}"}
    )
    runner_id = instance.wait_registered().response["runnerId"]
    instance.wait_heartbeat(time.monotonic(), timeout=15.0)
    assert second.calls() == [], "the first URL answers: nothing goes to the second"

    first.stop()
    stopped = time.monotonic()
    wait_until(
        lambda: [h for h in second.heartbeats() if h.status == 200],
        20.0,
        lambda: instance.explain("no heartbeat reached the second forge"),
    )
    # Same identity, no second registration: the forges share the runner's record.
    assert {h.body["runnerId"] for h in second.heartbeats()} == {runner_id}
    assert second.registrations() == []
    assert len(instance.accepted_registrations()) == 1

    # An async job's result (delivered through the outbox) reaches the second forge.
    job = job_request("slow-count", {"steps": 2, "step_ms": 50})
    conn = PinnedConnection(instance.proc)
    try:
        accepted = conn.request("POST", "/execute", job, {"Prefer": "respond-async"})
    finally:
        conn.close()
    assert accepted.status == 202, instance.explain(f"async job: {accepted}")
    results = wait_until(
        lambda: [r for r in second.results() if r.path == f"/jobs/{job['jobId']}/result"],
        20.0,
        lambda: instance.explain("the async job's result did not reach the second forge"),
    )
    assert results[0].status == 200 and results[0].body["success"] is True, results[0].body
    assert first.calls(since=stopped) == []
    wait_until(
        lambda: f"now using {second.url}" in instance.proc.log_text(),
        10.0,
        lambda: instance.explain("no log line says the runner moved"),
    )

    # The sentinel's deregistration, once gunicorn has exited, goes to the second as well.
    stop_instance(instance)
    wait_until(
        lambda: [d for d in second.deletes() if d.path == f"/runners/{runner_id}"],
        15.0,
        lambda: instance.explain("the deregistration did not reach the second forge"),
    )
