"""The dispatcher over real HTTP: the forge served by werkzeug, fake runners as HTTP servers.

Timing assertions are lower bounds only (a retry must not come *before* its delay); upper
bounds are the generous ``wait_for`` timeouts.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from runnerkit.contracts import format_timestamp, parse_timestamp
from runnerkit.errors import retry_delay
from runnerkit.forge import db as forge_db
from runnerkit.service.signing import verify
from tests.forge.helpers import (
    Call,
    FakeRunner,
    ForgeServer,
    MakeForge,
    MakeRunner,
    Reply,
    capability,
    envelope,
    new_id,
    store,
    sync_request,
    valid,
    valid_page,
    wait_for,
)

#: Timer granularity allowed below a lower bound.
SLACK_S = 0.005


req = sync_request


def fail_with(status: int, category: str, code: str, *, retryable: bool, **extra: Any):
    def reply(fake: FakeRunner, call: Call) -> Reply:
        error = envelope(category, code, retryable=retryable, **extra)
        return Reply(status=status, body=fake.failure(call, error))

    return reply


def event_types(server: ForgeServer, job_id: str) -> list[str]:
    return [e["type"] for e in server.events(job_id)]


# --------------------------------------------------------------------------- routing


def test_routes_by_type_with_a_contract_request(
    make_forge: MakeForge, make_runner: MakeRunner
) -> None:
    forge = make_forge(RUNNER_TOKEN="out-token", SIGNING_SECRET="sig-secret")
    alpha = make_runner("alpha", [capability("cap-a", ["type.a"], 2)])
    beta = make_runner("beta", [capability("cap-b", ["type.b", "type.c"], 2)])
    alpha.register(forge.url)
    beta.register(forge.url)
    correlation = new_id()
    job_a = forge.submit(req("type.a", data={"n": 1}, correlationId=correlation, userId="u1"))
    job_b = forge.submit(req("type.b", data={"n": 2}))
    job_c = forge.submit(req("type.c", data={"n": 3}))

    done_a = forge.wait_status(job_a["id"], "completed")
    forge.wait_status(job_b["id"], "completed")
    forge.wait_status(job_c["id"], "completed")

    assert [c.body["jobId"] for c in alpha.calls] == [job_a["id"]]
    assert sorted(c.body["jobId"] for c in beta.calls) == sorted([job_b["id"], job_c["id"]])
    assert alpha.request_errors == [] and beta.request_errors == []

    (call,) = alpha.calls
    assert call.body == {
        "jobId": job_a["id"],
        "moduleId": "alpha",
        "capabilityId": "cap-a",
        "payload": {"n": 1},
        "timeoutMs": 5000,
        "metadata": {"correlationId": correlation, "userId": "u1"},
    }
    assert call.headers["x-correlation-id"] == correlation
    assert call.headers["authorization"] == "Bearer out-token"
    assert "prefer" not in call.headers
    signed = call.headers["x-webhook-timestamp"].encode() + b"." + call.raw
    expected = hmac.new(b"sig-secret", signed, hashlib.sha256).hexdigest()
    assert call.headers["x-webhook-signature"] == f"v1={expected}"
    assert abs(int(call.headers["x-webhook-timestamp"]) - time.time() * 1000) < 60_000
    assert len({c.headers["x-webhook-event-id"] for c in alpha.calls + beta.calls}) == 3
    assert verify(call.headers, call.raw, ["sig-secret"]) == call.headers["x-webhook-event-id"]
    # Without a correlationId of its own, a job gets one that is stable across attempts.
    beta_call = beta.calls_for(job_b["id"])[0]
    assert beta_call.body["metadata"]["correlationId"] == beta_call.headers["x-correlation-id"]

    result = done_a["result"]
    assert result["success"] is True
    assert result["data"] == {"echo": {"n": 1}}
    assert result["metadata"]["runnerId"] == alpha.runner_id
    assert result["metadata"]["attempts"] == 1
    assert event_types(forge, job_a["id"]) == [
        "job.created",
        "job.queued",
        "job.started",
        "job.completed",
    ]


def test_a_job_no_runner_can_take_stays_queued(
    make_forge: MakeForge, make_runner: MakeRunner
) -> None:
    forge = make_forge()
    make_runner("alpha", [capability("cap-a", ["type.a"])]).register(forge.url)
    job = forge.submit(req("type.unknown"))
    other = forge.submit(req("type.a"))
    forge.wait_status(other["id"], "completed")
    time.sleep(0.1)
    assert forge.job(job["id"])["status"] == "queued"


def test_priority_then_age(make_forge: MakeForge, make_runner: MakeRunner) -> None:
    forge = make_forge()
    runner = make_runner("solo", [capability("cap", ["type.a"], 1)])
    ids = {}
    for label, priority in (("low", 10), ("high1", 90), ("mid", 50), ("high2", 90)):
        ids[label] = forge.submit(req(priority=priority))["id"]
    time.sleep(0.05)
    runner.register(forge.url)  # only now can anything run
    for job_id in ids.values():
        forge.wait_status(job_id, "completed")
    order = [c.body["jobId"] for c in runner.calls]
    assert order == [ids["high1"], ids["high2"], ids["mid"], ids["low"]]


def test_one_tick_takes_the_highest_priorities_up_to_max_concurrency(
    make_forge: MakeForge, make_runner: MakeRunner
) -> None:
    """Jobs waiting when a runner appears are claimed together, best first, never too many."""
    forge = make_forge()
    hold = threading.Event()
    runner = make_runner("batch", [capability("cap", ["type.a"], 3)], lambda f, c: Reply(hold=hold))
    ids = {p: forge.submit(req(priority=p))["id"] for p in (10, 95, 40, 80, 60, 90, 20)}
    runner.register(forge.url)
    wait_for(lambda: len(runner.calls) >= 3, what="the first three executions")
    time.sleep(0.2)  # ticks go on while the three are held: none may start a fourth
    assert {c.body["jobId"] for c in runner.calls} == {ids[95], ids[90], ids[80]}
    hold.set()
    for job_id in ids.values():
        forge.wait_status(job_id, "completed")
    assert runner.max_running == {"cap": 3}
    assert len(runner.calls) == len(ids)  # each job ran once
    # The second batch is claimed best first too: the lowest priority starts last. (The order
    # the runner sees its calls in is the send threads', not the claims': under load the call
    # of a job claimed later can overtake one claimed before it.)
    started = {p: forge.job(ids[p])["result"]["metadata"]["startedAt"] for p in ids}
    assert max(started[60], started[40], started[20]) <= started[10]
    assert min(started[60], started[40], started[20]) >= max(started[95], started[90], started[80])


def test_a_backlog_of_one_type_does_not_block_another(
    make_forge: MakeForge, make_runner: MakeRunner
) -> None:
    forge = make_forge(DISPATCH_THREADS=2)
    hold = threading.Event()
    busy = make_runner("busy", [capability("cap", ["type.a"], 1)], lambda f, c: Reply(hold=hold))
    busy.register(forge.url)
    make_runner("idle", [capability("cap", ["type.b"], 1)]).register(forge.url)
    backlog = [forge.submit(req("type.a", priority=90))["id"] for _ in range(30)]
    other = forge.submit(req("type.b", priority=10))
    forge.wait_status(other["id"], "completed")
    assert len(busy.calls) == 1
    hold.set()
    forge.wait_status(backlog[1], "completed")


def test_max_concurrency_is_never_exceeded_and_load_is_spread(
    make_forge: MakeForge, make_runner: MakeRunner
) -> None:
    forge = make_forge()
    slow: Callable[[FakeRunner, Call], Reply] = lambda fake, call: Reply(delay=0.25)  # noqa: E731
    two = make_runner("two", [capability("cap", ["type.a"], 2)], slow)
    three = make_runner("three", [capability("cap", ["type.a"], 3)], slow)
    two.register(forge.url)
    three.register(forge.url)
    jobs = [forge.submit(req())["id"] for _ in range(12)]
    for job_id in jobs:
        forge.wait_status(job_id, "completed", timeout=15)
    assert two.max_running == {"cap": 2}
    assert three.max_running == {"cap": 3}
    assert len(two.calls) + len(three.calls) == 12
    assert len(two.calls) >= 3 and len(three.calls) >= 3


def test_scheduled_jobs_wait_for_their_time(make_forge: MakeForge, make_runner: MakeRunner) -> None:
    forge = make_forge()
    runner = make_runner("r", [capability("cap", ["type.a"])])
    runner.register(forge.url)
    at = datetime.now(UTC) + timedelta(milliseconds=400)
    job = forge.submit(req(scheduledAt=format_timestamp(at)))
    now = forge.submit(req())
    forge.wait_status(now["id"], "completed")
    # Unless the machine took 400 ms for that, the scheduled job is still waiting: which it
    # is cannot be asserted without a timing assumption, but when it started can.
    done = forge.wait_status(job["id"], "completed")
    assert parse_timestamp(done["result"]["metadata"]["startedAt"]) >= at.replace(
        microsecond=at.microsecond // 1000 * 1000
    )
    assert sorted(c.body["jobId"] for c in runner.calls) == sorted([now["id"], job["id"]])


# --------------------------------------------------------------------------- retries


def test_retryable_errors_are_retried_with_the_contract_delays(
    make_forge: MakeForge, make_runner: MakeRunner
) -> None:
    forge = make_forge()

    def flaky(fake: FakeRunner, call: Call) -> Reply:
        if call.index < 2:
            error = envelope("RUNTIME_ERROR", "FLAKY", retryable=True)
            return Reply(status=500, body=fake.failure(call, error))
        return Reply()

    runner = make_runner("flaky", [capability("cap", ["type.a"])], flaky)
    runner.register(forge.url)
    policy = {"maxRetries": 3, "backoffMs": 150, "backoffMultiplier": 2, "maxBackoffMs": 1000}
    job = forge.submit(req(retry_policy=policy))
    done = forge.wait_status(job["id"], "completed", "failed")

    assert done["status"] == "completed"
    assert "error" not in done
    assert done["result"]["metadata"]["attempts"] == 3
    times = [c.time for c in runner.calls]
    assert len(times) == 3
    for attempt, (before, after) in enumerate(itertools.pairwise(times)):
        assert after - before >= retry_delay(attempt, policy) / 1000.0 - SLACK_S
    events = forge.events(job["id"])
    retrying = [e for e in events if e["type"] == "job.retrying"]
    assert [e["data"]["delayMs"] for e in retrying] == [150, 300]
    assert [e["data"]["error"]["code"] for e in retrying] == ["FLAKY", "FLAKY"]
    assert [e["type"] for e in events].count("job.started") == 3


def test_non_retryable_errors_are_not_retried(
    make_forge: MakeForge, make_runner: MakeRunner
) -> None:
    forge = make_forge()
    not_retryable = make_runner(
        "strict",
        [capability("cap", ["type.a"])],
        fail_with(400, "VALIDATION_ERROR", "BAD_INPUT", retryable=False),
    )
    # Marked retryable, but the policy lists the category as non-retryable.
    listed = make_runner(
        "listed",
        [capability("cap", ["type.b"])],
        fail_with(500, "AUTHORIZATION_ERROR", "NO", retryable=True),
    )
    not_retryable.register(forge.url)
    listed.register(forge.url)
    first = forge.submit(req("type.a"))
    second = forge.submit(req("type.b", retry_policy={"backoffMs": 1}))  # contract lists
    failed = forge.wait_status(first["id"], "failed")
    forge.wait_status(second["id"], "failed")
    time.sleep(0.2)
    assert len(not_retryable.calls) == 1 and len(listed.calls) == 1
    assert failed["error"]["code"] == "BAD_INPUT"
    assert failed["result"]["success"] is False
    assert failed["result"]["error"]["code"] == "BAD_INPUT"
    assert failed["result"]["metadata"]["attempts"] == 1
    assert event_types(forge, first["id"])[-1] == "job.failed"


def test_retries_stop_after_max_retries(make_forge: MakeForge, make_runner: MakeRunner) -> None:
    forge = make_forge()
    runner = make_runner(
        "down", [capability("cap", ["type.a"])], lambda fake, call: Reply(status=503, body=None)
    )
    runner.register(forge.url)
    job = forge.submit(req(retry_policy={"maxRetries": 2, "backoffMs": 20}))
    failed = forge.wait_status(job["id"], "failed")
    assert len(runner.calls) == 3
    assert failed["error"]["category"] == "SERVICE_UNAVAILABLE"
    assert failed["error"]["service"] == "jobforge"
    assert failed["result"]["metadata"]["attempts"] == 3


def test_rate_limited_answers_honour_retry_after(
    make_forge: MakeForge, make_runner: MakeRunner
) -> None:
    forge = make_forge()

    def busy(fake: FakeRunner, call: Call) -> Reply:
        if call.body["payload"]["how"] == "envelope" and call.index == 0:
            error = envelope("RATE_LIMITED", "BUSY", retryable=True, retry_after=0.4)
            return Reply(status=429, body=fake.failure(call, error))
        if call.body["payload"]["how"] == "header" and len(fake.calls_for(call.body["jobId"])) == 1:
            return Reply(status=429, body=None, headers={"Retry-After": "1"})
        return Reply()

    runner = make_runner("busy", [capability("cap", ["type.a"])], busy)
    runner.register(forge.url)
    policy = {"backoffMs": 10}
    by_envelope = forge.submit(req(data={"how": "envelope"}, retry_policy=policy))
    forge.wait_status(by_envelope["id"], "completed")
    by_header = forge.submit(req(data={"how": "header"}, retry_policy=policy))
    forge.wait_status(by_header["id"], "completed")
    for job_id, wait_s in ((by_envelope["id"], 0.4), (by_header["id"], 1.0)):
        first, second = (c.time for c in runner.calls_for(job_id))
        assert second - first >= wait_s - SLACK_S
    retrying = [e for e in forge.events(by_header["id"]) if e["type"] == "job.retrying"]
    assert retrying[0]["data"]["error"]["category"] == "RATE_LIMITED"
    assert retrying[0]["data"]["delayMs"] == 1000


def test_unreachable_runner_is_a_retryable_network_error_and_gets_no_more_work(
    make_forge: MakeForge, make_runner: MakeRunner
) -> None:
    forge = make_forge()
    runner = make_runner("gone", [capability("cap", ["type.a"])])
    runner.register(forge.url)
    runner.stop()  # registered, but nothing listens on its port any more
    job = forge.submit(req(retry_policy={"maxRetries": 3, "backoffMs": 10}))
    wait_for(
        lambda: [e for e in forge.events(job["id"]) if e["type"] == "job.retrying"] or None,
        10,
        what="a job.retrying event",
    )
    retried = [e for e in forge.events(job["id"]) if e["type"] == "job.retrying"]
    assert "RUNNER_UNREACHABLE" in json.dumps(retried[0])
    status = forge.get(f"/runners/{runner.runner_id}").json()["status"]
    assert status == "unhealthy"  # out of dispatch until it heartbeats again
    time.sleep(0.5)  # several dispatcher ticks: the retry must not go back to the dead runner
    started = [e for e in forge.events(job["id"]) if e["type"] == "job.started"]
    assert len(started) == 1
    assert forge.job(job["id"])["status"] in ("retrying", "queued")


@pytest.mark.parametrize("how", ["idle", "unread"])
def test_a_kept_alive_connection_closed_as_it_is_reused_costs_no_attempt(
    make_forge: MakeForge, make_runner: MakeRunner, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """A runner closes an idle keep-alive connection just as the forge sends the next job on
    it: ``idle``, closed before the request went out (the forge's look for a closed
    connection came just before); ``unread``, closed as the request arrived, unread. The
    request goes again on a new connection, the job completes on its first attempt and the
    runner stays in dispatch."""
    from runnerkit.forge import connections

    monkeypatch.setattr(connections, "_dropped", lambda conn: False)  # the look came too soon
    forge = make_forge(DISPATCH_THREADS=1)  # one send thread: one connection, reused
    runner = make_runner("idle-closer", [capability("cap", ["type.a"])], drop_reused=how)
    runner.register(forge.url)
    first = forge.submit(req())
    forge.wait_status(first["id"], "completed")
    if how == "idle":
        wait_for(lambda: runner.dropped == 1 or None, 10, what="the idle connection closed")
    second = forge.submit(req(retry_policy={"maxRetries": 0}))
    done = forge.wait_status(second["id"], "completed", "failed")
    assert done["status"] == "completed", done
    assert done["result"]["metadata"]["attempts"] == 1
    assert runner.connections == 2 and runner.dropped >= 1
    assert len(runner.calls_for(second["id"])) == 1
    assert event_types(forge, second["id"]).count("job.started") == 1
    assert forge.get(f"/runners/{runner.runner_id}").json()["status"] == "healthy"


def test_a_request_read_then_dropped_is_an_attempt(
    make_forge: MakeForge, make_runner: MakeRunner
) -> None:
    """A runner reads a request on a kept-alive connection and closes it unanswered (a
    worker that died running the job): the job may have run, so it is not sent again within
    the attempt; the attempt fails, and the runner, which still takes connections, stays in
    dispatch."""
    forge = make_forge(DISPATCH_THREADS=1)
    runner = make_runner("dies-reading", [capability("cap", ["type.a"])], drop_reused="read")
    runner.register(forge.url)
    first = forge.submit(req())
    forge.wait_status(first["id"], "completed")
    second = forge.submit(req(retry_policy={"maxRetries": 0}))
    done = forge.wait_status(second["id"], "completed", "failed")
    assert done["status"] == "failed", done
    assert done["error"]["code"] == "RUNNER_UNREACHABLE", done
    assert runner.dropped == 1  # not sent again on a new connection: the request was read
    assert runner.connections == 2  # the kept-alive one, and the forge's probe (it connects)
    assert forge.get(f"/runners/{runner.runner_id}").json()["status"] == "healthy"


def test_a_runner_that_breaks_the_connection_is_not_taken_out_of_dispatch(
    make_forge: MakeForge, make_runner: MakeRunner
) -> None:
    """A connection that breaks on a new connection too is that attempt's failure, but the
    runner can still be connected to: it is not marked unreachable (only a failed connect
    does that; a runner that died mid-answer is, see test_forge_and_runners.py)."""
    forge = make_forge()

    def hang_up(fake: FakeRunner, call: Call) -> Reply:
        if call.index == 0:
            raise ConnectionAbortedError("hang up")  # the handler dies: no answer at all
        return Reply()

    runner = make_runner("hang-up", [capability("cap", ["type.a"])], hang_up)
    runner.register(forge.url)
    job = forge.submit(req(retry_policy={"maxRetries": 1, "backoffMs": 10}))
    done = forge.wait_status(job["id"], "completed", "failed")
    assert done["status"] == "completed", done
    assert done["result"]["metadata"]["attempts"] == 2
    retrying = [e for e in forge.events(job["id"]) if e["type"] == "job.retrying"]
    assert "RUNNER_UNREACHABLE" in json.dumps(retrying[0])
    assert forge.get(f"/runners/{runner.runner_id}").json()["status"] == "healthy"


def test_a_runner_slower_than_the_timeout_is_a_timeout(
    make_forge: MakeForge, make_runner: MakeRunner
) -> None:
    forge = make_forge(DISPATCH_MARGIN_MS=100)
    hold = threading.Event()
    runner = make_runner("slow", [capability("cap", ["type.a"])], lambda f, c: Reply(hold=hold))
    runner.register(forge.url)
    started = time.monotonic()
    job = forge.submit(req(timeout_ms=200, retry_policy={"maxRetries": 0}))
    failed = forge.wait_status(job["id"], "failed")
    assert time.monotonic() - started >= 0.3 - SLACK_S  # timeoutMs + DISPATCH_MARGIN_MS
    hold.set()
    assert failed["error"]["category"] == "TIMEOUT"
    assert failed["error"]["code"] == "DISPATCH_TIMEOUT"


# --------------------------------------------------------------------------- async jobs


def test_long_jobs_are_sent_async_and_their_result_arrives_later(
    make_forge: MakeForge, make_runner: MakeRunner
) -> None:
    forge = make_forge(ASYNC_THRESHOLD_MS=1_000)

    def later(fake: FakeRunner, call: Call) -> Reply:
        asked = call.headers.get("prefer") == "respond-async"
        return Reply(async_result=asked, async_delay=0.4)

    runner = make_runner("async", [capability("cap", ["type.a"], 2)], later)
    runner.register(forge.url)
    long_job = forge.submit(req(timeout_ms=2_000, data={"n": 1}))
    short_job = forge.submit(req(timeout_ms=1_000, data={"n": 2}))
    wait_for(lambda: len(runner.calls) == 2, 5, what="both jobs sent")
    calls = {c.body["jobId"]: c for c in runner.calls}
    assert calls[long_job["id"]].headers["prefer"] == "respond-async"
    assert "prefer" not in calls[short_job["id"]].headers
    assert forge.job(long_job["id"])["status"] == "running"  # 202: the result comes later
    done = forge.wait_status(long_job["id"], "completed")
    assert done["result"]["data"] == {"echo": {"n": 1}}
    assert done["result"]["metadata"]["runnerId"] == runner.runner_id


# --------------------------------------------------------------------------- offline runners


def test_an_offline_runners_job_is_requeued_to_another_runner(
    make_forge: MakeForge, make_runner: MakeRunner
) -> None:
    forge = make_forge(HEARTBEAT_INTERVAL_MS=200, OFFLINE_AFTER_MISSED=2)
    hold = threading.Event()
    stuck = make_runner("stuck", [capability("cap", ["type.a"])], lambda f, c: Reply(hold=hold))
    healthy = make_runner("healthy", [capability("cap", ["type.a"])])
    stuck.register(forge.url)
    job = forge.submit(req(retry_policy={"maxRetries": 3, "backoffMs": 5_000}))
    wait_for(lambda: stuck.calls, 5, what="the first attempt")
    healthy.register(forge.url)
    healthy.start_heartbeats(0.05)

    done = forge.wait_status(job["id"], "completed")
    assert done["result"]["metadata"]["runnerId"] == healthy.runner_id
    assert done["result"]["metadata"]["attempts"] == 2
    retrying = [e for e in forge.events(job["id"]) if e["type"] == "job.retrying"]
    assert [e["data"]["error"]["code"] for e in retrying] == ["RUNNER_OFFLINE"]
    assert retrying[0]["data"]["delayMs"] == 0  # eligible at once, whatever the backoff

    runners = valid_page("RunnerMetadata", forge.get("/runners").json())["items"]
    assert {r["name"]: r["status"] for r in runners} == {"stuck": "offline", "healthy": "healthy"}

    hold.set()  # the stuck runner finally answers: too late, nothing changes
    wait_for(lambda: forge.forge.dispatcher.in_flight == {}, 5, what="the late answer")
    assert forge.job(job["id"]) == done

    assert stuck.heartbeat().status_code == 200  # back on its next heartbeat
    statuses = {r["name"]: r["status"] for r in forge.get("/runners").json()["items"]}
    assert statuses["stuck"] == "healthy"


def test_cancelled_jobs_late_result_is_ignored_and_its_slot_freed_after(
    make_forge: MakeForge, make_runner: MakeRunner
) -> None:
    forge = make_forge()
    hold = threading.Event()

    def first_waits(fake: FakeRunner, call: Call) -> Reply:
        return Reply(hold=hold) if call.index == 0 else Reply()

    runner = make_runner("one", [capability("cap", ["type.a"], 1)], first_waits)
    runner.register(forge.url)
    first = forge.submit(req())
    wait_for(lambda: runner.calls, 5, what="the first job")
    cancelled = forge.post(f"/jobs/{first['id']}/cancel")
    assert valid("JobResponse", cancelled.json())["status"] == "cancelled"
    second = forge.submit(req())
    time.sleep(0.2)
    assert len(runner.calls) == 1  # the runner is still busy with the cancelled job
    hold.set()
    forge.wait_status(second["id"], "completed")
    job = forge.job(first["id"])
    assert job["status"] == "cancelled" and "result" not in job
    assert event_types(forge, first["id"])[-1] == "job.cancelled"


# --------------------------------------------------------------------------- expiry


def test_expired_jobs_fail_without_running(make_forge: MakeForge, make_runner: MakeRunner) -> None:
    forge = make_forge()
    runner = make_runner("r", [capability("cap", ["type.a"])])
    runner.register(forge.url)
    past = format_timestamp(datetime.now(UTC) - timedelta(minutes=1))
    soon = format_timestamp(datetime.now(UTC) + timedelta(milliseconds=300))
    expired = forge.submit(req(expiresAt=past))
    waiting = forge.submit(req("type.nobody", expiresAt=soon))

    failed = forge.wait_status(expired["id"], "failed")
    assert failed["error"]["category"] == "TIMEOUT"
    assert failed["error"]["code"] == "JOB_EXPIRED"
    assert "result" not in failed  # it never ran
    assert event_types(forge, expired["id"])[-2:] == ["job.expired", "job.failed"]
    assert runner.calls == []

    assert forge.job(waiting["id"])["status"] == "queued"
    late = forge.wait_status(waiting["id"], "failed")
    assert late["error"]["code"] == "JOB_EXPIRED"


# --------------------------------------------------------------------------- one dispatcher


def test_only_one_of_two_forges_sharing_a_database_dispatches(
    make_forge: MakeForge, make_runner: MakeRunner
) -> None:
    first, second = make_forge(), make_forge()
    dispatchers = [first.forge.dispatcher, second.forge.dispatcher]
    wait_for(lambda: any(d.leader for d in dispatchers), 5, what="a leader")
    leader_index = 0 if dispatchers[0].leader else 1
    leader, follower = dispatchers[leader_index], dispatchers[1 - leader_index]
    time.sleep(0.3)  # several follower polls
    assert not follower.leader

    runner = make_runner("shared", [capability("cap", ["type.a"], 4)])
    runner.register(first.url)
    jobs = [server.submit(req())["id"] for server in (first, second) for _ in range(3)]
    for job_id in jobs:
        second.wait_status(job_id, "completed")
    assert (leader.dispatched, follower.dispatched) == (6, 0)
    assert len(runner.calls) == 6

    leader.stop()  # e.g. its process died: the other takes over
    wait_for(lambda: follower.leader, 5, what="the takeover")
    servers = (first, second)
    job = servers[leader_index].submit(req())
    servers[1 - leader_index].wait_status(job["id"], "completed")
    assert follower.dispatched == 1


def test_a_follower_does_not_try_for_the_lock_at_every_wake_up(make_forge: MakeForge) -> None:
    # Every job a follower's process takes wakes its dispatcher; on PostgreSQL each try for
    # the lock is a query, so a follower tries at its own pace, not once per job.
    first, second = make_forge(), make_forge()
    dispatchers = [first.forge.dispatcher, second.forge.dispatcher]
    wait_for(lambda: any(d.leader for d in dispatchers), 5, what="a leader")
    follower = dispatchers[1] if dispatchers[0].leader else dispatchers[0]
    tries = []
    acquire = follower.lock.acquire

    def counted() -> bool:
        tries.append(1)
        return bool(acquire())

    follower.lock.acquire = counted
    for _ in range(200):
        follower.wake()
        time.sleep(0.002)
    assert not follower.leader
    assert len(tries) < 20, f"{len(tries)} tries for the lock over 200 wake-ups"


def test_a_restarted_forge_keeps_its_queue_and_requeues_orphans(
    make_forge: MakeForge, make_runner: MakeRunner
) -> None:
    first = make_forge()
    hold = threading.Event()
    stuck = make_runner("stuck", [capability("cap", ["type.a"])], lambda f, c: Reply(hold=hold))
    stuck.register(first.url)
    orphan = first.submit(req())
    wait_for(lambda: stuck.calls, 5, what="the first attempt")
    waiting = first.submit(req("type.b"))
    first.stop()  # the forge goes away with a job running and one queued

    second = make_forge()
    assert second.job(orphan["id"])["status"] == "running"
    assert second.job(waiting["id"])["status"] == "queued"
    gone = second.session.delete(
        f"{second.url}/runners/{stuck.runner_id}", headers=stuck._runner_headers()
    )
    assert gone.status_code == 204
    fresh = make_runner("fresh", [capability("cap", ["type.a", "type.b"], 2)])
    fresh.register(second.url)
    done = second.wait_status(orphan["id"], "completed")
    assert done["result"]["metadata"]["runnerId"] == fresh.runner_id
    assert done["result"]["metadata"]["attempts"] == 2
    retrying = [e for e in second.events(orphan["id"]) if e["type"] == "job.retrying"]
    assert retrying[0]["data"]["error"]["code"] == "RUNNER_GONE"
    second.wait_status(waiting["id"], "completed")
    hold.set()


def test_when_the_dispatching_process_dies_another_takes_over(
    make_forge: MakeForge, make_runner: MakeRunner, store_config: dict[str, str]
) -> None:
    script = (
        "import sys, time\n"
        "from runnerkit.forge import create_app\n"
        "create_app({'DB_PATH': sys.argv[1], 'DB_URL': sys.argv[2], 'POLL_INTERVAL_MS': 20})\n"
        "time.sleep(60)\n"
    )
    argv = [sys.executable, "-c", script, store_config["DB_PATH"], store_config["DB_URL"]]
    child = subprocess.Popen(argv, cwd=Path(__file__).parents[2])
    try:
        meta = store(store_config)

        def holder() -> Any:
            with meta.connection() as conn:
                beat = forge_db.get_meta(conn, "dispatcher")
            return beat and beat["pid"]

        wait_for(lambda: holder() == child.pid, 10, what="the child to dispatch")
        forge = make_forge()
        time.sleep(0.3)
        assert not forge.forge.dispatcher.leader
        child.kill()
        child.wait(5)
        wait_for(lambda: forge.forge.dispatcher.leader, 5, what="the takeover")
        assert wait_for(lambda: holder() == os.getpid(), 5)
        make_runner("r", [capability("cap", ["type.a"])]).register(forge.url)
        job = forge.submit(req())
        forge.wait_status(job["id"], "completed")
        meta.close()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(5)
