"""The reference forge and real runners, end to end: all of them under gunicorn on loopback.

What each test shows is in its docstring. The evidence is always twofold: the forge's own
records (JobResponse, JobEvents, RunnerMetadata, every body checked against the wire
contracts) and what the capabilities themselves wrote to the shared execution log
(``tests/e2e/apps/e2e_app.py``), so a forge that merely *says* the right thing is not enough.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from runnerkit.contracts import (
    HealthCheckSchema,
    JobResponseSchema,
    RunnerExecutionResponseSchema,
    parse_timestamp,
    utc_now,
)
from runnerkit.errors import retry_delay
from tests.e2e.conftest import (
    ASYNC_THRESHOLD_MS,
    ASYNC_TIMEOUT_MS,
    HEARTBEAT_MS,
    OFFLINE_AFTER_MISSED,
    SYNC_TIMEOUT_MS,
    Stack,
    check,
    error_envelope,
    job_request,
    overlap,
)
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

#: Rounding of contract timestamps (milliseconds, truncated).
TS_SLACK_S = 0.001


def ts(value: str) -> float:
    return parse_timestamp(value).timestamp()


def of_type(events: list[dict[str, Any]], type_: str) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] == type_]


def submit_all(stack: Stack, jobs: list[dict[str, Any]], threads: int = 8) -> None:
    """Submit every job at (nearly) the same moment."""
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(stack.submit, jobs))


def wait_all(stack: Stack, jobs: list[dict[str, Any]], timeout: float) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    return [stack.wait_final(j["id"], max(1.0, deadline - time.monotonic())) for j in jobs]


def capacity(stack: Stack, label: str, capability_id: str) -> int:
    """maxConcurrency of a runner's capability, as the forge has it registered."""
    runner_id = stack.runner_ids()[label]
    (runner,) = [r for r in stack.runners_page() if r["id"] == runner_id]
    (cap,) = [c for c in runner["capabilities"] if c["id"] == capability_id]
    return int(cap["maxConcurrency"])


# --------------------------------------------------------------------------- 1. routing


def test_jobs_are_routed_to_a_runner_supporting_their_type(stack: Stack) -> None:
    """e2e.alpha runs only on A and e2e.beta only on B: JobResult.metadata.runnerId is the id
    GET /runners gives that runner, and the capability's own log agrees."""
    ids = stack.runner_ids(status="healthy")
    assert set(ids) == {"A", "B"} and ids["A"] != ids["B"], ids
    listed = {r["id"]: r for r in stack.runners_page()}
    types = {
        label: {t for c in listed[rid]["capabilities"] for t in c["supportedJobTypes"]}
        for label, rid in ids.items()
    }
    assert "e2e.alpha" in types["A"] and "e2e.alpha" not in types["B"], types
    assert "e2e.beta" in types["B"] and "e2e.beta" not in types["A"], types

    jobs = []
    for i in range(4):
        jobs.append(job_request("e2e.alpha", {"tag": f"alpha-{i}"}))
        jobs.append(job_request("e2e.beta", {"tag": f"beta-{i}"}))
    submit_all(stack, jobs)
    for job, final in zip(jobs, wait_all(stack, jobs, 30), strict=True):
        expected = "A" if job["type"] == "e2e.alpha" else "B"
        assert final["status"] == "completed", final
        result = final["result"]
        assert result["metadata"]["runnerId"] == ids[expected], (expected, ids, final)
        assert result["metadata"]["attempts"] == 1, final
        assert result["data"]["label"] == expected, final
        assert result["data"]["tag"] == job["payload"]["data"]["tag"], final
        runs = stack.executions(job["id"], "start")
        assert [r["label"] for r in runs] == [expected], runs
        (started,) = of_type(stack.events(job["id"]), "job.started")
        assert started["data"]["runnerId"] == ids[expected], started


# --------------------------------------------------------------------------- 2. priority


