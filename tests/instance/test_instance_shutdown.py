"""The instance's end, and the things that are not its end (DESIGN.md §2).

SIGTERM to the master drains: jobs in flight are answered, a request arriving meanwhile is
refused with 503, the runner is deregistered exactly once, the master exits. A SIGHUP reload and
a ``max_requests`` recycle replace workers but keep the instance: no DELETE, no registration.
"""

from __future__ import annotations

import http.client
import itertools
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest

from runnerkit.contracts import ErrorEnvelopeSchema, RunnerExecutionResponseSchema
from tests.instance.instance_support import (
    GUNICORN_CONF,
    INTERVAL_S,
    Instance,
    InstanceFactory,
    PinnedConnection,
    call,
    job_request,
    pin_to,
)
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

SLACK_S = 0.5

#: How the master is started: the product's config file, or bare ``gunicorn app:app`` (which
#: reads ./gunicorn.conf.py) with gunicorn's own gthread worker. Both with 6 threads a worker,
#: as launch_instance gives the config (GUNICORN_THREADS): the runner keeps 2 of them for
#: /health, and the three jobs of a test may all land on one worker (with 4, the third would
#: be refused 503 WORKER_BUSY).
#: With ``--preload`` the master imports the app before it binds and forks: the same must hold.
_PLAIN_ARGS = ["--worker-class", "gthread", "--threads", "6", "--graceful-timeout", "10"]
VARIANTS = {
    "gunicorn.conf.py": {"config": GUNICORN_CONF},
    "plain": {"config": None, "extra_args": _PLAIN_ARGS},
    "gunicorn.conf.py --preload": {"config": GUNICORN_CONF, "extra_args": ["--preload"]},
    "plain --preload": {"config": None, "extra_args": [*_PLAIN_ARGS, "--preload"]},
}


def assert_same_runner_carries_on(
    instance: Instance, since: float, runner_id: str, max_gap: float | None = None
) -> None:
    """Since ``since``: heartbeats keep coming, all from ``runner_id``, none refused (and none
    more than ``max_gap`` apart), and JobForge saw no registration and no DELETE at all."""
    beats = instance.heartbeats(since=since)
    assert len(beats) >= 2, instance.explain("heartbeats stopped")
    assert {b.body["runnerId"] for b in beats} == {runner_id}, instance.explain()
    assert {b.status for b in beats} == {200}, instance.explain()
    if max_gap is not None:
        gaps = heartbeat_gaps(instance, since)
        assert max(gaps) <= max_gap, instance.explain(f"heartbeat gaps {gaps}")
    assert instance.registrations(since=since) == [], instance.explain("registered again")
    assert instance.deletes() == [], instance.explain("deregistered")


