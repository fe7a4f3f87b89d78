"""WriterTurns: the writers of one SQLite file take turns across processes on an OFD lock.

Every check uses real processes (fork) and the real lock file; nothing is timed: a waiter's
order against the holder's release is what is asserted.
"""

from __future__ import annotations

import faulthandler
import fcntl
import multiprocessing
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from runnerkit.forge.db.sqlite import ForgeDB
from runnerkit.runner.ledger import Ledger
from runnerkit.service.filelocks import ofd_lock
from runnerkit.service.sqlite import WriterTurns

CTX = multiprocessing.get_context("fork")
#: Children forked from a fresh server process, not from this one: pytest's process runs
#: threads left by other tests, and a fork taken while one of them holds SQLite's global
#: mutex leaves the child's ``sqlite3.connect`` waiting for ever (seen in a full run).
FRESH = multiprocessing.get_context("forkserver")


def _hold_until_told(path: str, held: object, release: object, released_at: object) -> None:
    turns = WriterTurns(path)
    with turns.hold():
        held.set()  # type: ignore[attr-defined]
        release.wait(30)  # type: ignore[attr-defined]
        released_at.value = time.monotonic()  # type: ignore[attr-defined]


def _holder(path: str) -> tuple[multiprocessing.process.BaseProcess, object, object, object]:
    held, release = CTX.Event(), CTX.Event()
    released_at = CTX.Value("d", 0.0)
    child = CTX.Process(target=_hold_until_told, args=(path, held, release, released_at))
    child.start()
    assert held.wait(30), "the child never got the turn"
    return child, release, released_at, held


def _taken_elsewhere(path: str) -> bool:
    """Whether a writer's turn on ``path`` is held, seen from a descriptor of its own."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        return ofd_lock(fd, fcntl.F_WRLCK, 0, query=True) != fcntl.F_UNLCK
    finally:
        os.close(fd)


def _waits_for_the_holder(path: str, action: Callable[[], None], refusal: str) -> None:
    """``action`` run while another process holds the turn on ``path``: it must not finish
    before that process lets go, and must finish after."""
    child, release, released_at, _ = _holder(path)
    finished: list[float] = []

    def run() -> None:
        action()
        finished.append(time.monotonic())

    waiter = threading.Thread(target=run)
    waiter.start()
    waiter.join(0.3)
    assert waiter.is_alive(), refusal
    release.set()  # type: ignore[attr-defined]
    waiter.join(30)
    child.join(30)
    assert finished and finished[0] >= released_at.value > 0  # type: ignore[attr-defined]


def test_a_writer_waits_for_another_process_and_gets_the_turn_when_it_ends(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "db.writer.lock")

    def take() -> None:
        with WriterTurns(path).hold():
            pass

    _waits_for_the_holder(path, take, "the turn was given while another process held it")


def test_a_killed_holder_frees_the_turn(tmp_path: Path) -> None:
    path = str(tmp_path / "db.writer.lock")
    child, _release, _released_at, _ = _holder(path)
    assert _taken_elsewhere(path)
    assert child.pid is not None
    os.kill(child.pid, signal.SIGKILL)
    child.join(30)
    done = threading.Event()

    def take() -> None:
        with WriterTurns(path).hold():
            done.set()

    threading.Thread(target=take, daemon=True).start()
    assert done.wait(30), "a dead holder's turn was never freed"


def test_threads_of_one_process_take_turns_and_a_nested_turn_is_the_outer_one(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "db.writer.lock")
    turns = WriterTurns(path)
    inside = [0]
    most = [0]

    def work() -> None:
        for _ in range(200):
            with turns.hold():
                inside[0] += 1
                most[0] = max(most[0], inside[0])
                with turns.hold():  # nested: must not wait for itself
                    pass
                assert _taken_elsewhere(path), "the inner turn gave the file lock up"
                inside[0] -= 1

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert most[0] == 1
    assert not _taken_elsewhere(path)


def _child_takes_turn(path: str, turns: WriterTurns, got: object) -> None:
    with turns.hold():
        got.value = time.monotonic()  # type: ignore[attr-defined]


def test_a_forked_child_does_not_inherit_the_parents_turn(tmp_path: Path) -> None:
    path = str(tmp_path / "db.writer.lock")
    turns = WriterTurns(path)
    got = CTX.Value("d", 0.0)
    with turns.hold():
        # Forked while the parent holds the turn: the child must wait for it like anyone.
        child = CTX.Process(target=_child_takes_turn, args=(path, turns, got))
        child.start()
        child.join(0.3)
        assert child.is_alive() and got.value == 0.0
        released = time.monotonic()
    child.join(30)
    assert child.exitcode == 0
    assert got.value >= released


@pytest.mark.parametrize("store", ["ledger", "forge"])
def test_database_writes_wait_for_the_writers_turn(tmp_path: Path, store: str) -> None:
    """The runner's ledger and the forge's database both write in the writers' turn."""
    if store == "ledger":
        ledger = Ledger(str(tmp_path / "ledger.sqlite3"), retention_s=60)
        lock_path = str(tmp_path / "ledger.writer.lock")
        ledger.claim("0b6e7b83-6d46-4a8c-9b53-1f0f0f9e0f01")

        def write() -> None:
            ledger.complete("0b6e7b83-6d46-4a8c-9b53-1f0f0f9e0f01", 200, '{"success":true}')
            ledger.journal.flush()  # the answer's way into the file

    else:
        forge_db = ForgeDB(str(tmp_path / "forge.sqlite3"))
        lock_path = str(tmp_path / "forge.sqlite3.writer.lock")
        with forge_db.tx():
            pass  # the schema exists before the turn is taken elsewhere

        def write() -> None:
            with forge_db.tx() as conn:
                conn.execute("INSERT INTO meta (key, value) VALUES ('t', '1')")

    _waits_for_the_holder(lock_path, write, "the write did not wait for the writers' turn")


def _open_and_write(kind: str, path: str, start: object, errors: object) -> None:
    # A child that hangs shows where, in the test's output.
    faulthandler.dump_traceback_later(40, exit=True)
    start.wait(30)  # type: ignore[attr-defined]
    try:
        if kind == "forge":
            forge_db = ForgeDB(path)
            for _ in range(20):  # reads, as a starting forge's health checks make, and writes
                forge_db.ping()
                with forge_db.tx() as conn:
                    conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('k', '1')")
        else:
            ledger = Ledger(path, retention_s=60)
            job_id = str(uuid.uuid4())
            assert ledger.claim(job_id).outcome == "run"
            ledger.complete(job_id, 200, "{}")
    except Exception as exc:
        with errors.get_lock():  # type: ignore[attr-defined]
            errors.value += 1  # type: ignore[attr-defined]
        raise exc


@pytest.mark.parametrize("kind", ["ledger", "forge"])
def test_processes_opening_a_new_database_together_all_succeed(tmp_path: Path, kind: str) -> None:
    """Workers starting at once on a file that does not exist yet: switching it to WAL needs
    a lock SQLite's busy timeout does not wait for, so it is done in the writers' turn."""
    for round_ in range(5):
        path = str(tmp_path / f"{round_}" / f"{kind}.sqlite3")
        os.makedirs(os.path.dirname(path))
        start, errors = FRESH.Event(), FRESH.Value("i", 0)
        children = [
            FRESH.Process(target=_open_and_write, args=(kind, path, start, errors))
            for _ in range(6)
        ]
        for child in children:
            child.start()
        start.set()
        for child in children:
            child.join(60)
        assert errors.value == 0 and [c.exitcode for c in children] == [0] * 6
