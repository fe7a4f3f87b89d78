"""The instance's SQLite file stays ONE file for every process, whoever closes it when.

A worker keeps two connections to ``ledger.sqlite3``: the ledger's and the outbox's. SQLite
in WAL mode keeps a SHARED POSIX lock on the file while a connection is open; a process that
closes its last connection and finds no such lock left believes itself the last user: it
checkpoints and deletes the ``-wal`` and ``-shm`` files. Closing any descriptor of a file
drops every POSIX lock the process holds on it, so opening the outbox's connection must not
open and close the file beside SQLite, or a worker loses its lock, and the first worker to
exit afterwards (a SIGHUP reload, a recycle) deletes the WAL under it: from then on it reads
and writes a WAL file no other process sees (a reload's new leader never delivered the other
workers' progress events).

Real processes (spawned, as gunicorn's workers start without the master's connections) and a
real file; nothing is timed.
"""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

from runnerkit.runner.jobforge import JobForgeClient
from runnerkit.runner.ledger import Ledger
from runnerkit.runner.outbox import Outbox
from tests.support.locks import lock_lines

CTX = multiprocessing.get_context("spawn")

#: Nothing listens there: rows stay in the outbox, nothing here delivers them.
FORGE = "http://127.0.0.1:9"


def _worker_stores(path: str) -> tuple[Ledger, Outbox]:
    """A worker's two users of the file, in the order a worker opens them."""
    ledger = Ledger(path, retention_s=60)
    ledger.queued()  # the ledger's connection first, as in a worker
    return ledger, Outbox(path, JobForgeClient(FORGE))


def _add_and_exit(path: str, n: int) -> None:
    """A worker that writes an outbox row and exits, closing its connections (the objects
    go with this frame: CPython closes their connections at once, as a worker's exit does)."""
    _ledger, outbox = _worker_stores(path)
    outbox.add("event", f"{FORGE}/jobs/j/events", {"n": n})


def _add_and_stay(path: str, n: int, added: object, seen: object, stop: object) -> None:
    """A worker that writes an outbox row, then reports how many rows it sees, and lives on."""
    _ledger, outbox = _worker_stores(path)
    outbox.add("event", f"{FORGE}/jobs/j/events", {"n": n})
    added.set()  # type: ignore[attr-defined]
    stop.wait(60)  # type: ignore[attr-defined]
    seen.value = outbox.pending()  # type: ignore[attr-defined]


def _posix_locks_of(pid: int, path: Path) -> list[list[str]]:
    return [p for p in lock_lines(path) if p[1] == "POSIX" and p[4] == str(pid)]


def test_a_worker_with_the_ledger_and_the_outbox_open_keeps_its_sqlite_lock(
    tmp_path: Path,
) -> None:
    path = tmp_path / "ledger.sqlite3"
    _ledger, outbox = _worker_stores(str(path))
    assert _posix_locks_of(os.getpid(), path), "the ledger's connection holds no lock"
    outbox.add("event", f"{FORGE}/jobs/j/events", {"n": 0})
    assert _posix_locks_of(os.getpid(), path), "opening the outbox dropped the ledger's lock"


def test_workers_see_each_others_outbox_rows_after_another_worker_exits(tmp_path: Path) -> None:
    path = str(tmp_path / "ledger.sqlite3")
    # This process plays the new leader: both connections open, one row of its own.
    _ledger, outbox = _worker_stores(path)
    outbox.add("event", f"{FORGE}/jobs/j/events", {"n": 0})

    # A worker that exits (a reload's old worker, a recycled one), then one that lives on.
    exiting = CTX.Process(target=_add_and_exit, args=(path, 1))
    exiting.start()
    exiting.join(60)
    assert exiting.exitcode == 0
    added, stop, seen = CTX.Event(), CTX.Event(), CTX.Value("i", -1)
    staying = CTX.Process(target=_add_and_stay, args=(path, 2, added, seen, stop))
    staying.start()
    try:
        assert added.wait(60), "the staying worker never wrote its row"
        assert outbox.pending() == 3, "the leader does not see every worker's rows"
    finally:
        stop.set()
        staying.join(60)
    assert staying.exitcode == 0
    assert seen.value == 3, "the staying worker does not see every worker's rows"
    assert os.path.exists(path + "-wal")  # the live workers' WAL, one for all


def test_past_its_cap_the_ledger_drops_its_oldest_answers_in_one_go(tmp_path: Path) -> None:
    ledger = Ledger(str(tmp_path / "ledger.sqlite3"), retention_s=3600, max_entries=50)
    jobs = [f"job-{n:03d}" for n in range(60)]
    for job_id in jobs:
        assert ledger.claim(job_id).outcome == "run"
        ledger.complete(job_id, 200, f'{{"success": true, "n": "{job_id}"}}')
        ledger.journal.flush()  # one answer at a time: "finished" follows the list
    assert ledger.size() == 60

    assert ledger.prune() == 15  # down to 90 % of the cap, not just to the cap
    assert ledger.size() == 45
    # The oldest went; the newest are still replayed.
    assert ledger.claim(jobs[14]).outcome == "run"
    ledger.release(jobs[14], recorded=False)
    replay = ledger.claim(jobs[15])
    assert (replay.outcome, replay.body) == ("replay", {"success": True, "n": jobs[15]})
    # Under the cap nothing more goes.
    assert ledger.prune() == 0
