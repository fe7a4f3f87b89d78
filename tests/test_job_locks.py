"""The idempotency ledger's job locks: one claim per jobId across processes, freed by death.

Real processes (``fork``) and a real lock file: the property that matters, that a dead
worker's claim vanishes without anyone cleaning up, only shows across processes.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import uuid
from pathlib import Path
from typing import Any

import pytest

from runnerkit.runner.ledger import Ledger
from runnerkit.runner.locks import JobLocks, Slot, SlotTable
from tests.helpers import run_in_threads

_FORK = multiprocessing.get_context("fork")


def _hold(path: str, job_id: str, ready: multiprocessing.synchronize.Event) -> None:
    locks = JobLocks(path)
    assert locks.acquire(job_id)
    ready.set()
    signal.pause()


def _holder(path: Path, job_id: str) -> multiprocessing.process.BaseProcess:
    ready = _FORK.Event()
    proc = _FORK.Process(target=_hold, args=(str(path), job_id, ready), daemon=True)
    proc.start()
    assert ready.wait(10), "the holder did not take its lock"
    return proc


def test_a_job_held_by_another_process_cannot_be_claimed_until_it_dies(tmp_path: Path) -> None:
    path = tmp_path / "jobs.lock"
    job_id = str(uuid.uuid4())
    holder = _holder(path, job_id)
    locks = JobLocks(str(path))
    try:
        assert not locks.acquire(job_id)
        assert locks.acquire(str(uuid.uuid4())), "another jobId is not blocked"
    finally:
        os.kill(holder.pid or 0, signal.SIGKILL)
        holder.join(10)
    assert locks.acquire(job_id), "a dead process's claim must vanish with it"


def test_the_same_process_cannot_claim_a_running_job_twice(tmp_path: Path) -> None:
    locks = JobLocks(str(tmp_path / "jobs.lock"))
    job_id = str(uuid.uuid4())

    assert locks.acquire(job_id)
    assert not locks.acquire(job_id)
    locks.release(job_id)
    assert locks.acquire(job_id)


def test_releasing_a_job_not_held_changes_nothing(tmp_path: Path) -> None:
    locks = JobLocks(str(tmp_path / "jobs.lock"))
    held = str(uuid.uuid4())
    assert locks.acquire(held)

    locks.release(str(uuid.uuid4()))

    assert not locks.acquire(held)


def _ledger(tmp_path: Path) -> Ledger:
    return Ledger(str(tmp_path / "ledger.sqlite3"), retention_s=3600)


def test_a_synchronous_claim_is_one_lock_and_its_answer_one_row(tmp_path: Path) -> None:
    ledger = _ledger(tmp_path)
    job_id = str(uuid.uuid4())

    assert ledger.claim(job_id).outcome == "run"
    assert ledger.size() == 0, "a running synchronous job needs no row"
    assert ledger.claim(job_id).outcome == "running"

    body = {"jobId": job_id, "success": True}
    ledger.complete(job_id, 200, json.dumps(body))

    replay = ledger.claim(job_id)
    assert (replay.outcome, replay.status, replay.body) == ("replay", 200, body)
    assert ledger.size() == 1


def _failed_retryably(ledger: Ledger) -> str:
    """A jobId whose first attempt ran and failed with a retryable error."""
    job_id = str(uuid.uuid4())
    assert ledger.claim(job_id).outcome == "run"
    failure = {"jobId": job_id, "success": False, "error": {"retryable": True}}
    ledger.complete(job_id, 503, json.dumps(failure))
    return job_id


def test_a_retryable_failure_runs_again_as_a_new_attempt(tmp_path: Path) -> None:
    ledger = _ledger(tmp_path)
    job_id = _failed_retryably(ledger)

    again = ledger.claim(job_id)

    assert (again.outcome, again.attempt) == ("run", 2)
    ledger.complete(job_id, 200, json.dumps({"jobId": job_id, "success": True}))
    assert ledger.claim(job_id).outcome == "replay"


def test_a_claim_given_back_unrun_leaves_nothing_behind(tmp_path: Path) -> None:
    ledger = _ledger(tmp_path)
    job_id = str(uuid.uuid4())
    assert ledger.claim(job_id).outcome == "run"

    ledger.release(job_id)

    assert ledger.size() == 0
    assert ledger.claim(job_id).outcome == "run"


def test_giving_back_a_first_synchronous_claim_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The 429 path (no free slot) must not queue in the writers' turn to delete nothing."""
    ledger = _ledger(tmp_path)
    job_id = str(uuid.uuid4())
    claim = ledger.claim(job_id)
    assert (claim.outcome, claim.recorded) == ("run", False)

    def no_write(*args: object) -> None:
        raise AssertionError("release of an unrecorded claim took the writers' turn")

    monkeypatch.setattr(ledger._writers, "hold", no_write)
    ledger.release(job_id, recorded=claim.recorded)

    assert ledger.claim(job_id).outcome == "run", "the job lock was not given back"


def test_giving_back_a_new_attempt_removes_its_row(tmp_path: Path) -> None:
    ledger = _ledger(tmp_path)
    job_id = _failed_retryably(ledger)
    again = ledger.claim(job_id)
    assert (again.outcome, again.recorded) == ("run", True)

    ledger.release(job_id, recorded=again.recorded)

    assert ledger.size() == 0
    assert ledger.claim(job_id).outcome == "run"