def test_higher_priority_runs_first_then_older(make_stack: Callable[[], Stack]) -> None:
    """With one slot (solo, maxConcurrency 1): jobs queued before any runner registers run in
    priority order, equal priorities oldest first; the same holds for jobs queued while the
    runner is busy. Execution order is read from the capability's own log."""
    stack = make_stack()
    stack.start_forge()
    plan = [10, 90, 50, 90, 10, 100, 50]
    jobs = [
        job_request("e2e.solo", {"ms": 100, "tag": f"p{i}"}, priority=p) for i, p in enumerate(plan)
    ]
    for job in jobs:  # one by one: submission order is the age order
        stack.submit(job)
    time.sleep(0.3)  # the dispatcher ticks every 50 ms: nothing may start without a runner
    for job in jobs:
        assert stack.job(job["id"])["status"] == "queued"
        assert not of_type(stack.events(job["id"]), "job.started")

    runner = stack.start_runner("P", ("solo",))
    assert capacity(stack, "P", "solo") == 1
    finals = wait_all(stack, jobs, 30)
    assert all(f["status"] == "completed" for f in finals), finals
    expected = [j["id"] for j in sorted(jobs, key=lambda j: -j["priority"])]  # stable: by age
    ran = [r["job"] for r in stack.executions(event="start") if r["job"] in expected]
    assert ran == expected, (
        [(j["priority"], j["payload"]["data"]["tag"]) for j in jobs],
        [next(j["payload"]["data"]["tag"] for j in jobs if j["id"] == r) for r in ran],
    )
    # The forge's own record agrees, and with capacity 1 no two attempts overlapped.
    started = sorted(finals, key=lambda f: ts(f["result"]["metadata"]["startedAt"]))
    assert [f["id"] for f in started] == expected
    spans = [
        (ts(f["result"]["metadata"]["startedAt"]), ts(f["result"]["metadata"]["completedAt"]))
        for f in finals
    ]
    assert overlap(spans) == 1, spans

    # While the runner is busy: a blocker runs, then 20 / 80 / 80 arrive (in that order).
    blocker = job_request("e2e.solo", {"ms": 800, "tag": "blocker"})
    stack.submit(blocker)
    stack.wait_execution(blocker["id"])
    later = [job_request("e2e.solo", {"ms": 50, "tag": f"l{p}"}, priority=p) for p in (20, 80, 80)]
    for job in later:
        stack.submit(job)
    assert all(stack.job(j["id"])["status"] == "queued" for j in later)
    wait_all(stack, [blocker, *later], 30)
    ran = [
        r["job"] for r in stack.executions(event="start") if r["job"] in {j["id"] for j in later}
    ]
    assert ran == [later[1]["id"], later[2]["id"], later[0]["id"]], ran
    assert {r["label"] for r in stack.executions(event="start")} == {runner.label}


# --------------------------------------------------------------------------- 3. capacity


def test_max_concurrency_is_never_exceeded(stack: Stack) -> None:
    """16 e2e.work jobs (maxConcurrency 2 on each runner; half sync, half async) submitted at
    once: per runner, at most 2 attempts are open at any instant in the forge's own records
    (job.started → job.completed, each stamped once its transaction has the writers' turn, so
    a job taking a freed slot is never stamped before the job that freed it ended; an equal
    millisecond counts the end first) and at most 2 executions in the capability's own log
    (in its line order); the limit is reached, both runners work, and no attempt was refused
    (attempts == 1)."""
    ids = stack.runner_ids()
    limit = {label: capacity(stack, label, "work") for label in ("A", "B")}
    assert limit == {"A": 2, "B": 2}, limit
    jobs = [
        job_request(
            "e2e.work",
            {"ms": 400, "tag": f"w{i}"},
            timeout_ms=SYNC_TIMEOUT_MS if i % 2 else ASYNC_TIMEOUT_MS,
        )
        for i in range(16)
    ]
    submit_all(stack, jobs)
    finals = wait_all(stack, jobs, 60)
    assert all(f["status"] == "completed" for f in finals), [f["status"] for f in finals]
    assert all(f["result"]["metadata"]["attempts"] == 1 for f in finals), finals

    label_of = {rid: label for label, rid in ids.items()}
    forge_spans: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for job in jobs:
        events = stack.events(job["id"])
        (started,) = of_type(events, "job.started")
        (completed,) = of_type(events, "job.completed")
        assert started["data"]["capabilityId"] == "work"
        forge_spans[label_of[started["data"]["runnerId"]]].append(
            (ts(started["timestamp"]), ts(completed["timestamp"]))
        )
    # The capabilities' own record, in the order of its lines: they are appended under an
    # exclusive lock, a start once the job holds its slot and an end before it gives it back,
    # so line order is the order things happened (clock readings of two workers may tie).
    own_spans: dict[str, list[tuple[float, float]]] = defaultdict(list)
    ours = {j["id"] for j in jobs}
    records = list(enumerate(stack.executions()))
    ends = {r["job"]: line for line, r in records if r["event"] == "end" and r["job"] in ours}
    for line, record in records:
        if record["event"] == "start" and record["job"] in ours:
            own_spans[record["label"]].append((line, ends[record["job"]]))

    assert set(forge_spans) == {"A", "B"}, forge_spans
    for label in ("A", "B"):
        assert overlap(forge_spans[label]) <= limit[label], (label, sorted(forge_spans[label]))
        assert overlap(own_spans[label]) == limit[label], (label, sorted(own_spans[label]))
    assert sum(len(v) for v in own_spans.values()) == len(jobs)


