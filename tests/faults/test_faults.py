"""Fault injection: real forge and runner processes, a known set of jobs, one fault each.

Every scenario submits jobs with unique ids, injects its fault, and ends with the same
judgement (:func:`tests.faults.harness.collect`), from the forge's records (``GET /jobs/<id>``)
and the capabilities' own execution log:

- every job ends ``completed``, or ``failed`` with a valid error envelope: none is lost;
- none ran more often than the contract allows: a retry is a new attempt, so executions of a
  job ≤ its recorded attempts, and a completed job has exactly one successful execution (the
  one its result came from);
- nothing ran that was not sent.

Each scenario also checks what its fault should have caused (leadership moved, the outbox
held results, duplicates reached the runner, ...), so a fault that did not happen cannot pass
as a fault survived. Summary lines are printed at the end of the run (see conftest.py).
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import requests

from runnerkit.contracts import parse_timestamp
from runnerkit.runner.lease import LeaderLease
from tests.e2e.conftest import QUICK, START_TIMEOUT, RunnerInstance, job_request
from tests.faults.harness import (
    ASYNC_MS,
    FAULT_RUNNER_APP,
    POLICY,
    ExecuteProxy,
    FaultStack,
    Verdict,
    collect,
    jobs_of,
    leader_pid,
    mixed_load,
    quick_jobs,
    running_executions,
    sigkill,
    start_proxied_runner,
)
from tests.instance.instance_support import PinnedConnection, pin_connections, pin_to
from tests.security.slow_clients import Tricklers
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

#: Capabilities of the e2e_app runner used by scenarios 1-6 (work: 2 slots, solo: 1,
#: alpha: 4 and instant).
CAPS = ("alpha", "work", "solo")

#: Error categories of a runner refusing a job it has no room for (it never ran).
REFUSALS = {"RATE_LIMITED", "RESOURCE_CONFLICT", "SERVICE_UNAVAILABLE"}

#: The header of an answer the runner replayed from its idempotency ledger.
REPLAYED = "idempotent-replayed"

Summary = Callable[[Verdict], None]
MakeStack = Callable[[], FaultStack]


def judge(
    stack: FaultStack,
    scenario: str,
    jobs: list[dict[str, Any]],
    summary: Summary,
    started: float,
    timeout: float = 60.0,
) -> Verdict:
    """Collect the outcome, record the summary line, and check the invariants."""
    verdict = collect(stack, scenario, jobs, timeout, started)
    summary(verdict)
    assert not verdict.problems(), verdict.explain()
    return verdict


def all_completed(verdict: Verdict) -> None:
    assert len(verdict.completed) == len(verdict.reports), "\n".join(
        [verdict.line()] + [r.describe() for r in verdict.reports if r.status != "completed"]
    )


def ready_status(url: str) -> int:
    try:
        return requests.get(f"{url}/health/ready", timeout=QUICK).status_code
    except requests.RequestException:
        return 0


# --------------------------------------------------------------------------- 1


def test_forge_down_when_the_runner_starts(fault_stack: MakeStack, fault_summary: Summary) -> None:
    """The runner starts while nothing listens on the forge's port: it serves, is not ready,
    and keeps retrying registration; the forge comes up ~5 s later, the runner registers,
    and jobs submitted then all complete, each executed exactly once, on that runner."""
    started = time.monotonic()
    stack = fault_stack()
    runner = stack.start_runner("R", CAPS, wait=False)
    runner.proc.wait_ready("/health/live", timeout=START_TIMEOUT)
    up = time.monotonic()
    wait_until(
        lambda: "JobForge unreachable" in runner.proc.log_text(),
        15,
        lambda: f"the runner never tried to register\n{runner.proc.log_tail()}",
    )
    assert ready_status(runner.url) == 503  # not registered: not ready
    time.sleep(max(0.0, 5.0 - (time.monotonic() - up)))
    assert ready_status(runner.url) == 503
    stack.start_forge()
    runner_id = stack.wait_registered(runner)

    jobs = mixed_load("down")
    stack.submit_all(jobs)
    verdict = judge(stack, "forge-down-at-runner-start", jobs, fault_summary, started)
    all_completed(verdict)
    for report in verdict.reports:
        assert report.final is not None
        assert report.final["result"]["metadata"]["runnerId"] == runner_id, report.describe()
        assert len(report.starts) == 1, report.describe()


# --------------------------------------------------------------------------- 2


def test_forge_killed_and_restarted_mid_load(
    fault_stack: MakeStack, fault_summary: Summary
) -> None:
    """SIGKILL of the forge (its whole gunicorn tree) while jobs run, restart ~2 s later on
    the same port and database: sync answers sent to the dead forge are lost, so those
    attempts become overdue and are retried (the runner's ledger replays the stored answer);
    async results wait in the runner's outbox; queued jobs are dispatched after the restart.
    Everything completes, nothing runs twice."""
    started = time.monotonic()
    stack = fault_stack()
    stack.start_forge()
    runner = stack.start_runner("R", CAPS)
    jobs = mixed_load("forge-kill")
    stack.submit_all(jobs)
    stack.wait_started(jobs, 8)
    wait_until(lambda: running_executions(stack, runner), 15, "no job runs on the runner")
    assert stack.forge is not None
    stack.forge.kill()
    time.sleep(2.0)
    stack.start_forge()

    verdict = judge(stack, "forge-killed-mid-load", jobs, fault_summary, started, timeout=90)
    all_completed(verdict)


# --------------------------------------------------------------------------- 3


def test_leader_worker_killed_under_load(fault_stack: MakeStack, fault_summary: Summary) -> None:
    """SIGKILL of the worker holding ``leader.lock`` (found through /proc/<pid>/fd + fdinfo
    and /proc/locks) while jobs run: another worker takes the lock and carries on as the same
    runner (same runnerId, healthy), jobs of the dead worker are retried (sync: the forge saw
    the connection drop; async: the new leader reports them WORKER_DIED), all complete."""
    started = time.monotonic()
    stack = fault_stack()
    stack.start_forge()
    runner = stack.start_runner("R", CAPS)
    runner.proc.wait_workers_serving(timeout=START_TIMEOUT)
    runner_id = stack.runner_ids()["R"]
    jobs = mixed_load("leader")
    stack.submit_all(jobs)
    stack.wait_started(jobs, 8)
    leader = wait_until(lambda: leader_pid(runner), 10, "no worker holds leader.lock")
    assert leader is not None
    sigkill(leader)
    successor = wait_until(
        lambda: (pid := leader_pid(runner)) is not None and pid != leader and pid,
        15,
        lambda: f"nobody took leader.lock over from {leader}\n{runner.proc.log_tail()}",
    )

    verdict = judge(stack, "leader-worker-killed", jobs, fault_summary, started)
    all_completed(verdict)
    assert successor != leader
    wait_until(
        lambda: stack.runner_ids(status="healthy") == {"R": runner_id},
        10,
        lambda: f"runner is not the same healthy runner: {stack.runners_page()}",
    )
    # Jobs the leader was running when it died never ended there, and were retried.
    cut_short = [
        r
        for r in verdict.reports
        if any(s["pid"] == leader for s in r.starts)
        and not any(e["event"] == "end" and e["pid"] == leader for e in r.runs)
    ]
    for report in cut_short:
        assert report.attempts >= 2 and len(report.starts) >= 2, report.describe()


# --------------------------------------------------------------------------- 4


def test_worker_killed_mid_job(fault_stack: MakeStack, fault_summary: Summary) -> None:
    """SIGKILL of a worker (not the leader, if possible) while the execution log says it runs
    jobs: those executions never end; each of those jobs is retried as a new attempt (sync:
    the forge saw the connection drop; async: the leader reports it WORKER_DIED) and
    completes on a live worker, with (at least) two executions for (at least) two attempts."""
    started = time.monotonic()
    stack = fault_stack()
    stack.start_forge()
    runner = stack.start_runner("R", CAPS)
    runner.proc.wait_workers_serving(timeout=START_TIMEOUT)
    jobs = mixed_load("worker")
    stack.submit_all(jobs)

    types = {j["id"]: j["type"] for j in jobs}

    def victim() -> int | None:
        """A follower in the middle of a sleeping (not an instant) job; the leader only if
        the followers got none of the first two thirds of the load."""
        leader = leader_pid(runner)
        busy = [
            pid
            for pid, running in running_executions(stack, runner).items()
            if any(types.get(j) != "e2e.alpha" for j in running)
        ]
        followers = [pid for pid in busy if pid != leader]
        if followers:
            return followers[0]
        if busy and len(stack.started(jobs)) >= len(jobs) * 2 // 3:
            return busy[0]
        return None

    pid = wait_until(victim, 30, lambda: f"no worker runs a job\n{stack.logs()}", interval=0.02)
    assert pid is not None
    sigkill(pid)
    # The executions that had not even returned when the worker died.
    ended = {r["job"] for r in stack.executions(event="end") if r["pid"] == pid}
    started_there = {r["job"] for r in stack.executions(event="start") if r["pid"] == pid}
    victims = started_there - ended
    assert victims, "the worker had no job under way when it was killed"

    verdict = judge(stack, "worker-killed-mid-job", jobs, fault_summary, started)
    all_completed(verdict)
    for job_id in victims:
        report = verdict.by_id(job_id)
        assert report.attempts >= 2 and len(report.starts) >= 2, report.describe()
        assert report.final is not None
        assert report.final["result"]["data"]["pid"] != pid, report.describe()


# --------------------------------------------------------------------------- 5


def test_runner_sigterm_under_load_then_restarted(
    fault_stack: MakeStack, fault_summary: Summary
) -> None:
    """SIGTERM to the runner's master while jobs run: it drains (executions under way finish,
    new ones are refused), exits and deregisters; the forge requeues what it had there. The
    runner is started again at the same address with the same state directory (so the same
    idempotency ledger), and every job completes without running twice."""
    started = time.monotonic()
    stack = fault_stack()
    stack.start_forge()
    runner = stack.start_runner("R", CAPS)
    jobs = mixed_load("term")
    stack.submit_all(jobs)
    stack.wait_started(jobs, 6)
    in_flight = wait_until(
        lambda: running_executions(stack, runner), 15, "no job runs on the runner"
    )
    runner.proc.signal(signal.SIGTERM)
    assert runner.proc.wait_exit(30) is not None, runner.proc.log_tail()
    # Drained: what was running when SIGTERM came finished normally in its worker.
    ends = {(r["job"], r["pid"]) for r in stack.executions(event="end") if r["ok"]}
    unfinished = [(j, pid) for pid, js in in_flight.items() for j in js if (j, pid) not in ends]
    assert not unfinished, (unfinished, runner.proc.log_tail())
    wait_until(
        lambda: "R" not in stack.runner_ids(status="healthy"),
        15,
        "the stopped runner is still listed healthy",
    )
    stack.next_runner_port = runner.proc.port  # back at the same address
    stack.start_runner("R", CAPS)

    verdict = judge(stack, "runner-sigterm-restart", jobs, fault_summary, started, timeout=90)
    all_completed(verdict)


# --------------------------------------------------------------------------- 6


def test_duplicate_deliveries_execute_once(fault_stack: MakeStack, fault_summary: Summary) -> None:
    """A proxy between forge and runner delivers the first POST /execute of each job twice
    in a row, twice at once, or forwards it and drops the answer (the forge then sends it
    again); a quarter pass untouched. Sync and async jobs alike: the runner's idempotency
    ledger keeps every job to exactly one execution, and every job completes (an async job
    whose 202 was dropped may complete from its result before the forge sends it again)."""
    started = time.monotonic()
    stack = fault_stack()
    jobs = jobs_of("e2e.work", 12, 300, 3000, "dup-s")
    jobs += jobs_of("e2e.work", 8, 300, ASYNC_MS, "dup-a")
    jobs += jobs_of("e2e.solo", 4, 200, 3000, "dup-o")
    cycle = ("twice", "parallel", "drop", "pass")
    modes = {j["id"]: cycle[i % len(cycle)] for i, j in enumerate(jobs)}
    proxy = ExecuteProxy(modes).start()
    try:
        stack.start_forge()
        start_proxied_runner(stack, "P", CAPS, proxy)
        stack.submit_all(jobs)
        verdict = judge(stack, "duplicate-deliveries", jobs, fault_summary, started)
    finally:
        proxy.close()
    all_completed(verdict)
    for report in verdict.reports:
        copies = proxy.copies(report.job_id)
        mode = modes[report.job_id]
        assert len(report.starts) == 1, (mode, report.describe(), copies)
        # An async job whose 202 was dropped may see its result arrive (through the outbox)
        # before the retry is due: the forge keeps it, the job completes without a retry.
        overtaken = mode == "drop" and report.attempts == 1 and copies[0].status == 202
        if mode != "pass" and not overtaken:
            assert len(copies) >= 2, (mode, report.describe(), copies)
    replays = [d for d in proxy.deliveries if d.replayed]
    assert replays, proxy.deliveries


# --------------------------------------------------------------------------- 6b

#: The signing secret of the forge and runner of the replay scenario.
REPLAY_SECRET = "fault-replay-secret"


def test_replayed_signed_requests_with_other_event_ids_never_run(
    fault_stack: MakeStack, fault_summary: Summary
) -> None:
    """Signing on. A proxy sends the first signed POST /execute of each job on, then the
    same bytes again with a new, an empty and no event id (the signature does not cover it).
    Flaky jobs fail their first attempt retryably, so nothing in the ledger answers the
    copies: each is refused 401 EVENT_REPLAYED (or, when it arrives while the worker is full,
    for capacity first), and each job runs once per attempt the forge made (its retry is
    signed anew and runs). Quick jobs' copies are replayed answers (after the first, when the
    original was refused for capacity: a request that never reached a run may come again)."""
    started = time.monotonic()
    stack = fault_stack()
    stack.forge_env["RUNNERKIT_FORGE_SIGNING_SECRET"] = REPLAY_SECRET
    stack.runner_env["RUNNERKIT_SIGNING_SECRET"] = REPLAY_SECRET
    flaky = [
        job_request(
            "e2e.flaky",
            {"fail_times": 1, "tag": f"replay-f{i}"},
            timeout_ms=3000,
            retry_policy={"maxRetries": 3, "backoffMs": 200},
        )
        for i in range(8)
    ]
    quick = quick_jobs(6, "replay-q")
    jobs = flaky + quick
    proxy = ExecuteProxy({j["id"]: "mutated" for j in jobs}).start()
    try:
        stack.start_forge()
        start_proxied_runner(stack, "P", ("alpha", "flaky"), proxy)
        stack.submit_all(jobs)
        verdict = judge(stack, "replayed-signed-requests", jobs, fault_summary, started)
    finally:
        proxy.close()
    all_completed(verdict)
    refused = []
    for report in verdict.reports:
        copies = [d for d in proxy.copies(report.job_id) if not d.answered_forge]
        assert len(copies) == 3, (report.describe(), copies)
        assert len(report.starts) == report.attempts, (report.describe(), copies)
        if report.job_id in {j["id"] for j in flaky}:
            assert report.attempts == 2, report.describe()
            # A copy that arrives while the worker's job threads or the capability's slots
            # are all taken is refused for capacity first (retryable, and it did not run).
            answers = [(d.status, d.code) for d in copies]
            assert set(answers) <= {_REPLAYED, *_CAPACITY_REFUSED}, copies
            refused += answers
        else:
            assert len(report.starts) == 1, report.describe()
            # An original refused for capacity never reached a run, so its first copy may
            # run the job (once: see starts); every copy after a run is a replayed answer.
            deliveries = proxy.copies(report.job_id)
            original = deliveries[0]
            if original.answered_forge and (original.status, original.code) in _CAPACITY_REFUSED:
                ran = [d for d in copies if d.status == 200 and not d.replayed]
                assert len(ran) <= 1, deliveries
                before = copies.index(ran[0]) if ran else len(copies)
                assert all((d.status, d.code) in _CAPACITY_REFUSED for d in copies[:before])
                copies = copies[before + 1 :]
            assert all(d.status == 200 and d.replayed for d in copies), deliveries
    # The replay check answered most copies (the capacity refusals are a race with the load).
    assert refused.count(_REPLAYED) * 2 > len(refused), refused


_REPLAYED = (401, "EVENT_REPLAYED")
_CAPACITY_REFUSED = {(503, "WORKER_BUSY"), (429, "CAPACITY_EXCEEDED")}


# --------------------------------------------------------------------------- 6c


def test_slow_clients_while_jobs_flow(fault_stack: MakeStack, fault_summary: Summary) -> None:
    """While the forge sends jobs, 40 connections trickle request heads into the runner and
    10 trickle bodies, a byte every 2 s each (never idle long enough for the idle timeout).
    They hold no thread: every job completes, once, /health/live answers at every tick, and
    every trickling connection is closed at its total deadline (a body's with a 400)."""
    started = time.monotonic()
    stack = fault_stack()
    stack.runner_env.update(
        {
            "RUNNERKIT_CLIENT_IDLE_TIMEOUT_S": "5",
            "RUNNERKIT_CLIENT_HEADER_TIMEOUT_S": "6",
            "RUNNERKIT_CLIENT_BODY_TIMEOUT_S": "6",
        }
    )
    stack.start_forge()
    runner = stack.start_runner("S", CAPS)
    heads = Tricklers(runner.proc.host, runner.proc.port)
    bodies = Tricklers(runner.proc.host, runner.proc.port)
    probes: list[int] = []

    def tick() -> None:
        bodies.tick()
        try:
            probes.append(requests.get(f"{runner.url}/health/live", timeout=QUICK).status_code)
        except requests.RequestException:
            probes.append(0)

    jobs = mixed_load("slow", sync=8, async_=4, quick=8)
    try:
        heads.open(40, body=False)
        bodies.open(10, body=True)
        stack.submit_all(jobs)
        heads.run_until_all_end(25.0, on_tick=tick)
        bodies.run_until_all_end(10.0)
    finally:
        heads.close()
        bodies.close()
    verdict = judge(stack, "slow-clients", jobs, fault_summary, started)
    all_completed(verdict)
    assert probes and set(probes) == {200}, probes
    assert [c.ended for c in heads.conns] == ["closed"] * 40
    assert [c.ended for c in bodies.conns] == ["400"] * 10


# --------------------------------------------------------------------------- 7


@pytest.mark.parametrize("outage", ["down", "frozen"])
def test_async_results_wait_out_a_forge_outage(
    fault_stack: MakeStack, fault_summary: Summary, outage: str
) -> None:
    """20 async jobs are running when the forge becomes unreachable for 20 s: ``down``, its
    gunicorn tree SIGKILLed and then started again on the same port and database; or
    ``frozen``, every process of it SIGSTOPped and then SIGCONTed. Meanwhile the runner's
    calls to the forge go through a relay that is cut (connections closed at once, so none
    waits in the forge's accept queue) until 0.5 s after the forge is back, well within the
    OFFLINE_AFTER_MISSED heartbeat intervals a runner has to be heard again. The jobs finish
    during the outage and their results wait in the runner's durable outbox (checked in its
    SQLite file); then they are delivered. Every job completes in its first attempt (4 of
    them allow no retry at all), executed once, and the outbox empties."""
    started = time.monotonic()
    stack = fault_stack()
    stack.runner_app = FAULT_RUNNER_APP
    stack.runner_env["FAULT_NAP_SLOTS"] = "24"
    relay = ExecuteProxy({}).start()
    try:
        stack.start_forge()
        relay.upstream = stack.url
        stack.runner_env["RUNNERKIT_JOBFORGE_URL"] = relay.url
        runner = stack.start_runner("R", ("nap",))
        jobs = jobs_of("fault.nap", 16, 8000, 60_000, f"{outage}-")
        once = {"maxRetries": 0, "backoffMs": 100, "backoffMultiplier": 1, "maxBackoffMs": 100}
        jobs += jobs_of("fault.nap", 4, 8000, 60_000, f"{outage}-once-", retry_policy=once)
        stack.submit_all(jobs)
        stack.wait_started(jobs, len(jobs))
        held = _outage(stack, runner, relay, outage, {j["id"] for j in jobs})
        verdict = judge(stack, f"async-forge-{outage}-20s", jobs, fault_summary, started, 90)
        wait_until(lambda: not runner.outbox_rows("result"), 15, "results left in the outbox")
    finally:
        relay.close()
    assert len(held) == len(jobs), f"{len(held)} of {len(jobs)} results waited in the outbox"
    requeued = [
        (r.describe(), [e["data"]["error"] for e in stack.events(r.job_id) if "error" in e["data"]])
        for r in verdict.reports
        if r.status != "completed" or r.attempts != 1 or len(r.starts) != 1
    ]
    # A frozen forge must not count the heartbeats it could not hear as missed.
    assert not requeued, f"{len(requeued)} jobs not completed in one attempt: {requeued}"


def _outage(
    stack: FaultStack, runner: RunnerInstance, relay: ExecuteProxy, outage: str, ids: set[str]
) -> list[dict[str, Any]]:
    """Make the forge unreachable for 20 s (see the test); the result rows held meanwhile."""
    forge = stack.forge
    assert forge is not None
    frozen: list[psutil.Process] = []
    relay.blocked = True
    try:
        if outage == "down":
            forge.kill()
        else:
            master = psutil.Process(forge.master_pid)
            frozen = [master, *master.children(recursive=True)]
            for proc in frozen:
                proc.suspend()
        gone_at = time.monotonic()
        wait_until(
            lambda: len({r["job"] for r in stack.executions(event="end")} & ids) == len(ids),
            20,
            "the jobs did not finish while the forge was unreachable",
        )
        time.sleep(max(0.0, 20.0 - (time.monotonic() - gone_at)))
        held = [r for r in runner.outbox_rows("result") if r["url"].rsplit("/", 2)[1] in ids]
    finally:
        for proc in frozen:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.resume()
        if outage == "down":
            stack.start_forge()
        time.sleep(0.5)
        relay.blocked = False
    return held


# --------------------------------------------------------------------------- 8


def test_capabilities_slower_than_their_timeout(
    fault_stack: MakeStack, fault_summary: Summary
) -> None:
    """Jobs whose capability sleeps past timeoutMs, sync and async, cooperative (stops at its
    deadline) and stubborn (ignores it, holding its slot on): each attempt is answered with a
    TIMEOUT at the deadline, retried per policy, and the job fails with an error envelope,
    never executed more often than its recorded attempts. Quick jobs alongside complete; for
    a few of them a proxy holds the runner's (successful) answer back past the forge's read
    timeout: the forge gives up on that attempt (DISPATCH_TIMEOUT), sends the job again, and
    the runner's ledger replays the answer instead of running it twice."""
    started = time.monotonic()
    stack = fault_stack()
    stack.runner_app = FAULT_RUNNER_APP
    stack.runner_env["FAULT_NAP_SLOTS"] = "6"
    # Stubborn jobs keep their job threads past the deadline; enough threads per worker that
    # the quick and late jobs are never refused as WORKER_BUSY however the load falls.
    stack.runner_env["GUNICORN_THREADS"] = "24"
    stack.forge_env["RUNNERKIT_FORGE_ASYNC_THRESHOLD_MS"] = "1000"
    margin_s = int(str(stack.forge_env["RUNNERKIT_FORGE_DISPATCH_MARGIN_MS"])) / 1000.0
    one = {"maxRetries": 1, "backoffMs": 200, "backoffMultiplier": 2, "maxBackoffMs": 1000}
    two = {**one, "maxRetries": 2, "backoffMs": 300}
    slow = jobs_of("fault.nap", 6, 2000, 600, "nap-sync", retry_policy=one)
    slow += jobs_of("fault.nap", 4, 3000, 1500, "nap-async", retry_policy=one)
    slow += jobs_of("fault.stubborn", 3, 2500, 700, "stub-sync", retry_policy=two)
    slow += jobs_of("fault.stubborn", 2, 3000, 1500, "stub-async", retry_policy=one)
    quick = jobs_of("fault.nap", 10, 100, 2000, "quick")
    late = jobs_of("fault.nap", 3, 50, 500, "late", retry_policy=one)
    jobs = slow + quick + late
    proxy = ExecuteProxy({j["id"]: "late" for j in late}, late_s=0.5 + margin_s + 0.5).start()
    try:
        stack.start_forge()
        start_proxied_runner(stack, "R", ("nap", "stubborn"), proxy)
        stack.submit_all(late)  # first, so that they find free slots
        stack.submit_all(slow + quick)
        verdict = judge(stack, "slower-than-timeout", jobs, fault_summary, started)
    finally:
        proxy.close()

    for job in quick:
        report = verdict.by_id(job["id"])
        assert report.status == "completed", report.describe()
    for job in late:
        report = verdict.by_id(job["id"])
        assert report.status == "completed", report.describe()
        assert report.attempts == 2 and len(report.starts) == 1, report.describe()
        codes = [
            e["data"]["error"]["code"] for e in stack.events(job["id"]) if "error" in e["data"]
        ]
        assert codes == ["DISPATCH_TIMEOUT"], (report.describe(), codes)
        first, second = proxy.copies(job["id"])
        assert (first.status, first.replayed, second.status, second.replayed) == (
            200,
            False,
            200,
            True,
        ), (first, second)
    timed_out = set()
    for job in slow:
        report = verdict.by_id(job["id"])
        assert report.status == "failed", report.describe()
        assert not report.successes and not report.answered, report.describe()
        events = stack.events(job["id"])
        errors = [
            e["data"]["error"]["category"]
            for e in events
            if e["type"] in ("job.retrying", "job.failed")
        ]
        if report.starts:
            # Every execution overran: the runner answered TIMEOUT at the deadline.
            assert "TIMEOUT" in errors, (report.describe(), errors)
            assert all(r.get("cut") for r in report.runs if r["event"] == "end"), report.runs
            timed_out.add(job["payload"]["data"]["tag"].rstrip("0123456789"))
        else:
            # Stubborn overruns still held the capability's slots (their code cannot be
            # stopped; the forge counts a slot free once the TIMEOUT answer is in), or the
            # worker's threads: every attempt was refused, or (async) found no free slot
            # before its deadline, and the job failed saying so.
            assert set(errors) <= REFUSALS | {"TIMEOUT"}, (report.describe(), errors)
    assert {"nap-sync", "nap-async"} <= timed_out, timed_out
    assert {"stub-sync", "stub-async"} & timed_out, timed_out


# --------------------------------------------------------------------------- 9


#: How long the frozen leader stays stopped, and the forge's offline window it outlasts.
FREEZE_S = 7.0
OFFLINE_AFTER_MISSED = 4


def test_frozen_leader_is_replaced_and_every_job_completes_once(
    fault_stack: MakeStack, fault_summary: Summary
) -> None:
    """SIGSTOP of the worker leading a 3-worker runner for 7 s, longer than the forge's
    offline window (4 missed heartbeats of 1 s), while sync and async jobs flow. The stopped
    worker keeps its lock, but its lease expires: another worker takes over as the next
    generation and heartbeats as the same runner, so the forge never calls it offline and
    requeues nothing. Jobs the stopped worker holds finish once it resumes (their timeouts
    outlast the freeze), their answers recorded; jobs submitted meanwhile run on the other
    workers. Every job completes, executed once; the resumed worker steps down with one
    warning instead of heartbeating beside its successor."""
    started = time.monotonic()
    stack = fault_stack()
    stack.runner_app = FAULT_RUNNER_APP
    stack.runner_workers = 3
    stack.runner_env["FAULT_NAP_SLOTS"] = "32"
    stack.forge_env["RUNNERKIT_FORGE_OFFLINE_AFTER_MISSED"] = str(OFFLINE_AFTER_MISSED)
    stack.forge_env["RUNNERKIT_FORGE_ASYNC_THRESHOLD_MS"] = "10000"
    # Few retries: on a forge that spent them on refusals (409 while the job still ran on the
    # stopped worker), jobs would fail although they succeeded.
    policy = {"maxRetries": 2, "backoffMs": 300, "backoffMultiplier": 2, "maxBackoffMs": 1000}
    stack.start_forge()
    runner = stack.start_runner("R", ("nap",))
    runner.proc.wait_workers_serving(timeout=START_TIMEOUT)
    runner_id = stack.runner_ids()["R"]

    def batch(prefix: str) -> list[dict[str, Any]]:
        sync = jobs_of("fault.nap", 10, 1000, 10_000, f"{prefix}-s", retry_policy=policy)
        async_ = jobs_of("fault.nap", 6, 2500, 20_000, f"{prefix}-a", retry_policy=policy)
        return sync + async_

    before, during = batch("before"), batch("during")
    stack.submit_all(before)
    leader = wait_until(lambda: leader_pid(runner), 10, "no worker leads the instance")
    assert leader is not None
    # Freeze it while it runs jobs (the kernel spreads connections over the workers).
    wait_until(
        lambda: leader in running_executions(stack, runner),
        15,
        lambda: f"the leader {leader} got no job\n{stack.logs()}",
        interval=0.02,
    )
    lease = LeaderLease(str(runner.state_dir))
    generation = lease.record()[0]
    frozen = psutil.Process(leader)
    frozen.suspend()
    statuses: set[str] = set()
    try:
        stopped_at = time.time()
        stack.submit_all(during)
        while time.time() - stopped_at < FREEZE_S:
            statuses.add(stack.runner_ids(status="healthy").get("R", "not healthy"))
            time.sleep(0.2)
        successor = lease.record()
        heartbeat = next(r for r in stack.runners_page() if r["id"] == runner_id)
    finally:
        frozen.resume()

    verdict = judge(stack, "frozen-leader-7s", before + during, fault_summary, started, 40)
    all_completed(verdict)
    for report in verdict.reports:
        # Executed once. Refusals (WORKER_BUSY, ...) spend no attempt; a spent one may only
        # be for a request the resumed worker dropped unread (gunicorn closes keep-alive
        # connections idle past its keepalive when it wakes): none for the runner going
        # offline, or for an answer that came too late.
        retried = [
            e["data"]["error"]["code"]
            for e in stack.events(report.job_id)
            if e["type"] == "job.retrying" and not e["data"].get("refused")
        ]
        assert len(report.starts) == 1, report.describe()
        assert set(retried) <= {"RUNNER_UNREACHABLE"}, (report.describe(), retried)
    # Jobs the stopped worker held ran across the freeze and completed once, in time.
    held = [
        r
        for r in verdict.reports
        if any(s["pid"] == leader and s["t"] < stopped_at for s in r.starts)
        and any(e["event"] == "end" and e["t"] > stopped_at + FREEZE_S for e in r.runs)
    ]
    assert held, [r.describe() for r in verdict.reports]
    # A follower took over while the leader was stopped, and heartbeated as the same runner.
    assert successor[0] > generation and successor[2] not in (0, leader), successor
    assert successor[2] in runner.proc.worker_pids(), successor
    assert parse_timestamp(heartbeat["lastHeartbeatAt"]).timestamp() > stopped_at + 1.0
    assert statuses == {runner_id}, statuses  # never offline, never re-registered
    assert stack.forge is not None and "is offline" not in stack.forge.log_text()
    # The old leader stepped down once it resumed; the successor still leads.
    wait_until(
        lambda: runner.proc.log_text().count("steps down") == 1,
        10,
        lambda: f"the resumed leader did not step down once\n{runner.proc.log_tail()}",
    )
    assert leader_pid(runner) == successor[2]


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``path``, unmounted on the way out (root only)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs (a disk to fill) needs root")
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def fill(directory: Path) -> Path:
    """Write a file into ``directory`` until not one more byte fits (ENOSPC)."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as handle:
        for chunk in (1 << 20, 4096, 1):
            try:
                while True:
                    handle.write(b"\0" * chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
    return filler


def unready_answers(url: str, tries: int = 12) -> list[str]:
    """The bodies of the 503 answers among ``tries`` readiness probes (for a failure's message:
    each probe may reach another worker)."""
    answers = (requests.get(url + "/health/ready", timeout=5) for _ in range(tries))
    return [r.text for r in answers if r.status_code != 200]


def readiness_of(conn: PinnedConnection) -> tuple[int, dict[str, Any]]:
    reply = conn.request("GET", "/health/ready")
    return reply.status, reply.body


def test_a_full_state_disk_degrades_the_runner_and_every_job_completes_once_space_returns(
    fault_stack: MakeStack, fault_summary: Summary
) -> None:
    """The runner's state directory is a small tmpfs, filled to the last byte while 20 jobs
    are sent. No worker dies (no SIGBUS from memory-mapped metric files); a worker recycled
    meanwhile (SIGTERM) is replaced by one that boots on the full disk, answers
    /health/live 200 and /health/ready 503 naming the storage, and gunicorn never halts.
    Once the filler is deleted, readiness comes back and every job completes (the forge
    retries what failed), none executed more often than its attempts."""
    started = time.monotonic()
    stack = fault_stack()
    patient = {"maxRetries": 30, "backoffMs": 300, "backoffMultiplier": 2, "maxBackoffMs": 1500}
    with small_tmpfs(stack.root / "runner-R", "8m") as state_dir:
        try:
            stack.start_forge()
            runner = stack.start_runner("R", CAPS)
            runner.proc.wait_workers_serving(timeout=START_TIMEOUT)
            warm = quick_jobs(4, "disk-warm")  # the ledger exists before the disk fills
            stack.submit_all(warm)
            for job in warm:
                stack.wait_final(job["id"])
            filler = fill(state_dir)

            jobs = jobs_of("e2e.work", 8, 200, 3000, "disk-s", retry_policy=patient)
            jobs += [{**j, "retryPolicy": patient} for j in quick_jobs(12, "disk-q")]
            stack.submit_all(jobs)
            before = set(runner.proc.worker_pids())
            recycled = min(before)
            os.kill(recycled, signal.SIGTERM)

            def replacement() -> int | None:
                pids = set(runner.proc.worker_pids())
                new = pids - before
                return new.pop() if len(pids) == 2 and recycled not in pids and new else None

            newest = wait_until(
                replacement, 30, lambda: f"no worker replaced {recycled}\n{runner.proc.log_tail()}"
            )
            assert newest is not None
            conn = pin_to(runner.proc, newest, timeout=20)
            try:
                assert conn.request("GET", "/health/live").status == 200
                _, body = wait_until(
                    lambda: (answer := readiness_of(conn))[0] == 503 and answer,
                    10,
                    "the worker booted on a full disk says it is ready",
                )
            finally:
                conn.close()
            storage = next(c for c in body["checks"] if c["name"] == "storage")
            assert "No space left" in storage.get("message", ""), body
            # The leader's heartbeats tell JobForge (and its dashboard) the runner is not well:
            # degraded while only its own files fail, unhealthy once its ledger cannot be
            # written (jobs are refused then, so JobForge had better send them elsewhere).
            wait_until(
                lambda: (
                    stack.runner_ids(status="degraded").get("R")
                    or stack.runner_ids(status="unhealthy").get("R")
                ),
                10,
                lambda: f"the forge never saw the runner unwell: {stack.runners_page()}",
            )
            time.sleep(3.0)  # jobs keep arriving at the full disk meanwhile
            assert runner.proc.returncode is None, runner.proc.log_tail()

            filler.unlink()
            wait_until(
                lambda: (
                    ready_status(runner.url) == 200
                    and all(ready_status(runner.url) == 200 for _ in range(6))
                ),
                20,
                lambda: (
                    "not ready again once space returned: "
                    f"{unready_answers(runner.url)}\n"
                    f"{runner.proc.log_tail()}"
                ),
            )
            wait_until(
                lambda: stack.runner_ids(status="healthy").get("R"),
                10,
                lambda: f"the forge does not see the runner healthy: {stack.runners_page()}",
            )
            verdict = judge(
                stack, "state-disk-full", warm + jobs, fault_summary, started, timeout=120
            )
            log = runner.proc.log_text()
        finally:
            stack.stop()
    all_completed(verdict)
    # That the fault happened is shown above (readiness 503 naming ENOSPC, JobForge told):
    # jobs sent meanwhile were refused and retried, or held back until the runner was well.
    assert "SIGBUS" not in log and "failed to boot" not in log.lower(), log[-3000:]
    assert runner.proc.returncode is not None  # stopped by the stack, not halted earlier


# --------------------------------------------------------------------------- 11


def _redelivery(job: dict[str, Any]) -> dict[str, Any]:
    """The RunnerExecutionRequest the forge sent for ``job`` (see forge.sending)."""
    return {
        "jobId": job["id"],
        "moduleId": "R",
        "capabilityId": job["type"].split(".", 1)[1],
        "payload": job["payload"]["data"],
        "timeoutMs": job["timeoutMs"],
    }


def test_ledger_deleted_under_a_running_runner(
    fault_stack: MakeStack, fault_summary: Summary
) -> None:
    """``ledger.sqlite3*`` deleted under a running 2-worker runner whose jobs all finished,
    then one worker recycled (its successor would once have made a new, empty ledger). Every
    finished job is delivered again to both workers: each is replayed (a worker that still
    has the deleted file open) or refused with a retryable 503 LEDGER_REPLACED, never run a
    second time; readiness turns unhealthy and an error names the file."""
    started = time.monotonic()
    stack = fault_stack()
    stack.start_forge()
    runner = stack.start_runner("R", CAPS)
    runner.proc.wait_workers_serving(timeout=START_TIMEOUT)
    jobs = mixed_load("deleted", sync=8, async_=4, quick=6)
    stack.submit_all(jobs)
    before = collect(stack, "ledger-deleted", jobs, 60, started)
    assert len(before.completed) == len(jobs), before.explain()

    for path in runner.state_dir.glob("ledger.sqlite3*"):
        path.unlink()
    old_workers = set(runner.proc.worker_pids())
    os.kill(min(old_workers), signal.SIGTERM)  # recycled, as max_requests would
    wait_until(
        lambda: (
            len(set(runner.proc.worker_pids()) - old_workers) == 1
            and len(runner.proc.worker_pids()) == 2
        ),
        20,
        lambda: f"no worker replaced the recycled one\n{runner.proc.log_tail()}",
    )
    runner.proc.wait_workers_serving(timeout=START_TIMEOUT)
    (successor,) = set(runner.proc.worker_pids()) - old_workers

    answers: list[tuple[int, str, int, str]] = []
    for worker, connections in pin_connections(runner.proc, [1, 1]):
        for job in jobs:
            reply = connections[0].execute(_redelivery(job))
            code = (reply.body.get("error") or {}).get("code", "") if reply.body else ""
            answers.append((worker, job["id"], reply.status, reply.headers.get(REPLAYED, "")))
            assert (reply.status == 200 and reply.headers.get(REPLAYED) == "true") or (
                reply.status == 503 and code == "LEDGER_REPLACED"
            ), (worker, reply)
        connections[0].close()
    assert all(status == 503 for worker, _, status, _ in answers if worker == successor), answers

    verdict = judge(stack, "ledger-deleted", jobs, fault_summary, started)
    all_completed(verdict)
    for report in verdict.reports:
        assert len(report.starts) == 1, report.describe()
    wait_until(lambda: ready_status(runner.url) == 503, 10, "readiness stayed healthy")
    assert all(ready_status(runner.url) == 503 for _ in range(4))
    log = runner.proc.log_text()
    assert "ledger replaced" in log and str(runner.state_dir / "ledger.sqlite3") in log, log[-3000:]
    assert not (runner.state_dir / "ledger.sqlite3").exists(), "a fresh ledger was made"


# --------------------------------------------------------------------------- 12


def test_state_disk_full_then_freed(fault_stack: MakeStack, fault_summary: Summary) -> None:
    """The runner's state directory is a small tmpfs that fills up mid-run: jobs the forge
    dispatches meanwhile are refused with a retryable 503 STATE_UNAVAILABLE (or, when only
    their answer could not be stored, answered all the same), readiness turns unhealthy;
    once the space is freed readiness comes back by itself, and every job sent completes,
    none lost, none run more often than its recorded attempts."""
    started = time.monotonic()
    stack = fault_stack()
    state_dir = stack.root / "runner-R"
    with small_tmpfs(state_dir, "16m"), contextlib.ExitStack() as cleanup:
        cleanup.callback(stack.stop)
        stack.start_forge()
        runner = stack.start_runner("R", CAPS)
        runner.proc.wait_workers_serving(timeout=START_TIMEOUT)
        many = {**POLICY, "maxRetries": 20}
        first = mixed_load("full-before", sync=6, async_=4, quick=4)
        stack.submit_all(first)
        assert len(collect(stack, "disk-full", first, 60, started).completed) == len(first)

        # The WAL emptied, so that the next write needs new room, then the disk filled.
        with contextlib.closing(sqlite3.connect(state_dir / "ledger.sqlite3", timeout=10)) as c:
            c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        filler = fill(state_dir)
        jobs = jobs_of("e2e.work", 6, 200, 3000, "full-s", retry_policy=many)
        jobs += jobs_of("e2e.work", 4, 200, ASYNC_MS, "full-a", retry_policy=many)
        jobs += [
            {**j, "retryPolicy": many} for j in mixed_load("full-q", sync=0, async_=0, quick=6)
        ]
        stack.submit_all(jobs)
        wait_until(
            lambda: ready_status(runner.url) == 503,
            20,
            lambda: f"readiness never went unhealthy\n{runner.proc.log_tail()}",
        )
        time.sleep(2.0)
        filler.unlink()
        wait_until(
            lambda: all(ready_status(runner.url) == 200 for _ in range(3)),
            20,
            lambda: f"readiness did not come back\n{runner.proc.log_tail()}",
        )
        verdict = judge(stack, "disk-full-then-freed", first + jobs, fault_summary, started, 90)
        all_completed(verdict)
        log = runner.proc.log_text()
        assert "cannot be written" in log, log[-3000:]
        assert "Bus error" not in log and "SIGBUS" not in log, log[-3000:]