def heartbeat_gaps(instance: Instance, since: float) -> list[float]:
    """Gaps between heartbeats from the last one before ``since`` on."""
    before = [b.time for b in instance.heartbeats() if b.time < since][-1:]
    times = before + [b.time for b in instance.heartbeats(since=since)]
    return [round(b - a, 3) for a, b in itertools.pairwise(times)]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_reload_keeps_the_runner_and_sigterm_drains_and_deregisters_once(
    make_instance: InstanceFactory, variant: str
) -> None:
    instance = make_instance(**VARIANTS[variant])
    registration = instance.wait_registered()
    runner_id = registration.response["runnerId"]
    # The port gunicorn listens on (bound after a --preload master imported the app).
    assert registration.body["healthCheckEndpoint"] == f"{instance.url}/health"
    instance.wait_heartbeat(since=time.monotonic(), where=lambda h: h.status == 200)

    # -- SIGHUP: every worker is replaced, the runner stays.
    old_workers = set(instance.proc.worker_pids())
    reloaded = time.monotonic()
    instance.proc.signal(signal.SIGHUP)
    wait_until(
        lambda: (
            len(instance.proc.worker_pids()) == 3
            and not old_workers & set(instance.proc.worker_pids())
        ),
        20.0,
        lambda: instance.explain(f"workers {old_workers} not replaced"),
    )
    instance.proc.wait_workers_serving(timeout=20.0)
    time.sleep(2 * INTERVAL_S + 0.3)
    assert_same_runner_carries_on(instance, reloaded, runner_id)
    assert instance.leader_pid() not in old_workers

    # -- SIGTERM while three jobs run.
    steps, step_ms = 10, 250  # 2.5 s
    bodies = [job_request("slow-count", {"steps": steps, "step_ms": step_ms}) for _ in range(3)]
    pool = ThreadPoolExecutor(len(bodies))
    idle: PinnedConnection | None = None
    try:
        futures = [pool.submit(call, instance.proc, "POST", "/execute", b) for b in bodies]
        instance.wait_started([b["jobId"] for b in bodies])
        idle = PinnedConnection(instance.proc)  # kept alive, idle when the signal comes
        terminated = time.monotonic()
        instance.proc.signal(signal.SIGTERM)
        wait_until(
            lambda: "Handling signal: term" in instance.proc.log_text(),
            5.0,
            lambda: instance.explain("the master did not handle SIGTERM"),
        )
        time.sleep(0.3)  # the master has signalled the workers; they are draining now
        try:
            late = idle.execute(job_request("checksum", {"data": "too late"}))
        except (http.client.HTTPException, ConnectionError) as exc:
            late = exc
        replies = [f.result(timeout=30) for f in futures]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        if idle is not None:
            idle.close()

    # Every job in flight was answered in full.
    for reply in replies:
        assert reply.status == 200, instance.explain(f"job in flight: {reply}")
        body = RunnerExecutionResponseSchema().load(reply.body)
        assert body["data"] == {"completed_steps": steps, "cancelled": False}, body
    # The request that came on a kept-alive connection after SIGTERM was refused, not run.
    assert not isinstance(late, Exception), f"{late!r}"
    assert late.status == 503, late
    error = ErrorEnvelopeSchema().load(late.body["error"])
    assert error["category"] == "SERVICE_UNAVAILABLE", error
    assert error["code"] == "SHUTTING_DOWN", error
    assert error["retryable"] is True, error
    assert late.headers.get("connection", "").lower() == "close", late.headers

    delete = instance.deregistered_once(runner_id)
    assert delete.status == 204
    assert delete.time > terminated
    assert instance.registrations(since=reloaded) == []
    # ... and the runner's log says so (the master's hook, or the sentinel, wrote it).
    assert f"deregistered runner {runner_id}" in instance.proc.log_text(), instance.explain()


@pytest.mark.parametrize("preload", [[], ["--preload"]], ids=["default", "--preload"])
def test_a_worker_recycled_by_max_requests_is_replaced_without_deregistering(
    make_instance: InstanceFactory, preload: list[str]
) -> None:
    max_requests = 5
    instance = make_instance(extra_args=["--max-requests", str(max_requests), *preload])
    runner_id = instance.wait_registered().response["runnerId"]
    instance.wait_heartbeat(since=time.monotonic(), where=lambda h: h.status == 200)
    leader = instance.leader_pid()
    workers = set(instance.proc.worker_pids())

    # Use up the leader's requests on connections it holds, until it recycles itself.
    recycling = time.monotonic()
    sent = 0
    deadline = time.monotonic() + 20.0
    while psutil.pid_exists(leader) and leader in instance.proc.worker_pids():
        assert time.monotonic() < deadline, instance.explain(f"leader {leader} never recycled")
        conn = http.client.HTTPConnection(instance.proc.host, instance.proc.port, timeout=5.0)
        try:
            conn.connect()
            port = conn.sock.getsockname()[1]
            conn.request("GET", "/health/live")
            response = conn.getresponse()
            response.read()
            if instance.proc.worker_for_client_port(port) != leader:
                continue
            while response.getheader("Connection", "").lower() != "close":
                conn.request("GET", "/health/live")
                response = conn.getresponse()
                response.read()
                sent += 1
                assert sent <= 10 * max_requests, instance.explain("no recycle")
        except (http.client.HTTPException, ConnectionError):
            pass
        finally:
            conn.close()
    wait_until(lambda: not psutil.pid_exists(leader), 10.0, f"leader {leader} did not exit")
    assert "Autorestarting worker after current request" in instance.proc.log_text()
    replaced = wait_until(
        lambda: (
            len(instance.proc.worker_pids()) == 3 and set(instance.proc.worker_pids()) - workers
        ),
        10.0,
        lambda: instance.explain("the recycled worker was not replaced"),
    )
    assert leader not in instance.proc.worker_pids() and replaced

    # The requests above recycle the other workers too, and on a loaded machine their
    # replacements take seconds to boot: what is checked is that heartbeats carry on as the
    # same runner, not how soon (no wall-clock bound here).
    wait_until(
        lambda: (
            len(instance.heartbeats(since=time.monotonic() - INTERVAL_S)) >= 1
            and len(instance.heartbeats(since=recycling)) >= 2
        ),
        20.0,
        lambda: instance.explain("heartbeats stopped after the recycle"),
    )
    assert_same_runner_carries_on(instance, recycling, runner_id)
    assert instance.leader_pid() != leader


