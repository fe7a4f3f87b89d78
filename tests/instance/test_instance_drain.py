"""A drain delivers everything, quietly (issue item 5).

SIGTERM while jobs run: the lifecycle of each draining worker keeps running until the worker
really exits, so the instance keeps a leader that delivers the outbox; every progress event
and the result of a job that finishes during the drain reach JobForge before the instance's
one DELETE, and the log stays JSON lines (no traceback of a scheduler whose executor was shut
down under it).
"""

from __future__ import annotations

import json
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from runnerkit.contracts import RunnerExecutionResponseSchema
from tests.instance.instance_support import (
    InstanceFactory,
    PinnedConnection,
    call,
    job_request,
)
from tests.instance.test_instance_shutdown import VARIANTS as SHUTDOWN_VARIANTS
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

#: slow-count reports progress after each step; the runner sends at most one a second, so
#: steps just over a second apart each get reported.
STEPS, STEP_MS = 8, 1050

#: The product's config, and bare gthread (no runnerkit worker class) with gunicorn's own lines
#: in JSON too, so that every line of the log is checked.
VARIANTS = {
    "gunicorn.conf.py": SHUTDOWN_VARIANTS["gunicorn.conf.py"],
    "plain": {
        **SHUTDOWN_VARIANTS["plain"],
        "extra_args": [
            *SHUTDOWN_VARIANTS["plain"]["extra_args"],
            "--logger-class",
            "runnerkit.gunicorn_logging.JsonLogger",
        ],
    },
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_sigterm_delivers_every_progress_event_and_result_before_deregistering(
    make_instance: InstanceFactory, variant: str
) -> None:
    instance = make_instance(**VARIANTS[variant])
    runner_id = instance.wait_registered().response["runnerId"]
    payload = {"steps": STEPS, "step_ms": STEP_MS}
    async_job = job_request("slow-count", payload)
    sync_job = job_request("slow-count", payload)
    conn = PinnedConnection(instance.proc)
    try:
        accepted = conn.request("POST", "/execute", async_job, {"Prefer": "respond-async"})
    finally:
        conn.close()
    assert accepted.status == 202, instance.explain(f"async job: {accepted}")
    pool = ThreadPoolExecutor(1)
    try:
        sync_reply = pool.submit(call, instance.proc, "POST", "/execute", sync_job)
        wait_until(
            lambda: all(
                len(instance.progress_events(j["jobId"])) >= 2 for j in (async_job, sync_job)
            ),
            15.0,
            lambda: instance.explain("the jobs did not report progress twice"),
        )
        terminated = time.monotonic()
        instance.proc.signal(signal.SIGTERM)
        reply = sync_reply.result(timeout=30)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    assert reply.status == 200, instance.explain(f"sync job: {reply}")
    assert reply.body["data"] == {"completed_steps": STEPS, "cancelled": False}

    deleted = instance.deregistered_once(runner_id).time
    assert deleted > terminated

    for job in (async_job, sync_job):
        events = instance.progress_events(job["jobId"])
        messages = sorted({e.body["data"]["message"] for e in events}, key=lambda m: int(m[5:]))
        assert messages == [f"step {n}" for n in range(1, STEPS + 1)], instance.explain(
            f"progress of {job['jobId']}: {messages}"
        )
        assert all(e.time < deleted for e in events), instance.explain("progress after DELETE")
        assert {e.status for e in events} == {202}, instance.explain()
    results = [r for r in instance.stub.results() if r.path == f"/jobs/{async_job['jobId']}/result"]
    assert results and results[0].time < deleted, instance.explain("no result before DELETE")
    body = RunnerExecutionResponseSchema().load(results[0].body)
    assert body["data"] == {"completed_steps": STEPS, "cancelled": False}

    # A quiet drain: every line is a JSON log record, none a scheduler's traceback.
    log = instance.proc.log_text()
    assert "cannot schedule" not in log, instance.explain()
    for line in log.splitlines():
        if not line.strip():
            continue
        try:
            json.loads(line)
        except ValueError:
            pytest.fail(instance.explain(f"not a JSON log line: {line!r}"))