# --------------------------------------------------------------------------- 4. runner killed


def _kill_mid_job(
    make_stack: Callable[[], Stack], timeout_ms: int, policy: dict[str, Any] | None = None
) -> None:
    stack = make_stack()
    stack.start_forge()
    stack.start_runner("A", ("work",), wait=False)
    stack.start_runner("B", ("work",), wait=False)
    for instance in stack.runners.values():
        stack.wait_registered(instance)
    ids = stack.runner_ids()
    job = job_request(
        "e2e.work", {"ms": 2500, "tag": "survivor"}, timeout_ms=timeout_ms, retry_policy=policy
    )
    stack.submit(job)
    first = stack.wait_execution(job["id"])
    victim = first["label"]
    other = "B" if victim == "A" else "A"
    killed_at = time.time()
    stack.kill_runner(victim)

    final = stack.wait_final(job["id"], 40)
    events = stack.events(job["id"])
    history = [(e["type"], e["data"].get("runnerId"), e["data"].get("error")) for e in events]
    assert final["status"] == "completed", (ids, victim, history)
    meta = final["result"]["metadata"]
    assert meta["attempts"] == 2, (ids, victim, history)
    assert meta["runnerId"] == ids[other], (ids, victim, history)
    assert final["result"]["data"]["label"] == other
    runs = stack.executions(job["id"])
    assert [(r["event"], r["label"]) for r in runs] == [
        ("start", victim),
        ("start", other),
        ("end", other),
    ], runs
    assert [e["data"]["runnerId"] for e in of_type(events, "job.started")] == [
        ids[victim],
        ids[other],
    ]
    (retrying,) = of_type(events, "job.retrying")
    assert not of_type(events, "job.failed"), events
    # Requeued because the runner went away, not because the attempt's lease ran out, and
    # within a few heartbeat intervals of the kill.
    if timeout_ms > ASYNC_THRESHOLD_MS:
        expected = {"RUNNER_OFFLINE", "RUNNER_GONE"}
    else:
        expected = {"RUNNER_UNREACHABLE"}
    assert retrying["data"]["error"]["code"] in expected, retrying
    window = HEARTBEAT_MS * (OFFLINE_AFTER_MISSED + 1) / 1000.0 + 2.0
    assert ts(retrying["timestamp"]) - killed_at < window, (retrying, killed_at)
    assert {r["id"]: r["status"] for r in stack.runners_page()}[ids[victim]] == "offline"


def test_runner_killed_mid_async_job_is_retried_elsewhere(
    make_stack: Callable[[], Stack],
) -> None:
    """An async job (202, result via the outbox) runs on one runner; SIGKILL of that runner's
    whole gunicorn tree (master, workers, sentinel): after its heartbeats lapse the forge marks
    it offline and requeues the job, which completes on the other runner with attempts == 2."""
    _kill_mid_job(make_stack, ASYNC_TIMEOUT_MS)


