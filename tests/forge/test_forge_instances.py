"""Several forge instances on one PostgreSQL database: real gunicorn processes, real HTTP.

Each instance is ``runnerkit.forge:app`` under gunicorn with 2 workers and its own DB_PATH
(as on its own host: its own dispatcher lock file and wake-up socket), all on one schema of
the real PostgreSQL server. Exactly one process of all of them dispatches (it holds the
PostgreSQL advisory lock and logs that it took it); jobs submitted to either instance run
once each within the runner's maxConcurrency; killing the dispatching instance hands dispatch
to the other; a job submitted to the instance that does not dispatch wakes the other one
through NOTIFY (its poll is ten minutes, so nothing else would). Who dispatches is
seen in the database: the pid in the heartbeat the dispatching process records.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import requests

from tests.forge.helpers import FakeRunner, ForgeHTTP, Reply, capability, sync_request
from tests.support import GunicornProcess
from tests.support.waiting import wait_until

#: A loaded machine is slow; none of these waits is a measurement.
PATIENCE = 60.0

pytestmark = pytest.mark.parametrize("forge_backend", ["postgres"])


class Instance(ForgeHTTP):
    """One forge instance: gunicorn, 2 workers, its own DB_PATH, the shared database."""

    def __init__(self, root: Path, db_url: str, **settings: Any) -> None:
        root.mkdir(parents=True, exist_ok=True)
        env: dict[str, str | None] = {
            "RUNNERKIT_FORGE_DB_URL": db_url,
            "RUNNERKIT_FORGE_DB_PATH": str(root / "forge.sqlite3"),
            "RUNNERKIT_FORGE_POLL_INTERVAL_MS": "50",
            "RUNNERKIT_FORGE_HEARTBEAT_INTERVAL_MS": "60000",
            "RUNNERKIT_FORGE_CONNECT_TIMEOUT_MS": "2000",
            "RUNNERKIT_FORGE_TOKEN": None,
            "RUNNERKIT_FORGE_RUNNER_TOKEN": None,
            "RUNNERKIT_FORGE_SIGNING_SECRET": None,
            "WEB_CONCURRENCY": None,
        }
        env.update({f"RUNNERKIT_FORGE_{k}": str(v) for k, v in settings.items()})
        self.proc = GunicornProcess(
            "runnerkit.forge:app",
            log_dir=root,
            workers=2,
            env=env,
            extra_args=["--worker-class", "gthread", "--threads", "4"],
            name="forge",
        )
        self.url = self.proc.url
        self.session = requests.Session()
        self.proc.start()
        self.proc.wait_ready("/health", timeout=PATIENCE)

    def stop(self) -> None:
        self.session.close()
        self.proc.stop(timeout=10)


@pytest.fixture
def instances(tmp_path: Path, forge_db_url: str) -> Iterator[Callable[..., Instance]]:
    made: list[Instance] = []

    def make(**settings: Any) -> Instance:
        instance = Instance(tmp_path / f"forge{len(made)}", forge_db_url, **settings)
        made.append(instance)
        return instance

    yield make
    for instance in made:
        instance.stop()


@pytest.fixture
def runner() -> Iterator[FakeRunner]:
    fake = FakeRunner(
        "shared", [capability("cap", ["type.a"], max_concurrency=2)], lambda f, c: Reply(delay=0.05)
    )
    yield fake
    fake.stop()


def dispatcher_record(db_url: str) -> dict[str, Any]:
    """The dispatching process's latest heartbeat record (``meta.dispatcher``)."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        row = conn.execute("SELECT value FROM meta WHERE key = 'dispatcher'").fetchone()
    return {} if row is None else dict(json.loads(row[0]))


def dispatching(db_url: str, *forges: Instance) -> tuple[Instance, int]:
    """The instance whose worker records the dispatcher's heartbeat now, and its pid."""
    pid = int(wait_until(lambda: dispatcher_record(db_url).get("pid"), PATIENCE))
    owners = [f for f in forges if pid in f.proc.worker_pids()]
    assert len(owners) == 1, (pid, [f.proc.worker_pids() for f in forges])
    return owners[0], pid


