"""Writes of a worker's threads to the ledger are committed in groups under load: each write
is stored when its call returns, each caller gets its own outcome, and a failed transaction
is every member's failure."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import uuid
from pathlib import Path
from typing import Any

from runnerkit.state import Ledger
from tests.support.waiting import wait_until

ANSWER = json.dumps({"jobId": "x", "success": True, "data": {}})


def _stored(path: Path, job_id: str) -> bool:
    with sqlite3.connect(path) as conn:
        row = conn.execute("SELECT state FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
    return row is not None and row[0] == "done"


def _blocked_group(ledger: Ledger, count: int, call: Any) -> tuple[list[Any], list[Any]]:
    """Run ``call(i)`` on ``count`` threads while the ledger's connection is held, so one
    thread waits inside its commit and the others queue behind it; then let them go."""
    results: list[Any] = [None] * count
    errors: list[Any] = [None] * count

    def run(index: int) -> None:
        try:
            results[index] = call(index)
        except Exception as exc:  # noqa: BLE001 - the test looks at it
            errors[index] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    with ledger._lock:  # the committing thread waits here, the others queue
        for thread in threads:
            thread.start()
        wait_until(
            lambda: len(ledger._group._pending) == count - 1,
            timeout=30,
            message=lambda: f"{len(ledger._group._pending)} writes queued",
        )
    for thread in threads:
        thread.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    return results, errors


def test_queued_answers_are_stored_together_and_each_caller_returns_once_its_is(
    tmp_path: Path,
) -> None:
    path = tmp_path / "ledger.sqlite3"
    ledger = Ledger(str(path), retention_s=3600)
    ledger.size()  # the connection (and the tables) exist before the threads start
    jobs = [str(uuid.uuid4()) for _ in range(8)]
    for job_id in jobs:
        assert ledger.claim(job_id).outcome == "run"
    in_transaction: list[bool] = []
    store = ledger._group.run

    def spy(op: Any) -> Any:
        def wrapped(conn: sqlite3.Connection) -> Any:
            in_transaction.append(conn.in_transaction)
            return op(conn)

        return store(wrapped)

    ledger._group.run = spy  # type: ignore[method-assign]

    def complete(index: int) -> bool:
        ledger.complete(jobs[index], 200, ANSWER)
        return _stored(path, jobs[index])  # stored by the time complete returns

    results, errors = _blocked_group(ledger, len(jobs), complete)

    assert errors == [None] * len(jobs)
    assert results == [True] * len(jobs)
    # The first commit was alone (autocommit); the seven queued meanwhile shared one.
    assert sorted(in_transaction) == [False] + [True] * 7, in_transaction
    for job_id in jobs:  # each job lock is free again: a redelivery is replayed
        assert ledger.claim(job_id).outcome == "replay"


def test_signed_request_records_in_one_group_keep_their_own_answers(tmp_path: Path) -> None:
    ledger = Ledger(str(tmp_path / "ledger.sqlite3"), retention_s=3600)
    ledger.size()
    digests = [hashlib.sha256(str(i % 4).encode()).digest() for i in range(8)]
    results, errors = _blocked_group(ledger, 8, lambda i: ledger.first_sight(digests[i]))
    assert errors == [None] * 8
    # Each of the four digests is new exactly once, whichever thread came first.
    firsts = {d: sum(r for r, dd in zip(results, digests, strict=True) if dd == d) for d in digests}
    assert set(firsts.values()) == {1}
    assert all(ledger.first_sight(d) is False for d in digests)


def test_a_failed_group_commit_is_every_members_failure(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    ledger = Ledger(str(path), retention_s=3600)
    ledger.size()
    jobs = [str(uuid.uuid4()) for _ in range(4)]

    def write(index: int) -> None:
        def op(conn: sqlite3.Connection) -> None:
            if index == 3:  # its statement fails, as on a full disk
                raise sqlite3.OperationalError("disk I/O error")
            conn.execute(
                "INSERT INTO jobs (job_id, state, created) VALUES (?, 'done', 0)", (jobs[index],)
            )

        ledger._group.run(op)

    _, errors = _blocked_group(ledger, 4, write)

    # Thread order decides who committed alone first; whoever shared the failing write's
    # group failed with it, and nothing of that group was stored.
    failed = [i for i, e in enumerate(errors) if e is not None]
    assert 3 in failed
    assert all(isinstance(errors[i], sqlite3.OperationalError) for i in failed)
    for index, job_id in enumerate(jobs):
        with sqlite3.connect(path) as conn:
            present = conn.execute("SELECT 1 FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        assert (present is None) == (index in failed), (index, failed)


def test_a_lone_write_is_stored_without_waiting(tmp_path: Path) -> None:
    ledger = Ledger(str(tmp_path / "ledger.sqlite3"), retention_s=3600)
    job_id = str(uuid.uuid4())
    assert ledger.claim(job_id).outcome == "run"
    ledger.complete(job_id, 200, ANSWER)
    assert _stored(tmp_path / "ledger.sqlite3", job_id)
    assert ledger._group._pending == [] and not ledger._group._leading
