"""Jobs across the workers of one instance (DESIGN.md §3-4): heartbeat ``activeJobs`` is the sum
over every worker, ``maxConcurrency`` is per instance and survives a killed worker, and one jobId
delivered many times at once runs once.

Jobs are put on chosen workers through kept-alive connections: a gthread worker serves every
request of a kept-alive connection itself (see ``PinnedConnection``).
"""

from __future__ import annotations

import http.client
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest

from runnerkit.contracts import (
    ErrorEnvelopeSchema,
    RunnerExecutionResponseSchema,
    RunnerHeartbeatSchema,
)
from tests.instance.instance_support import (
    INTERVAL_S,
    Instance,
    Reply,
    call,
    job_request,
    pin_connections,
    wall_time,
)
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

REPLAYED = "idempotent-replayed"


def slow_job(steps: int, step_ms: int, job_id: str | None = None) -> dict:
    return job_request("slow-count", {"steps": steps, "step_ms": step_ms}, job_id=job_id)


def assert_completed(instance: Instance, reply: Reply, steps: int) -> dict:
    assert reply.status == 200, instance.explain(f"job answered {reply}")
    body = RunnerExecutionResponseSchema().load(reply.body)
    assert body["success"] is True, reply.body
    assert body["data"] == {"completed_steps": steps, "cancelled": False}, reply.body
    return body


# -- 4. activeJobs is the sum over the workers --------------------------------------------


def test_heartbeat_active_jobs_counts_the_jobs_running_on_every_worker(
    shared_instance: Instance,
) -> None:
    instance = shared_instance
    steps, step_ms = 20, 200  # 4 s
    pinned = pin_connections(instance.proc, [1, 1, 1])
    jobs = [(pid, conns[0], slow_job(steps, step_ms)) for pid, conns in pinned]
    assert len({pid for pid, _, _ in jobs}) == 3, "the jobs are not on three workers"
    try:
        with ThreadPoolExecutor(len(jobs)) as pool:
            sent = time.time()
            futures = [pool.submit(conn.execute, body) for _, conn, body in jobs]
            all_running = instance.wait_started([body["jobId"] for _, _, body in jobs])
            # Each job runs on the worker its connection was pinned to.
            for pid, conn, _ in jobs:
                assert instance.proc.worker_for_client_port(conn.client_port) == pid
            replies = [f.result(timeout=30) for f in futures]
        done = time.time()
        done_monotonic = time.monotonic()
    finally:
        for _, conn, _ in jobs:
            conn.close()
    for reply in replies:
        assert_completed(instance, reply, steps)

    # No job can end before it has slept all its steps, counted from when it was sent.
    earliest_end = sent + steps * step_ms / 1000.0 - 0.05
    during = [h for h in instance.heartbeats() if all_running <= wall_time(h) <= earliest_end]
    assert during, instance.explain(
        f"no heartbeat built between {all_running:.3f} and {earliest_end:.3f}"
    )
    for beat in during:
        RunnerHeartbeatSchema().load(beat.body)
        assert beat.body["activeJobs"] == 3, instance.explain(f"while 3 jobs ran: {beat.body}")

    after = instance.wait_heartbeat(
        since=done_monotonic, timeout=INTERVAL_S + 2.0, where=lambda h: wall_time(h) > done
    )
    assert after.body["activeJobs"] == 0, instance.explain(f"after the jobs: {after.body}")


# -- 5. maxConcurrency holds across workers, and a killed worker gives its slot back --------


def test_max_concurrency_is_per_instance_and_a_killed_worker_frees_its_slot(
    shared_instance_or_preloaded: Instance,
) -> None:
    instance = shared_instance_or_preloaded
    steps, step_ms = 25, 200  # 5 s
    # slow-count allows 4 at once: 2 jobs on one worker, 1 on each of two others.
    pinned = pin_connections(instance.proc, [2, 1, 1])
    jobs = [(pid, conn, slow_job(steps, step_ms)) for pid, conns in pinned for conn in conns]
    pool = ThreadPoolExecutor(len(jobs))
    try:
        futures = {body["jobId"]: pool.submit(conn.execute, body) for _, conn, body in jobs}
        instance.wait_started(futures)
        assert instance.held_slots()["slow-count"] == 4, instance.held_slots()

        # A fifth, on whichever worker takes it, finds no slot.
        fifth = call(instance.proc, "POST", "/execute", slow_job(1, 10))
        assert fifth.status == 429, instance.explain(f"fifth job: {fifth}")
        RunnerExecutionResponseSchema().load(fifth.body)
        error = ErrorEnvelopeSchema().load(fifth.body["error"])
        assert error["category"] == "RATE_LIMITED", error
        assert error["retryable"] is True, error
        assert error["retryAfter"] >= 0, error
        assert int(fifth.headers["retry-after"]) >= 1

        # SIGKILL the worker that runs exactly one of the four (the second pinned worker).
        victim, _, victim_body = jobs[2]
        assert sum(1 for pid, _, _ in jobs if pid == victim) == 1
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: not psutil.pid_exists(victim), 5.0, f"worker {victim} still alive")
        # Its caller loses the connection (no answer at all).
        lost = futures[victim_body["jobId"]].exception(timeout=5)
        assert isinstance(lost, http.client.HTTPException | ConnectionError), repr(lost)

        # Its slot is free at once: a new job is accepted and runs while the other 3 still do.
        survivors = [futures[body["jobId"]] for pid, _, body in jobs if pid != victim]

        def accepted() -> Reply | None:
            reply = call(instance.proc, "POST", "/execute", slow_job(2, 50))
            assert reply.status in (200, 429), instance.explain(f"new job: {reply}")
            return reply if reply.status == 200 else None

        new_job = wait_until(accepted, 2.0, lambda: instance.explain("the slot stayed taken"))
        assert_completed(instance, new_job, 2)
        assert not any(f.done() for f in survivors), "the other jobs ended too early"
        assert instance.held_slots()["slow-count"] == 3, instance.held_slots()

        for future in survivors:
            assert_completed(instance, future.result(timeout=30), steps)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        for _, conn, _ in jobs:
            conn.close()