@pytest.mark.parametrize(
    "policy",
    [None, {"maxRetries": 1, "backoffMs": 1000}],
    ids=["default-policy", "max-retries-1"],
)
def test_runner_killed_mid_sync_job_is_retried_elsewhere(
    make_stack: Callable[[], Stack], policy: dict[str, Any] | None
) -> None:
    """The same with a synchronously dispatched job: the forge sees the connection drop at
    once, and the retry must go to the healthy runner: completed there, attempts == 2."""
    _kill_mid_job(make_stack, SYNC_TIMEOUT_MS, policy)


# --------------------------------------------------------------------------- 5. non-retryable


@pytest.mark.parametrize(
    "categories",
    [
        {},
        {"retryableCategories": ["VALIDATION_ERROR"], "nonRetryableCategories": []},
    ],
    ids=["default-categories", "category-listed-retryable"],
)
def test_validation_error_fails_after_one_attempt(
    stack: Stack, categories: dict[str, list[str]]
) -> None:
    """A payload the capability's Input rejects: the runner answers VALIDATION_ERROR with
    retryable false, so the job fails after 1 attempt although its policy allows 3 retries
    (also when the policy lists VALIDATION_ERROR as retryable: ``retryable: false`` is
    checked first), and the capability never ran."""
    policy = {"maxRetries": 3, "backoffMs": 50, "backoffMultiplier": 1, "maxBackoffMs": 50}
    job = job_request("e2e.strict", {"n": "seven"}, retry_policy={**policy, **categories})
    stack.submit(job)
    final = stack.wait_final(job["id"], 20)
    assert final["status"] == "failed", final
    error = final["error"]
    assert error["category"] == "VALIDATION_ERROR" and error["retryable"] is False, error
    assert ["payload", "n"] in [d.get("path") for d in error["details"]], error
    assert final["result"]["success"] is False and final["result"]["error"] == error
    assert final["result"]["metadata"]["attempts"] == 1, final
    time.sleep(0.5)  # ten backoffs' worth: a retry would have started by now
    events = stack.events(job["id"])
    assert len(of_type(events, "job.started")) == 1, events
    assert not of_type(events, "job.retrying"), events
    assert len(of_type(events, "job.failed")) == 1, events
    assert stack.job(job["id"])["status"] == "failed"
    assert stack.executions(job["id"]) == []


# --------------------------------------------------------------------------- 6. retries


def test_retryable_errors_follow_the_retry_policy(stack: Stack) -> None:
    """retryPolicy {maxRetries 2, backoffMs 300, multiplier 2, maxBackoffMs 5000}: a capability
    failing retryably twice then succeeding completes with attempts 3, each retry waiting at
    least retry_delay(0)=300 ms and retry_delay(1)=600 ms (capability log and events); one that
    keeps failing ends failed after maxRetries+1 = 3 attempts."""
    policy = {"maxRetries": 2, "backoffMs": 300, "backoffMultiplier": 2, "maxBackoffMs": 5000}
    delays = [retry_delay(i, policy) for i in range(2)]
    assert delays == [300, 600]
    good = job_request("e2e.flaky", {"fail_times": 2, "tag": "good"}, retry_policy=policy)
    bad = job_request("e2e.flaky", {"fail_times": 99, "tag": "bad"}, retry_policy=policy)
    stack.submit(good)
    stack.submit(bad)

    final = stack.wait_final(good["id"], 30)
    assert final["status"] == "completed", final
    assert final["result"]["metadata"]["attempts"] == 3, final
    assert final["result"]["data"]["tag"] == "good"
    starts = stack.executions(good["id"], "start")
    ends = stack.executions(good["id"], "end")
    assert [e["ok"] for e in ends] == [False, False, True], ends
    for i, delay in enumerate(delays):
        gap = starts[i + 1]["t"] - ends[i]["t"]
        assert gap >= delay / 1000.0, (i, gap, delay)
    events = stack.events(good["id"])
    retrying = of_type(events, "job.retrying")
    started = of_type(events, "job.started")
    assert [(e["data"]["attempt"], e["data"]["delayMs"]) for e in retrying] == [(1, 300), (2, 600)]
    assert [e["data"]["error"]["category"] for e in retrying] == ["RUNTIME_ERROR"] * 2
    assert [e["data"]["attempt"] for e in started] == [1, 2, 3]
    for i, delay in enumerate(delays):
        gap = ts(started[i + 1]["timestamp"]) - ts(retrying[i]["timestamp"])
        assert gap >= delay / 1000.0 - TS_SLACK_S, (i, gap, delay)

    final = stack.wait_final(bad["id"], 30)
    assert final["status"] == "failed", final
    assert final["result"]["metadata"]["attempts"] == 3, final
    assert final["error"]["category"] == "RUNTIME_ERROR", final
    assert final["error"]["code"] == "E2E_FLAKY", final
    time.sleep(0.5)
    assert len(stack.executions(bad["id"], "start")) == 3
    events = stack.events(bad["id"])
    assert [len(of_type(events, t)) for t in ("job.started", "job.retrying", "job.failed")] == [
        3,
        2,
        1,
    ], events


