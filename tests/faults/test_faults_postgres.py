"""Fault injection on a forge that keeps its state in PostgreSQL, on one or two instances.

The same judgement as every scenario of ``test_faults.py`` (:func:`judge`: nothing lost,
nothing run more often than the contract allows, nothing run that was not sent), with
faults only a shared database brings:

- one of two forge instances is SIGKILLed under load: the survivor dispatches everything,
  the runner (given both URLs) carries on as the same runner;
- the PostgreSQL server restarts under load (a server of the test's own: the machine's is
  shared): dispatch resumes, nothing is lost, a request while it is down gets a 503
  envelope, not a 500;
- two instances race for the same jobs: leadership is cut again and again while jobs arrive
  at both, so claims of an outgoing and an incoming dispatcher overlap; 0 duplicates.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Iterator

import psycopg
import pytest
import requests

from tests.faults.harness import FaultStack, Verdict, mixed_load, quick_jobs
from tests.faults.test_faults import CAPS, all_completed, judge
from tests.support import GunicornProcess, postgres
from tests.support.pg_server import PrivatePostgres
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

Summary = Callable[[Verdict], None]
MakeStack = Callable[..., FaultStack]


def twin_forges(stack: FaultStack) -> tuple[GunicornProcess, GunicornProcess]:
    """Two forge instances on the stack's database; runners started next get both URLs."""
    first = stack.start_forge()
    second = stack.add_forge()
    stack.runner_env["RUNNERKIT_JOBFORGE_URL"] = stack.forge_urls
    return first, second


def cut_dispatcher_lock(db_url: str) -> int:
    """End the connection holding the dispatcher lock (it LISTENs on the forge's channel), as
    a network cut or an administrator would; how many connections were ended."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        where = conn.execute("SELECT current_database(), current_schema()").fetchone()
        assert where is not None
        digest = hashlib.sha256(f"runnerkit-dispatcher:{where[0]}:{where[1]}".encode()).digest()
        rows = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            " AND query = %s",
            (f"LISTEN runnerkit_forge_{digest[8:20].hex()}",),
        ).fetchall()
    return sum(1 for row in rows if row[0])


# --------------------------------------------------------------------------- 1


def test_one_of_two_forge_instances_killed_under_load(
    fault_stack: MakeStack, fault_summary: Summary, pg_database: postgres.TestDatabase
) -> None:
    """SIGKILL of the dispatching instance (its whole gunicorn tree) while jobs submitted to
    both run: the other instance takes the dispatcher lock, retries the attempts whose answers
    went to the dead one (the runner's ledger replays them), dispatches the rest and what is
    submitted after; the runner's heartbeats and results move to it without a new
    registration. Every job completes, none runs twice."""
    started = time.monotonic()
    stack = fault_stack(db_url=pg_database.new_schema())
    twin_forges(stack)
    stack.start_runner("R", CAPS)
    runner_id = stack.runner_ids()["R"]
    registered = {r["id"]: r["registeredAt"] for r in stack.runners_page()}
    jobs = mixed_load("twin-kill")
    stack.submit_all(jobs, spread=True)
    stack.wait_started(jobs, 8)
    victim = wait_until(stack.dispatching_forge, 15, "no forge instance dispatches")
    assert victim is not None
    stack.kill_forge(victim)
    assert len(stack.forges) == 1
    after = quick_jobs(10, "twin-after")
    stack.submit_all(after)

    verdict = judge(stack, "forge-instance-killed", jobs + after, fault_summary, started, 90)
    all_completed(verdict)
    assert stack.dispatching_forge() is stack.forge, "the survivor does not dispatch"
    wait_until(
        lambda: stack.runner_ids(status="healthy") == {"R": runner_id},
        20,
        lambda: f"not the same healthy runner on the survivor: {stack.runners_page()}",
    )
    # No second registration: the survivor knows the runner from the shared database.
    assert {r["id"]: r["registeredAt"] for r in stack.runners_page()} == registered


# --------------------------------------------------------------------------- 2


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    server = PrivatePostgres()
    yield server
    server.close()


def test_postgres_restarted_under_load(
    fault_stack: MakeStack, fault_summary: Summary, private_postgres: PrivatePostgres
) -> None:
    """The forge's PostgreSQL server stops (every connection cut) while jobs run and is
    started again 2 s later: requests meanwhile get 503 envelopes, answers the forge could not
    record come back as replays of retried attempts, async results wait in the runner's
    outbox; dispatch resumes on new connections. Every job completes once."""
    started = time.monotonic()
    stack = fault_stack(db_url=private_postgres.url)
    stack.start_forge()
    stack.start_runner("R", CAPS)
    jobs = mixed_load("pg-restart")
    stack.submit_all(jobs)
    stack.wait_started(jobs, 8)

    private_postgres.stop()
    down = requests.get(f"{stack.url}/jobs/{jobs[0]['id']}", timeout=(2, 30))
    assert down.status_code == 503, down.text[:500]
    error = down.json()["error"]
    assert error["category"] == "SERVICE_UNAVAILABLE" and error["retryable"] is True, error
    time.sleep(2.0)
    private_postgres.start()
    after = quick_jobs(10, "pg-after")
    wait_until(
        lambda: requests.get(f"{stack.url}/health", timeout=(2, 30)).status_code == 200,
        60,
        lambda: f"the forge never became healthy again\n{stack.logs()}",
    )
    stack.submit_all(after)

    verdict = judge(stack, "postgres-restarted", jobs + after, fault_summary, started, 120)
    all_completed(verdict)
    assert stack.forge is not None
    log = stack.forge.log_text()
    assert "the database is unavailable" in log, "the outage never reached the forge"
    assert "unhandled" not in log, log[-3000:]


# --------------------------------------------------------------------------- 3


def test_two_forge_instances_racing_for_the_same_jobs(
    fault_stack: MakeStack, fault_summary: Summary, pg_database: postgres.TestDatabase
) -> None:
    """Jobs submitted to both instances while the dispatcher lock's connection is cut every
    0.4 s: each cut hands dispatching to whichever process of either instance takes the lock
    next, while the previous holder may still be claiming. Claims are transactions
    (``FOR UPDATE SKIP LOCKED`` under the writers' lock), so every job is dispatched once:
    0 duplicated executions, and the cuts did move dispatching between the instances."""
    started = time.monotonic()
    db_url = pg_database.new_schema()
    stack = fault_stack(db_url=db_url)
    twin_forges(stack)
    stack.start_runner("R", CAPS)
    jobs = [*mixed_load("race"), *quick_jobs(40, "race-x")]
    holders: set[int] = set()
    cuts = 0
    submitting = threading.Thread(target=stack.submit_all, args=(jobs,), kwargs={"spread": True})
    submitting.start()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (cuts < 10 or len(holders) < 2):
            holder = stack.dispatching_forge()
            if holder is not None:
                holders.add(holder.master_pid)
            cuts += cut_dispatcher_lock(db_url)
            time.sleep(0.4)
    finally:
        submitting.join(60)

    verdict = judge(stack, "forge-instances-racing", jobs, fault_summary, started, 90)
    all_completed(verdict)
    assert cuts >= 10, f"only {cuts} cuts of the dispatcher lock"
    assert len(holders) == 2, f"dispatching never moved between the instances: {holders}"