def run_jobs(submit_to: list[Instance], count: int, runner: FakeRunner, db_url: str) -> set[int]:
    """Submit ``count`` jobs round-robin to ``submit_to``; wait until each completed, each
    run once. Returns the pids seen recording the dispatcher's heartbeat meanwhile."""
    ids = [submit_to[i % len(submit_to)].submit(sync_request())["id"] for i in range(count)]
    pids = set()
    for job_id in ids:
        submit_to[0].wait_status(job_id, "completed", timeout=PATIENCE)
        pids.add(int(dispatcher_record(db_url)["pid"]))
    for job_id in ids:
        assert len(runner.calls_for(job_id)) == 1, job_id
    return pids


def test_one_dispatcher_over_two_instances_and_failover(
    instances: Callable[..., Instance], runner: FakeRunner, forge_db_url: str
) -> None:
    one, two = instances(), instances()
    runner.register(one.url)
    leader, pid = dispatching(forge_db_url, one, two)
    other = two if leader is one else one

    # Jobs through both instances: each runs once, within maxConcurrency, and one process
    # of one instance dispatches them all (it alone records the dispatcher's heartbeat).
    assert run_jobs([one, two], 24, runner, forge_db_url) == {pid}
    assert runner.max_running.get("cap", 0) <= 2, runner.max_running

    leader.proc.kill()  # kill -9, its workers with it: PostgreSQL frees the lock
    wait_until(
        lambda: int(dispatcher_record(forge_db_url)["pid"]) in other.proc.worker_pids(),
        PATIENCE,
        lambda: f"the other instance did not take over\n{other.proc.log_tail()}",
    )
    _, new_pid = dispatching(forge_db_url, other)
    assert run_jobs([other], 12, runner, forge_db_url) == {new_pid}
    assert runner.max_running.get("cap", 0) <= 2, runner.max_running
    assert len(runner.calls) == 36


def polling_seldom(
    instances: Callable[..., Instance], runner: FakeRunner, db_url: str
) -> tuple[Instance, Instance, int, int]:
    """Two instances with a ten-minute poll: the dispatcher looks for work only when something
    wakes it (between polls it only records its heartbeat, so both instances' /health stay
    healthy). (dispatching instance, the other, the dispatching pid, notifications received
    so far), once the dispatcher has recorded a heartbeat."""
    one, two = instances(POLL_INTERVAL_MS=600_000), instances(POLL_INTERVAL_MS=600_000)
    runner.register(one.url)
    leader, pid = dispatching(db_url, one, two)
    first = dispatcher_record(db_url)
    wait_until(lambda: dispatcher_record(db_url)["ts"] > first["ts"], PATIENCE)
    other = two if leader is one else one
    return leader, other, pid, int(dispatcher_record(db_url)["notified"])


def test_a_job_submitted_elsewhere_wakes_the_dispatcher_through_notify(
    instances: Callable[..., Instance], runner: FakeRunner, forge_db_url: str
) -> None:
    _leader, other, pid, before = polling_seldom(instances, runner, forge_db_url)
    assert other.get("/health").status_code == 200

    job_id = other.submit(sync_request())["id"]
    other.wait_status(job_id, "completed", timeout=PATIENCE)
    assert len(runner.calls_for(job_id)) == 1
    # The heartbeat records the notifications received, the one that woke it among them.
    wait_until(lambda: dispatcher_record(forge_db_url)["notified"] > before, PATIENCE)
    assert dispatcher_record(forge_db_url)["pid"] == pid
    # Once a process of this instance has found nobody local to wake, the statement that
    # queues its next jobs NOTIFYs itself: those are dispatched without a poll too.
    more = [other.submit(sync_request())["id"] for _ in range(4)]
    for job_id in more:
        other.wait_status(job_id, "completed", timeout=PATIENCE)
        assert len(runner.calls_for(job_id)) == 1