# --------------------------------------------------------------------------- 7. forge restart


def test_async_result_is_delivered_after_a_forge_restart(
    make_stack: Callable[[], Stack],
) -> None:
    """An async job runs; the forge is SIGKILLed meanwhile; the job finishes and its result
    waits in the runner's outbox; the forge starts again on the same port and database, and
    the job ends completed with that runner's result (attempts 1, nothing retried)."""
    stack = make_stack()
    stack.start_forge()
    runner = stack.start_runner("R", ("work",))
    runner_id = stack.runner_ids()["R"]
    token = str(uuid.uuid4())
    job = job_request("e2e.work", {"ms": 1500, "tag": token}, timeout_ms=ASYNC_TIMEOUT_MS)
    stack.submit(job)
    stack.wait_execution(job["id"])
    running = stack.job(job["id"])
    assert running["status"] == "running", running
    assert of_type(stack.events(job["id"]), "job.started")[0]["data"]["async"] is True

    assert stack.forge is not None
    stack.forge.kill()
    end = stack.wait_execution(job["id"], "end", timeout=10)
    assert end["ok"] is True
    waiting = wait_until(
        lambda: [r for r in runner.outbox_rows("result") if job["id"] in r["url"]],
        5,
        "the result is not in the runner's outbox",
    )
    assert len(waiting) == 1, waiting
    pending = check(RunnerExecutionResponseSchema, json.loads(waiting[0]["body"]), "outbox row")
    assert pending["jobId"] == job["id"] and pending["success"] is True, pending
    assert pending["runnerId"] == runner_id and pending["data"]["tag"] == token, pending
    time.sleep(1.0)  # the forge stays down a while: delivery is retried, not lost

    stack.start_forge()
    health = stack.get("/health")
    assert health.status_code == 200, health.text
    check(HealthCheckSchema, health.json(), "forge /health")
    final = stack.wait_final(job["id"], 45)
    assert final["status"] == "completed", final
    result = final["result"]
    assert result["data"] == {"label": "R", "pid": end["pid"], "tag": token}, result
    assert result["metadata"]["attempts"] == 1
    assert result["metadata"]["runnerId"] == runner_id
    wait_until(
        lambda: not [r for r in runner.outbox_rows("result") if job["id"] in r["url"]],
        10,
        "the delivered result is still in the outbox",
    )
    events = stack.events(job["id"])
    assert len(of_type(events, "job.started")) == 1, events
    assert not of_type(events, "job.retrying"), events
    assert len(of_type(events, "job.completed")) == 1, events
    assert len(stack.executions(job["id"], "start")) == 1


# --------------------------------------------------------------------------- 8. cancel