# -- 6. one jobId delivered many times at once runs once ------------------------------------


def test_concurrent_deliveries_of_one_job_run_it_once(shared_instance: Instance) -> None:
    instance = shared_instance
    deliveries = 12
    steps, step_ms = 10, 100  # 1 s: every simultaneous delivery arrives while it runs
    body = slow_job(steps, step_ms)
    job_id = body["jobId"]
    pinned = pin_connections(instance.proc, [4, 4, 4])
    conns = [conn for _, group in pinned for conn in group]
    assert len(conns) == deliveries and len(pinned) == 3
    barrier = threading.Barrier(deliveries, timeout=10)

    def deliver(index: int) -> Reply:
        barrier.wait()
        return conns[index].execute(body)

    try:
        with ThreadPoolExecutor(deliveries) as pool:
            futures = [pool.submit(deliver, i) for i in range(deliveries)]
            replies = [f.result(timeout=30) for f in futures]
    finally:
        for conn in conns:
            conn.close()
    # Later redeliveries, after it finished, are replays.
    late = [call(instance.proc, "POST", "/execute", body) for _ in range(2)]
    answers = replies + late

    executed = [r for r in answers if r.status == 200 and REPLAYED not in r.headers]
    summary = [(r.status, r.headers.get(REPLAYED)) for r in answers]
    assert len(executed) == 1, instance.explain(f"answers (status, replayed): {summary}")
    original = assert_completed(instance, executed[0], steps)
    assert original["jobId"] == job_id
    conflicts = 0
    for reply in answers:
        if reply is executed[0]:
            continue
        if reply.status == 200:
            assert reply.headers[REPLAYED] == "true", reply
            assert reply.body == executed[0].body, "a replay is not the stored answer"
        else:
            assert reply.status == 409, instance.explain(f"delivery answered {reply}")
            RunnerExecutionResponseSchema().load(reply.body)
            error = ErrorEnvelopeSchema().load(reply.body["error"])
            assert error["category"] == "RESOURCE_CONFLICT", error
            assert error["retryable"] is True, error
            conflicts += 1
    assert all(r.status == 200 and r.headers.get(REPLAYED) == "true" for r in late), late
    assert conflicts >= 1, "no delivery arrived while the job ran"

    # It ran once: the ledger claimed it once, and its code reported completion once.
    row = instance.ledger_row(job_id)
    assert row is not None and row["state"] == "done" and row["attempt"] == 1, row

    def completions() -> set[str]:
        return {
            event.body["id"]
            for event in instance.progress_events(job_id)
            if event.body["data"]["percent"] == 100
        }

    wait_until(completions, 5.0, lambda: instance.explain("no completion event"))
    time.sleep(3 * 0.5)  # three more outbox rounds of the leader
    assert len(completions()) == 1, instance.explain(f"completion events: {completions()}")


def test_replays_are_not_logged_as_further_executions(shared_instance: Instance) -> None:
    instance = shared_instance
    body = job_request("checksum", {"data": "logged once"})
    replies = [call(instance.proc, "POST", "/execute", body) for _ in range(3)]
    assert [r.headers.get(REPLAYED) for r in replies] == [None, "true", "true"], replies
    records = wait_until(
        lambda: len(instance.job_log(body["jobId"])) == 3 and instance.job_log(body["jobId"]),
        5.0,
        lambda: instance.explain("the job log has not got a record per answer"),
    )
    executions = [r for r in records if r["outcome"] == "success" and not r.get("replayed")]
    assert len(executions) == 1, records
