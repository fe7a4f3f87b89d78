"""A child forked while another thread holds a lock can still take it (DESIGN.md §2).

``fork`` copies a lock in whatever state it is, and the thread holding it does not exist in
the child: a worker forking an isolated job while housekeeping held the ledger's lock, or a
gunicorn master that imported the app (``--preload``), left children that hung on their
first use. Each case here forks (a real ``fork``) while a thread of the parent holds the lock,
and the child must finish its work; a child still running after a generous deadline is hung.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from runnerkit.runner.jobforge import JobForgeClient
from runnerkit.runner.lease import LeaderLease
from runnerkit.runner.ledger import Ledger
from runnerkit.runner.locks import JobLocks, SlotTable
from runnerkit.service.sqlite import WriterTurns
from runnerkit.service.write_failures import STORAGE

_FORK = multiprocessing.get_context("fork")
#: A child that has not finished by then is stuck on a lock it inherited held.
DEADLINE_S = 30.0


@contextlib.contextmanager
def held_by_a_thread(lock: Any) -> Iterator[None]:
    """``lock`` held by another thread of this process for the duration of the block."""
    taken, done = threading.Event(), threading.Event()

    def hold() -> None:
        with lock:
            taken.set()
            done.wait(DEADLINE_S * 2)

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    assert taken.wait(DEADLINE_S), "the thread did not take the lock"
    try:
        yield
    finally:
        done.set()
        thread.join(DEADLINE_S)


def run_in_child(work: Callable[[], None]) -> None:
    """Fork, run ``work`` in the child; fail if it raises or has not finished by the deadline."""
    child = _FORK.Process(target=work, daemon=True)
    child.start()
    child.join(DEADLINE_S)
    if child.is_alive():
        child.kill()
        child.join(DEADLINE_S)
        pytest.fail(f"the forked child hung for {DEADLINE_S:.0f} s on a lock it inherited held")
    assert child.exitcode == 0, f"the child failed (exit code {child.exitcode})"


def test_a_child_forked_while_housekeeping_holds_the_ledger_lock_uses_the_ledger(
    tmp_path: Path,
) -> None:
    ledger = Ledger(str(tmp_path / "ledger.sqlite3"), retention_s=60)
    assert ledger.size() == 0  # the parent's connection is open
    job_id = str(uuid.uuid4())

    def child() -> None:
        claim = ledger.claim(job_id)
        assert claim.outcome == "run", claim
        ledger.complete(job_id, 200, json.dumps({"jobId": job_id, "success": True}))
        assert ledger.claim(job_id).outcome == "replay"

    with held_by_a_thread(ledger._lock):
        run_in_child(child)
    # The parent's own connection still works, and sees what the child wrote.
    replay = ledger.claim(job_id)
    assert replay.outcome == "replay", replay
    assert replay.body == {"jobId": job_id, "success": True}


@dataclass
class Case:
    """An object of ``state.py`` (or the JobForge client), the lock a thread holds at the
    fork, and what the child then does with the object."""

    make: Callable[[Path], Any]
    lock: Callable[[Any], Any]
    use: Callable[[Any], None]


def _take_slot(slots: SlotTable) -> None:
    slot = slots.acquire("cap")
    assert slot is not None
    assert slots.in_use("cap") == 1
    slots.release(slot)


def _take_job(locks: JobLocks) -> None:
    job_id = str(uuid.uuid4())
    assert locks.acquire(job_id)
    locks.release(job_id)


def _take_turn(turns: WriterTurns) -> None:
    with turns.hold():
        pass


def _lead(lease: LeaderLease) -> None:
    assert lease.acquire()
    lease.release()


def _note_failure(_: object) -> None:
    STORAGE.failed("a test's file", OSError("disk full"))
    assert "a test's file" in STORAGE.problems()
    STORAGE.recovered("a test's file")


CASES = {
    "slot table": Case(
        lambda d: SlotTable(str(d / "slots"), {"cap": 2}), lambda o: o._lock, _take_slot
    ),
    "job locks": Case(lambda d: JobLocks(str(d / "running.lock")), lambda o: o._lock, _take_job),
    "writers' turn guard": Case(
        lambda d: WriterTurns(str(d / "writer.lock")), lambda o: o._guard, _take_turn
    ),
    "leader lease": Case(lambda d: LeaderLease(str(d)), lambda o: o._guard, _lead),
    "storage failures": Case(lambda d: STORAGE, lambda o: o._lock, _note_failure),
    "JobForge client": Case(
        lambda d: JobForgeClient("http://127.0.0.1:9"), lambda o: o._lock, lambda o: o.session
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_a_child_forked_while_a_thread_holds_a_lock_can_take_it(tmp_path: Path, name: str) -> None:
    case = CASES[name]
    (tmp_path / "slots").mkdir()
    obj = case.make(tmp_path)
    with held_by_a_thread(case.lock(obj)):
        run_in_child(lambda: case.use(obj))
    case.use(obj)  # ... and the parent still can, once its thread let go


def test_a_child_owns_none_of_its_parents_job_locks_slots_or_leadership(
    tmp_path: Path,
) -> None:
    """The parent's descriptors carry its locks: a child that reused them would find its
    parent's job "free" to claim again, and could release the parent's locks."""
    ledger = Ledger(str(tmp_path / "ledger.sqlite3"), retention_s=60)
    slots = SlotTable(str(tmp_path), {"cap": 1})
    lease = LeaderLease(str(tmp_path))
    job_id = str(uuid.uuid4())
    assert ledger.claim(job_id).outcome == "run"
    slot = slots.acquire("cap")
    assert slot is not None
    assert lease.acquire()

    def child() -> None:
        assert ledger.claim(job_id).outcome == "running"
        assert slots.acquire("cap") is None
        slots.release(slot)  # not the child's to give back: nothing happens
        ledger.running.release(job_id)
        assert not lease.held and not lease.acquire()

    run_in_child(child)
    assert slots.in_use("cap") == 1
    assert ledger.claim(job_id).outcome == "running"  # still the parent's
    lease.close()


def test_a_child_makes_its_own_deadline_watcher_and_it_fires() -> None:
    """The deadline watcher's thread does not survive fork: a child forked while the parent's
    watcher holds its lock makes a watcher of its own, which still answers at a deadline."""
    from runnerkit.runner.deadlines import deadlines

    parent = deadlines()
    parent.watch(10**9, lambda: None).end()  # the parent's thread is running

    def work() -> None:
        import time

        own = deadlines()
        assert own is not parent
        fired = threading.Event()
        own.watch(time.monotonic() + 0.01, fired.set)
        assert fired.wait(DEADLINE_S)

    with held_by_a_thread(parent._lock):
        run_in_child(work)