def test_submissions_elsewhere_share_notifies_and_none_is_left_behind(
    instances: Callable[..., Instance], runner: FakeRunner, forge_db_url: str
) -> None:
    """A NOTIFY per NOTIFY_GAP_MS at most from one process: submissions inside the gap ride
    on the one sent when it ends (the dispatcher polls every ten minutes here, so a job whose
    wake-up was dropped would not complete within the test)."""
    one = instances(POLL_INTERVAL_MS=600_000, NOTIFY_GAP_MS=1_000)
    two = instances(POLL_INTERVAL_MS=600_000, NOTIFY_GAP_MS=1_000)
    runner.register(one.url)
    leader, pid = dispatching(forge_db_url, one, two)
    first = dispatcher_record(forge_db_url)
    wait_until(lambda: dispatcher_record(forge_db_url)["ts"] > first["ts"], PATIENCE)
    before = int(dispatcher_record(forge_db_url)["notified"])
    other = two if leader is one else one

    job_ids = [other.submit(sync_request())["id"] for _ in range(12)]
    for job_id in job_ids:
        other.wait_status(job_id, "completed", timeout=PATIENCE)
        assert len(runner.calls_for(job_id)) == 1
    done = dispatcher_record(forge_db_url)
    wait_until(lambda: dispatcher_record(forge_db_url)["ts"] > done["ts"], PATIENCE)
    record = dispatcher_record(forge_db_url)
    assert record["pid"] == pid
    # 12 submissions through 2 processes within a few seconds: a NOTIFY per second of each
    # at most, and the first of each (its datagram found nobody), not one per submission.
    received = int(record["notified"]) - before
    assert 1 <= received < 12, received


def test_a_job_submitted_to_the_dispatching_instance_wakes_it_without_notify(
    instances: Callable[..., Instance], runner: FakeRunner, forge_db_url: str
) -> None:
    # The local datagram reaches the dispatcher: a NOTIFY (a transaction on the database)
    # would be one more per submitted job for nothing.
    leader, _other, pid, before = polling_seldom(instances, runner, forge_db_url)

    job_ids = [leader.submit(sync_request())["id"] for _ in range(3)]
    for job_id in job_ids:
        leader.wait_status(job_id, "completed", timeout=PATIENCE)
    done = dispatcher_record(forge_db_url)
    wait_until(lambda: dispatcher_record(forge_db_url)["ts"] > done["ts"], PATIENCE)
    record = dispatcher_record(forge_db_url)
    assert record["pid"] == pid
    assert int(record["notified"]) == before, "a local submission sent a NOTIFY"


def lock_holders(db_url: str) -> list[int]:
    """Backend pids holding the dispatcher's advisory lock (its key: database and schema)."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        where = conn.execute("SELECT current_database(), current_schema()").fetchone()
        assert where is not None
        digest = hashlib.sha256(f"runnerkit-dispatcher:{where[0]}:{where[1]}".encode()).digest()
        key = int.from_bytes(digest[:8], "big")
        rows = conn.execute(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted "
            "AND classid::bigint = %s AND objid::bigint = %s AND objsubid = 1",
            (key >> 32, key & 0xFFFFFFFF),
        ).fetchall()
    return [int(row[0]) for row in rows]


def test_a_lost_lock_connection_is_lost_leadership(
    instances: Callable[..., Instance], runner: FakeRunner, forge_db_url: str
) -> None:
    one, two = instances(), instances()
    runner.register(one.url)
    dispatching(forge_db_url, one, two)
    holders = wait_until(lambda: lock_holders(forge_db_url), PATIENCE)
    assert len(holders) == 1, holders
    with psycopg.connect(forge_db_url, autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(%s)", (holders[0],))
    # Some process takes the lock again on a new connection, and dispatch goes on.
    wait_until(
        lambda: (found := lock_holders(forge_db_url)) and found != holders,
        PATIENCE,
        lambda: "nobody took the dispatcher lock again\n" + one.proc.log_tail(),
    )
    run_jobs([one, two], 6, runner, forge_db_url)
    assert runner.max_running.get("cap", 0) <= 2, runner.max_running
    logs = one.proc.log_text() + two.proc.log_text()
    assert "leadership lost" in logs