def test_cancel_queued_and_running_jobs(stack: Stack) -> None:
    """A queued job cancelled → cancelled and never executed, though it had the highest
    priority when the slot freed up. Running jobs (sync and async) cancelled → cancelled;
    the runner still finishes them and its late results change nothing."""
    blocker = job_request("e2e.solo", {"ms": 1200, "tag": "blocker"})
    stack.submit(blocker)
    stack.wait_execution(blocker["id"])
    queued = job_request("e2e.solo", {"ms": 10, "tag": "never"}, priority=100)
    stack.submit(queued)
    assert stack.job(queued["id"])["status"] == "queued"
    answer = stack.cancel(queued["id"])
    assert answer["status"] == "cancelled", answer
    probe = job_request("e2e.solo", {"ms": 10, "tag": "probe"}, priority=1)
    stack.submit(probe)
    assert stack.wait_final(blocker["id"], 20)["status"] == "completed"
    assert stack.wait_final(probe["id"], 20)["status"] == "completed"
    after = stack.job(queued["id"])
    assert after["status"] == "cancelled" and "result" not in after, after
    assert [e["type"] for e in stack.events(queued["id"])] == [
        "job.created",
        "job.queued",
        "job.cancelled",
    ]
    assert stack.executions(queued["id"]) == []

    running = [
        job_request("e2e.work", {"ms": 1200, "tag": "sync"}, timeout_ms=SYNC_TIMEOUT_MS),
        job_request("e2e.work", {"ms": 1200, "tag": "async"}, timeout_ms=ASYNC_TIMEOUT_MS),
    ]
    for job in running:
        stack.submit(job)
    for job in running:
        stack.wait_execution(job["id"])
        assert stack.job(job["id"])["status"] == "running"
        answer = stack.cancel(job["id"])
        assert answer["status"] == "cancelled", answer
    for job in running:
        end = stack.wait_execution(job["id"], "end", timeout=10)
        assert end["ok"] is True  # the runner did finish: its result is late, not absent
    # The async result is delivered (accepted and ignored by the forge) and leaves the outbox.
    wait_until(
        lambda: (
            not any(
                r
                for inst in stack.runners.values()
                for r in inst.outbox_rows("result")
                if running[1]["id"] in r["url"]
            )
        ),
        10,
        "the late async result was never delivered",
    )
    time.sleep(0.3)
    for job in running:
        final = stack.job(job["id"])
        assert final["status"] == "cancelled", final
        assert "result" not in final, final
        types = [e["type"] for e in stack.events(job["id"])]
        assert "job.completed" not in types and "job.failed" not in types, types
        (cancelled,) = of_type(stack.events(job["id"]), "job.cancelled")
        assert cancelled["data"]["previousStatus"] == "running", cancelled
    # The cancelled jobs' slots were given back: the whole capacity is usable again.
    refill = [job_request("e2e.work", {"ms": 300, "tag": f"r{i}"}) for i in range(4)]
    submit_all(stack, refill)
    finals = wait_all(stack, refill, 20)
    assert all(f["status"] == "completed" for f in finals), finals


# --------------------------------------------------------------------------- 9. the guide


def test_the_guides_curl_example(stack: Stack) -> None:
    """The guide's example job (id "test-job-1", no metadata) → 400 VALIDATION_ERROR whose
    details name both ``id`` and ``metadata``; corrected (uuid id, metadata {source,
    createdAt}) → 202 with a JobResponse."""
    example = {
        "id": "test-job-1",
        "type": "my.job.type",
        "priority": 50,
        "payload": {"type": "my-capability", "version": "1.0.0", "data": {"foo": "bar"}},
    }
    response = stack.post("/jobs", example)
    assert response.status_code == 400, response.text
    envelope = error_envelope(response)
    assert envelope["category"] == "VALIDATION_ERROR", envelope
    # README: "with one detail for id and one for metadata".
    paths = sorted(d.get("path") for d in envelope["details"])
    assert paths == [["id"], ["metadata"]], envelope["details"]
    by_path = {d["path"][0]: d for d in envelope["details"]}
    assert by_path["id"].get("value") == "test-job-1", by_path
    assert by_path["metadata"].get("code") == "required", by_path
    assert stack.get(f"/jobs/{uuid.uuid4()}").status_code == 404

    job_id = str(uuid.uuid4())
    corrected = {
        **example,
        "id": job_id,
        "metadata": {"source": "curl", "createdAt": utc_now()},
    }
    response = stack.post("/jobs", corrected)
    assert response.status_code == 202, response.text
    body = check(JobResponseSchema, response.json(), "POST /jobs answer")
    assert body["id"] == job_id and body["status"] == "queued", body
    assert body["request"]["payload"]["data"] == {"foo": "bar"}
    assert response.headers["Location"] == f"/jobs/{job_id}"
    # Nobody runs my.job.type: leave nothing queued in the shared forge.
    assert stack.cancel(job_id)["status"] == "cancelled"
