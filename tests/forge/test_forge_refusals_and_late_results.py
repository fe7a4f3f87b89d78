"""Refusals are not failed attempts, and a late answer of an unfinished job is its result.

Over real HTTP (the forge served by werkzeug, fake runners as HTTP servers): a runner that
answers ``409 JOB_ALREADY_RUNNING`` (or 429/503 with runnerkit's refusal codes) did not run
the job, so the forge gives the attempt back and sends it again later; an answer that
arrives after the forge requeued the job (its runner went offline meanwhile) completes it
instead of being thrown away; a job already finished ignores every later answer.
"""

from __future__ import annotations

import threading

from tests.forge.helpers import (
    Call,
    FakeRunner,
    MakeForge,
    MakeRunner,
    Reply,
    capability,
    envelope,
    job_request,
    sync_request,
    wait_for,
)

#: A forge that calls a silent runner offline after 2 x 200 ms.
QUICK_OFFLINE = {"HEARTBEAT_INTERVAL_MS": 200, "OFFLINE_AFTER_MISSED": 2}


def refuse(code: str, status: int, category: str, times: int):
    """A script: refuse each job ``times`` times with ``code``, then succeed."""

    def reply(fake: FakeRunner, call: Call) -> Reply:
        if len(fake.calls_for(call.body["jobId"])) <= times:
            error = envelope(category, code, retryable=True, retry_after=0.05)
            return Reply(status=status, body=fake.failure(call, error))
        return Reply()

    return reply


def test_refusals_give_the_attempt_back(make_forge: MakeForge, make_runner: MakeRunner) -> None:
    """Four refusals of each kind and then a success: maxRetries 1 is never used up."""
    forge = make_forge()
    refusals = {
        "JOB_ALREADY_RUNNING": (409, "RESOURCE_CONFLICT"),
        "CAPACITY_EXCEEDED": (429, "RATE_LIMITED"),
        "WORKER_BUSY": (503, "SERVICE_UNAVAILABLE"),
        "SHUTTING_DOWN": (503, "SERVICE_UNAVAILABLE"),
    }
    policy = {"maxRetries": 1, "backoffMs": 10}
    jobs: dict[str, str] = {}
    for code, (status, category) in refusals.items():
        runner = make_runner(code, [capability("cap", [code])], refuse(code, status, category, 4))
        runner.register(forge.url)
        jobs[code] = forge.submit(sync_request(code, retry_policy=policy))["id"]
    for code, job_id in jobs.items():
        done = forge.wait_status(job_id, "completed", "failed")
        assert done["status"] == "completed", (code, done)
        assert done["result"]["metadata"]["attempts"] == 1, (code, done["result"])
        retrying = [e["data"] for e in forge.events(job_id) if e["type"] == "job.retrying"]
        assert len(retrying) == 4 and all(r["refused"] for r in retrying), (code, retrying)
        assert {r["error"]["code"] for r in retrying} == {code}


def test_a_runner_refusing_for_ever_fails_the_job_past_its_time_budget(
    make_forge: MakeForge, make_runner: MakeRunner
) -> None:
    """(maxRetries + 1) x (timeoutMs + margin) = 2 x 0.3 s of free refusals, then attempts."""
    forge = make_forge(DISPATCH_MARGIN_MS=100)
    runner = make_runner(
        "stuck",
        [capability("cap", ["type.a"])],
        refuse("JOB_ALREADY_RUNNING", 409, "RESOURCE_CONFLICT", 10_000),
    )
    runner.register(forge.url)
    policy = {"maxRetries": 1, "backoffMs": 10}
    job = forge.submit(sync_request(timeout_ms=200, retry_policy=policy))
    failed = forge.wait_status(job["id"], "failed", timeout=15)
    assert failed["error"]["code"] == "JOB_ALREADY_RUNNING"
    assert failed["result"]["metadata"]["attempts"] == 2
    assert len(runner.calls_for(job["id"])) > 2  # the early refusals were free