def test_a_reload_while_the_leader_runs_a_job_keeps_heartbeating(
    make_instance: InstanceFactory,
) -> None:
    instance = make_instance()
    runner_id = instance.wait_registered().response["runnerId"]
    instance.wait_heartbeat(since=time.monotonic(), where=lambda h: h.status == 200)
    leader = instance.leader_pid()
    steps, step_ms = 30, 200  # 6 s on the leader
    body = job_request("slow-count", {"steps": steps, "step_ms": step_ms})
    with ThreadPoolExecutor(1) as pool:
        conn = pin_to(instance.proc, leader)
        try:
            job = pool.submit(conn.execute, body)
            instance.wait_started([body["jobId"]])
            reloaded = time.monotonic()
            instance.proc.signal(signal.SIGHUP)
            reply = job.result(timeout=30)
        finally:
            conn.close()
    assert reply.status == 200, reply  # the old leader finishes its job
    wait_until(lambda: not psutil.pid_exists(leader), 10.0, f"old leader {leader} still alive")
    time.sleep(2 * INTERVAL_S + 0.3)
    # The instance lives on: heartbeats must not pause for the old leader's drain.
    assert_same_runner_carries_on(instance, reloaded, runner_id, max_gap=2 * INTERVAL_S + SLACK_S)


def test_a_stopped_leader_is_replaced_and_the_instance_still_deregisters_once(
    make_instance: InstanceFactory,
) -> None:
    """SIGSTOP of the leading worker: it keeps its lock, but its lease expires and another
    worker heartbeats on as the same runner. Resumed, it steps down (one warning) instead of
    heartbeating beside its successor; SIGTERM then deregisters the runner exactly once."""
    instance = make_instance()
    runner_id = instance.wait_registered().response["runnerId"]
    instance.wait_heartbeat(since=time.monotonic(), where=lambda h: h.status == 200)
    leader = instance.leader_pid()
    stopped = psutil.Process(leader)
    stopped_at = time.monotonic()
    stopped.suspend()
    try:
        successor = wait_until(
            lambda: (pid := instance.leader_pid()) != leader and pid,
            15.0,
            lambda: instance.explain(f"nobody took over from the stopped leader {leader}"),
        )
        instance.wait_heartbeat(since=time.monotonic(), where=lambda h: h.status == 200)
    finally:
        stopped.resume()
    wait_until(
        lambda: instance.proc.log_text().count("steps down") == 1,
        10.0,
        lambda: instance.explain("the resumed leader did not step down"),
    )
    resumed_at = time.monotonic()
    time.sleep(2 * INTERVAL_S + 0.3)
    assert_same_runner_carries_on(instance, stopped_at, runner_id)
    assert len(instance.heartbeats(since=resumed_at)) >= 2, instance.explain()
    assert instance.leader_pid() == successor
    assert instance.proc.log_text().count("steps down") == 1, instance.explain()

    terminated = time.monotonic()
    instance.proc.signal(signal.SIGTERM)
    assert instance.deregistered_once(runner_id).time > terminated
