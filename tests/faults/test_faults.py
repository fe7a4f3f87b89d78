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
import signal
import time
from collections.abc import Callable
from typing import Any

import psutil
import pytest
import requests

from tests.e2e.conftest import QUICK, START_TIMEOUT, RunnerInstance
from tests.faults.harness import (
    ASYNC_MS,
    FAULT_RUNNER_APP,
    ExecuteProxy,
    FaultStack,
    Verdict,
    collect,
    jobs_of,
    leader_pid,
    mixed_load,
    running_executions,
    sigkill,
    start_proxied_runner,
)
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

#: Capabilities of the e2e_app runner used by scenarios 1-6 (work: 2 slots, solo: 1,
#: alpha: 4 and instant).
CAPS = ("alpha", "work", "solo")

#: Error categories of a runner refusing a job it has no room for (it never ran).
REFUSALS = {"RATE_LIMITED", "RESOURCE_CONFLICT", "SERVICE_UNAVAILABLE"}

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
    ledger keeps every job to exactly one execution, and every job completes."""
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
        if mode != "pass":
            assert len(copies) >= 2, (mode, report.describe(), copies)
    replays = [d for d in proxy.deliveries if d.replayed]
    assert replays, proxy.deliveries


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