def test_a_sync_answer_after_the_runner_went_offline_completes_the_job(
    make_forge: MakeForge, make_runner: MakeRunner
) -> None:
    """The runner stops heartbeating while it runs a job: the forge calls it offline and
    requeues the job; then the answer arrives on the original connection and is the job's
    result (it ran once and succeeded)."""
    forge = make_forge(**QUICK_OFFLINE)
    hold = threading.Event()
    runner = make_runner(
        "frozen", [capability("cap", ["type.a"])], lambda fake, call: Reply(hold=hold)
    )
    runner.register(forge.url)
    job = forge.submit(sync_request(retry_policy={"maxRetries": 3, "backoffMs": 10}))
    wait_for(lambda: runner.calls_for(job["id"]), what="the first call")
    forge.wait_status(job["id"], "retrying")  # offline: requeued, nowhere to go
    hold.set()
    done = forge.wait_status(job["id"], "completed", "failed")
    assert done["status"] == "completed", done
    assert done["result"]["data"] == {"echo": job["request"]["payload"]["data"]}
    assert done["result"]["metadata"]["runnerId"] == runner.runner_id
    assert len(runner.calls_for(job["id"])) == 1
    types = [e["type"] for e in forge.events(job["id"])]
    assert types.count("job.completed") == 1 and "job.failed" not in types


def test_an_async_result_after_a_requeue_completes_the_job_once(
    make_forge: MakeForge, make_runner: MakeRunner
) -> None:
    """202, then the runner goes silent and is called offline; its result POSTed later is
    recorded as the job's; the same runner's second copy and a stranger's are ignored."""
    forge = make_forge(**QUICK_OFFLINE)
    runner = make_runner(
        "slow",
        [capability("cap", ["type.a"], timeout_ms=60_000)],
        lambda fake, call: Reply(async_result=True, async_delay=3600),  # posted by the test
    )
    runner.register(forge.url)
    job = forge.submit(job_request("type.a", timeout_ms=60_000))
    call = wait_for(lambda: (runner.calls_for(job["id"]) or [None])[0], what="the call")
    forge.wait_status(job["id"], "retrying")
    first = runner.post_result(runner.success(call, data={"n": 1}))
    assert first.status_code == 200 and first.headers["X-Result-Outcome"] == "recorded"
    done = forge.job(job["id"])
    assert done["status"] == "completed" and done["result"]["data"] == {"n": 1}
    again = runner.post_result(runner.success(call, data={"n": 2}))
    assert again.headers["X-Result-Outcome"] == "ignored"
    assert forge.job(job["id"])["result"]["data"] == {"n": 1}


def test_a_late_retryable_failure_does_not_disturb_the_retry(
    make_forge: MakeForge, make_runner: MakeRunner
) -> None:
    """An earlier attempt's retryable failure, arriving after the requeue, changes nothing:
    the job is retried and completes with the next attempt's result."""
    forge = make_forge(**QUICK_OFFLINE)
    hold = threading.Event()

    def script(fake: FakeRunner, call: Call) -> Reply:
        if call.index == 0:
            error = envelope("RUNTIME_ERROR", "FLAKY", retryable=True)
            return Reply(status=500, body=fake.failure(call, error), hold=hold)
        return Reply()

    runner = make_runner("flaky", [capability("cap", ["type.a"])], script)
    runner.register(forge.url)
    job = forge.submit(sync_request(retry_policy={"maxRetries": 3, "backoffMs": 10}))
    wait_for(lambda: runner.calls_for(job["id"]), what="the first call")
    forge.wait_status(job["id"], "retrying")
    hold.set()
    dispatcher = forge.forge.dispatcher
    wait_for(lambda: job["id"] not in dispatcher.in_flight, what="the late answer recorded")
    assert dispatcher.in_flight == {}
    assert forge.job(job["id"])["status"] == "retrying"
    runner.start_heartbeats(0.05)  # back: the retry goes to it
    done = forge.wait_status(job["id"], "completed", "failed")
    assert done["status"] == "completed", done
    assert len(runner.calls_for(job["id"])) == 2