def test_an_asynchronous_claim_is_recorded_as_queued_while_it_waits(tmp_path: Path) -> None:
    ledger = _ledger(tmp_path)
    job_id = str(uuid.uuid4())

    assert ledger.claim(job_id, queued=True).outcome == "run"

    assert ledger.queued() == 1
    ledger.start(job_id)
    assert ledger.queued() == 0
    ledger.complete(job_id, 200, json.dumps({"jobId": job_id, "success": True}))
    assert ledger.claim(job_id).outcome == "replay"


def test_housekeepings_look_for_unfinished_jobs_does_not_scan_every_answer(
    tmp_path: Path,
) -> None:
    ledger = _ledger(tmp_path)
    for _ in range(50):
        job_id = str(uuid.uuid4())
        assert ledger.claim(job_id).outcome == "run"
        ledger.complete(job_id, 200, json.dumps({"jobId": job_id, "success": True}))
    assert ledger.claim(str(uuid.uuid4()), queued=True).outcome == "run"
    statements: list[str] = []
    with ledger._connection() as conn:
        conn.set_trace_callback(statements.append)
    try:
        assert ledger.queued() == 1
        assert ledger.orphans() == []  # its owner, this process, is alive
    finally:
        with ledger._connection() as conn:
            conn.set_trace_callback(None)
            plans = [
                " ".join(
                    str(part) for row in conn.execute("EXPLAIN QUERY PLAN " + sql) for part in row
                )
                for sql in statements
                if sql.lstrip().upper().startswith("SELECT")
            ]

    assert len(plans) == 2, statements
    assert all("jobs_unfinished" in plan for plan in plans), plans


def _dead_child_pid() -> int:
    child = _FORK.Process(target=os._exit, args=(0,))
    child.start()
    child.join(30)
    assert child.pid is not None
    return child.pid


def test_a_waiting_job_counts_the_jobs_of_its_capability_accepted_before_it(
    tmp_path: Path,
) -> None:
    """The line for a capability's slots: jobs queued earlier and still waiting, of live
    workers only (a dead worker's job is the leader's to answer, not a place in the line)."""
    ledger = _ledger(tmp_path)
    first, other, second, third = (str(uuid.uuid4()) for _ in range(4))
    for job_id, capability in ((first, "a"), (other, "b"), (second, "a"), (third, "a")):
        assert ledger.claim(job_id, queued=True, capability=capability).outcome == "run"

    assert [ledger.ahead(j, "a") for j in (first, second, third)] == [0, 1, 2]
    assert ledger.ahead(other, "b") == 0
    ledger.start(first)  # it got its slot: it no longer waits
    assert [ledger.ahead(j, "a") for j in (second, third)] == [0, 1]
    with ledger._transaction() as conn:  # the second's worker died while it waited
        conn.execute("UPDATE jobs SET owner_pid = ? WHERE job_id = ?", (_dead_child_pid(), second))
    assert ledger.ahead(third, "a") == 0


def _hammer(take: Any, give: Any, keys: list[str], threads: int = 8) -> int:
    """Threads take and give back ``keys`` at random, switching often; returns the most
    holders of one key seen at once (a thread lock no longer keeps them apart)."""
    import random
    import threading

    holders: dict[str, int] = dict.fromkeys(keys, 0)
    most = [0]
    count = threading.Lock()

    errors: list[BaseException] = []

    def work() -> None:
        try:
            run()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def run() -> None:
        for _ in range(400):
            key = random.choice(keys)
            token = take(key)
            if token is None:
                continue
            with count:
                holders[key] += 1
                most[0] = max(most[0], holders[key])
            with count:
                holders[key] -= 1
            give(key, token)

    # The GIL handed over as often as possible.
    run_in_threads(lambda _: work(), threads, switch_interval=1e-5)
    assert errors == []
    assert all(held == 0 for held in holders.values())
    return most[0]


def test_threads_of_one_process_never_hold_the_same_job_at_once(tmp_path: Path) -> None:
    locks = JobLocks(str(tmp_path / "ledger.running.lock"))
    most = _hammer(
        lambda key: key if locks.acquire(key) else None,
        lambda key, _token: locks.release(key),
        ["a", "b", "c"],
    )
    assert most == 1
    assert all(locks.acquire(key) for key in "abc")  # every lock was given back


def test_threads_of_one_process_never_hold_more_slots_than_the_limit(tmp_path: Path) -> None:
    import threading

    slots = SlotTable(str(tmp_path), {"cap": 3})
    held: dict[int, int] = {}
    bookkeeping = threading.Lock()

    def take(_key: str) -> Slot | None:
        slot = slots.acquire("cap")
        if slot is not None:
            with bookkeeping:
                held[slot.index] = held.get(slot.index, 0) + 1
                assert held[slot.index] == 1, "two threads got the same slot"
        return slot

    def give(_key: str, slot: Slot) -> None:
        with bookkeeping:
            held[slot.index] -= 1
        slots.release(slot)

    assert _hammer(take, give, ["cap"]) <= 3
    assert slots.in_use("cap") == 0
    assert [slots.acquire("cap") is not None for _ in range(4)] == [True, True, True, False]
