"""The job path's SQLite statements that keep the GIL (runnerkit.service.sqlite_gil).

They must give what ``sqlite3`` gives, never wait (a lock sends the caller the ordinary
way), raise ``sqlite3``'s errors, keep the GIL for the whole call, leave checkpoints to the
owner, and work after fork; the ledger must fall back to ``sqlite3`` whenever they cannot.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from runnerkit.runner import journal, sqlitefile
from runnerkit.runner.ledger import Ledger
from runnerkit.runner.sqlitefile import CHECKPOINT_EVERY
from runnerkit.service import sqlite_gil
from runnerkit.service.sqlite_gil import Busy, GILStatements, open_gil_statements


def _wal_file(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE t (k TEXT PRIMARY KEY, i INTEGER, f REAL, b BLOB, n TEXT)")
    return conn


def counted(monkeypatch: pytest.MonkeyPatch, target: Any, name: str) -> list[int]:
    """Count the calls of ``target.name`` (the list grows by one per call)."""
    calls: list[int] = []
    original = getattr(target, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(target, name, wrapper)
    return calls


@pytest.fixture
def statements(tmp_path: Path) -> GILStatements:
    _wal_file(tmp_path / "t.sqlite3").close()
    gil = open_gil_statements(str(tmp_path / "t.sqlite3"))
    # This project's Python (Debian's and the official images') runs sqlite3 on a shared
    # libsqlite3: the fast path must be there, not silently off.
    assert gil is not None
    return gil


def test_values_go_in_and_come_out_as_sqlite3_gives_them(
    statements: GILStatements, tmp_path: Path
) -> None:
    row = ("ключ ✓", 2**62, 1.25, b"\x00\x01\xff", None)
    assert statements.execute("INSERT INTO t VALUES (?, ?, ?, ?, ?)", row) == 1
    assert statements.query_one("SELECT k, i, f, b, n FROM t WHERE k = ?", (row[0],)) == row
    with sqlite3.connect(tmp_path / "t.sqlite3") as conn:
        assert conn.execute("SELECT k, i, f, b, n FROM t").fetchone() == row
    assert statements.query_one("SELECT 1 FROM t WHERE k = ?", ("absent",)) is None
    assert statements.execute("UPDATE t SET i = i + 1 WHERE k = ?", ("absent",)) == 0
    assert statements.execute("UPDATE t SET i = 7 WHERE k = ?", (row[0],)) == 1


def test_the_connection_never_syncs_a_commit_nor_checkpoints_by_itself(
    statements: GILStatements,
) -> None:
    assert statements.query_one("PRAGMA synchronous") == (1,)  # NORMAL
    assert statements.query_one("PRAGMA wal_autocheckpoint") == (0,)


def test_a_statement_that_would_wait_for_a_lock_says_so_at_once(
    statements: GILStatements, tmp_path: Path
) -> None:
    other = sqlite3.connect(tmp_path / "t.sqlite3", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    started = time.monotonic()
    with pytest.raises(Busy):
        statements.execute("INSERT INTO t (k) VALUES (?)", ("x",))
    assert time.monotonic() - started < 1.0  # no busy handler: it did not wait
    other.execute("ROLLBACK")
    assert statements.execute("INSERT INTO t (k) VALUES (?)", ("x",)) == 1


def test_errors_are_sqlite3s_own(statements: GILStatements) -> None:
    statements.execute("INSERT INTO t (k) VALUES (?)", ("dup",))
    with pytest.raises(sqlite3.IntegrityError, match="UNIQUE"):
        statements.execute("INSERT INTO t (k) VALUES (?)", ("dup",))
    with pytest.raises(sqlite3.ProgrammingError):
        statements.execute("INSERT INTO t (k) VALUES (?)", (object(),))
    # A full disk: the file may not grow past its current pages.
    (pages,) = statements.query_one("PRAGMA page_count") or (0,)
    statements.query_one(f"PRAGMA max_page_count = {pages + 1}")
    with pytest.raises(sqlite3.OperationalError, match="full"):
        for index in range(100):
            statements.execute("INSERT INTO t (k, b) VALUES (?, ?)", (f"big{index}", b"x" * 3000))
    # The statement is usable again afterwards.
    assert statements.query_one("SELECT k FROM t WHERE k = ?", ("dup",)) == ("dup",)


_SLOW = (
    "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 6000000)"
    " SELECT COUNT(*) FROM c"
)


def _share_of_time_others_ran(call: Callable[[], object]) -> float:
    """How much of ``call``'s time another Python thread got to run, against its pace alone
    (about 1.0 when the call gives the GIL up throughout, 0 when it never does)."""
    ticks = [0]
    stop = threading.Event()

    def count() -> None:
        while not stop.is_set():
            ticks[0] += 1

    counter = threading.Thread(target=count)
    counter.start()
    try:
        before, started = ticks[0], time.monotonic()
        time.sleep(0.2)
        pace = (ticks[0] - before) / (time.monotonic() - started)
        before, started = ticks[0], time.monotonic()
        call()
        took, during = time.monotonic() - started, ticks[0] - before
    finally:
        stop.set()
        counter.join()
    assert took > 0.1  # many switch intervals (5 ms) long
    return during / (pace * took)


def test_a_call_keeps_the_gil_from_start_to_end(statements: GILStatements, tmp_path: Path) -> None:
    """While one long statement runs, another Python thread runs only around it (a switch
    interval or two), where through sqlite3 it runs throughout."""
    kept = _share_of_time_others_ran(lambda: statements.query_one(_SLOW))
    ordinary = sqlite3.connect(tmp_path / "t.sqlite3", check_same_thread=False)
    given_up = _share_of_time_others_ran(lambda: ordinary.execute(_SLOW).fetchone())
    assert kept < 0.2
    assert kept * 4 < given_up


def test_threads_never_share_a_statement(statements: GILStatements) -> None:
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            for index in range(300):
                key = f"{worker}-{index}"
                statements.execute("INSERT INTO t (k, i) VALUES (?, ?)", (key, index))
                assert statements.query_one("SELECT i FROM t WHERE k = ?", (key,)) == (index,)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert statements.query_one("SELECT COUNT(*) FROM t") == (2400,)


def test_a_forked_child_opens_its_own_connection(statements: GILStatements) -> None:
    statements.execute("INSERT INTO t (k) VALUES (?)", ("parent",))
    parents = statements._db
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child's outcome is its exit status
        try:
            ok = statements.query_one("SELECT k FROM t WHERE k = ?", ("parent",)) == ("parent",)
            statements.execute("INSERT INTO t (k) VALUES (?)", ("child",))
            os._exit(0 if ok and statements._db != parents else 1)
        except BaseException:  # noqa: BLE001 - the child reports by exit status
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert statements._db == parents
    assert statements.query_one("SELECT COUNT(*) FROM t") == (2,)


def test_no_fast_path_where_sqlite3_runs_on_no_shared_library(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sqlite_gil, "_loaded_library", lambda: None)
    assert sqlite_gil._library() is None


def direct_ledger(path: str, **options: Any) -> Ledger:
    """A ledger whose journal cannot be written, so each answer goes straight into the file
    (:meth:`Ledger.complete`'s fallback, and the path :meth:`Ledger.start` always takes):
    the write these tests are about."""
    ledger = Ledger(path, **options)

    def unwritable(record: Any) -> None:
        raise OSError(errno.ENOSPC, "the journal is not used in these tests")

    ledger.journal.append = unwritable  # type: ignore[method-assign]
    return ledger


def test_the_ledger_falls_back_to_sqlite3_while_another_writer_holds_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger = direct_ledger(str(tmp_path / "ledger.sqlite3"), retention_s=3600)
    assert ledger.claim("first").outcome == "run"
    ordinary = counted(monkeypatch, ledger, "_write")
    ledger.complete("first", 200, '{"success": true}')
    assert ordinary == []  # the fast path wrote it
    # Another writer holds SQLite's lock (not the writers' turn: only the file's own lock).
    other = sqlite3.connect(
        tmp_path / "ledger.sqlite3", isolation_level=None, check_same_thread=False
    )
    other.execute("BEGIN IMMEDIATE")
    threading.Timer(0.3, lambda: other.execute("COMMIT")).start()
    assert ledger.claim("second").outcome == "run"
    ledger.complete("second", 200, '{"success": true, "n": 2}')  # waits the ordinary way
    assert ordinary == [1]
    replay = ledger.claim("second")
    assert (replay.outcome, replay.body) == ("replay", {"success": True, "n": 2})


def test_the_ledger_checkpoints_what_the_fast_path_wrote(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    ledger = direct_ledger(str(path), retention_s=3600, max_entries=10**6)
    wal = Path(str(path) + "-wal")
    for index in range(CHECKPOINT_EVERY - 1):
        assert ledger.claim(f"job-{index}").outcome == "run"
        ledger.complete(f"job-{index}", 200, '{"success": true}')
    assert ledger._gil is not None and ledger._gil.written == CHECKPOINT_EVERY - 1
    assert wal.stat().st_size > 0
    ledger.claim("last")
    ledger.complete("last", 200, '{"success": true}')
    assert ledger._gil.written == 0
    with sqlite3.connect(path) as conn:
        (_, frames, done) = conn.execute("PRAGMA wal_checkpoint(NOOP)").fetchone() or (0, 0, 0)
    assert done == frames > 0  # every frame copied into the database
    assert wal.exists()
    assert ledger.claim("job-7").outcome == "replay"


@pytest.mark.parametrize("way", ["direct", "journal"])
def test_the_wal_is_started_over_while_other_writers_and_readers_keep_coming(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, way: str
) -> None:
    """Two processes' worth of writers (own connections, own turn descriptors) and a reader
    that is in the WAL most of the time: a checkpoint made only as far as readers allow never
    leaves the WAL wholly copied when the next write comes, so it would grow with every job."""
    # On a slow machine the reader may outstay one checkpoint's wait: the next checkpoint
    # must still try (the back-off after that has a test of its own).
    monkeypatch.setattr(sqlitefile, "RESTART_BACKOFF_S", 0.0)
    path = tmp_path / "ledger.sqlite3"
    wal = Path(str(path) + "-wal")
    if way == "direct":
        writers = [direct_ledger(str(path), retention_s=3600, max_entries=10**6) for _ in range(2)]
    else:  # answers folded from the journal, 4 at a time (the folding thread kept out)
        monkeypatch.setattr(journal, "FOLD_DELAY_S", 3600.0)
        writers = [Ledger(str(path), retention_s=3600, max_entries=10**6) for _ in range(2)]
    for index, ledger in enumerate(writers):
        ledger.claim(f"warm-{index}")
        ledger.complete(f"warm-{index}", 200, '{"success": true}')
        ledger.journal.flush()
    stop = threading.Event()

    def read() -> None:
        conn = sqlite3.connect(path, isolation_level=None)
        while not stop.is_set():
            conn.execute("BEGIN")
            conn.execute("SELECT COUNT(*) FROM jobs").fetchone()
            time.sleep(0.002)
            conn.execute("COMMIT")
            time.sleep(0.0002)
        conn.close()

    reader = threading.Thread(target=read)
    reader.start()
    body = '{"success": true, "data": {"text": "%s"}}' % ("x" * 200)
    sizes = []
    try:
        for index in range(8 * CHECKPOINT_EVERY):
            ledger = writers[index % 2]
            assert ledger.claim(f"job-{index}").outcome == "run"
            ledger.complete(f"job-{index}", 200, body)
            if way == "journal" and index % 4 >= 2:
                ledger.journal.flush()
            if index == 101:
                per_job = wal.stat().st_size / 102
            sizes.append(wal.stat().st_size)
    finally:
        stop.set()
        reader.join()
    # A checkpoint (each writer's, every CHECKPOINT_EVERY of its writes) starts the WAL over
    # once it holds RESTART_FRAMES: it never holds much more, where a WAL never started over
    # would hold every job.
    if way == "direct":
        assert max(sizes) < 3 * CHECKPOINT_EVERY * per_job
        assert sizes.count(0) >= 4
    else:  # a fold's commit may restart the WAL itself (it is then reused, not truncated)
        assert max(sizes) < 0.75 * len(sizes) * per_job
    assert writers[1].claim("job-0").outcome == "replay"


def test_a_reader_that_stays_is_waited_for_once_not_at_every_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader that keeps the WAL (a stopped process): the checkpoint that would start the
    WAL over waits for it once, then leaves the writers alone for RESTART_BACKOFF_S."""
    path = tmp_path / "ledger.sqlite3"
    ledger = direct_ledger(str(path), retention_s=3600)
    monkeypatch.setattr(sqlitefile, "RESTART_FRAMES", 0)
    ledger.claim("a")
    ledger.complete("a", 200, '{"success": true}')
    reader = sqlite3.connect(path, isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT COUNT(*) FROM jobs").fetchone()
    ledger.claim("b")
    ledger.complete("b", 200, '{"success": true}')  # a frame newer than the reader's view
    takes: list[int] = []
    take = ledger._writers.try_take
    monkeypatch.setattr(ledger._writers, "try_take", lambda: takes.append(1) or take())
    assert ledger._checkpoint()
    assert takes == [1]  # it tried to start the WAL over; the reader stayed
    assert ledger._restart_from > time.monotonic()
    assert ledger._checkpoint()
    assert takes == [1]  # not again while it backs off
    reader.execute("COMMIT")
    reader.close()
    monkeypatch.setattr(ledger, "_restart_from", 0.0)
    assert ledger._checkpoint()
    assert takes == [1, 1]
    assert Path(str(path) + "-wal").stat().st_size == 0
    assert ledger.claim("b").outcome == "replay"


def test_a_fast_write_waits_for_a_turn_held_elsewhere_without_holding_anything(
    tmp_path: Path,
) -> None:
    """Another process's writer holds the turn for a moment: the write waits in pauses,
    then goes the fast way; meanwhile this file's lock is free for the process's readers."""
    path = tmp_path / "ledger.sqlite3"
    ledger = direct_ledger(str(path), retention_s=3600)
    other = direct_ledger(str(path), retention_s=3600)
    ledger.claim("warm")
    ledger.complete("warm", 200, '{"success": true}')
    assert ledger._gil is not None
    fast_before = ledger._gil.written
    lock_free: list[bool] = []
    with other._writers.hold():

        def write() -> None:
            ledger.claim("job")
            ledger.complete("job", 200, '{"success": true}')

        writer = threading.Thread(target=write)
        writer.start()
        time.sleep(0.002)
        lock_free.append(ledger._lock.acquire(blocking=False))
        if lock_free[-1]:
            ledger._lock.release()
    writer.join()
    assert lock_free == [True]
    assert ledger._gil.written == fast_before + 1  # written the fast way once the turn was free
    assert ledger.claim("job").outcome == "replay"


def test_a_failed_checkpoint_does_not_fail_the_write_before_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    ledger = direct_ledger(str(tmp_path / "ledger.sqlite3"), retention_s=3600)
    assert ledger.claim("warm").outcome == "run"
    ledger.complete("warm", 200, '{"success": true}')
    assert ledger._gil is not None
    ledger._gil.written = CHECKPOINT_EVERY - 1

    def no_checkpoint() -> Any:
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(ledger, "_db", no_checkpoint)
    assert ledger.claim("job").outcome == "run"
    ledger.complete("job", 200, '{"success": true, "n": 1}')  # stored; the checkpoint failed
    assert "checkpoint failed" in caplog.text
    monkeypatch.undo()
    replay = ledger.claim("job")
    assert (replay.outcome, replay.body) == ("replay", {"success": True, "n": 1})


def test_a_transaction_stores_all_of_its_writes_or_none(
    statements: GILStatements, tmp_path: Path
) -> None:
    statements.transaction([("INSERT INTO t (k, i) VALUES (?, ?)", (f"k{n}", n)) for n in range(3)])
    with pytest.raises(sqlite3.IntegrityError):
        # The third write meets the first's key: the two before it go too.
        statements.transaction(
            [("INSERT INTO t (k, i) VALUES (?, ?)", (k, 9)) for k in ("a", "b", "k0")]
        )
    with sqlite3.connect(tmp_path / "t.sqlite3") as conn:
        assert conn.execute("SELECT k, i FROM t ORDER BY k").fetchall() == [
            ("k0", 0),
            ("k1", 1),
            ("k2", 2),
        ]
    # The connection is out of the failed transaction: the next one works.
    statements.transaction([("INSERT INTO t (k, i) VALUES (?, ?)", ("a", 1))])
    assert statements.query_one("SELECT i FROM t WHERE k = ?", ("a",)) == (1,)


def test_a_transaction_that_would_wait_says_so_and_leaves_nothing(
    statements: GILStatements, tmp_path: Path
) -> None:
    other = sqlite3.connect(tmp_path / "t.sqlite3", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    with pytest.raises(Busy):
        statements.transaction([("INSERT INTO t (k) VALUES (?)", ("x",))])
    other.execute("ROLLBACK")
    statements.transaction([("INSERT INTO t (k) VALUES (?)", ("x",))])
    assert statements.query_one("SELECT count(*) FROM t", ()) == (1,)


@pytest.mark.parametrize("obstacle", ["another writer", "another batch of this process"])
def test_a_fold_goes_the_ordinary_way_when_the_fast_one_would_wait(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, obstacle: str
) -> None:
    ledger = Ledger(str(tmp_path / "ledger.sqlite3"), retention_s=3600)
    ordinary = counted(monkeypatch, ledger, "_transaction")
    assert ledger.claim("first").outcome == "run"
    ledger.complete("first", 200, '{"success": true}')
    ledger.journal.flush()
    assert ordinary == []  # folded on the GIL-keeping connection
    if obstacle == "another writer":
        other = sqlite3.connect(
            tmp_path / "ledger.sqlite3", isolation_level=None, check_same_thread=False
        )
        other.execute("BEGIN IMMEDIATE")
        threading.Timer(0.3, lambda: other.execute("COMMIT")).start()
    else:
        ledger._batching.acquire()
    try:
        assert ledger.claim("second").outcome == "run"
        ledger.complete("second", 200, '{"success": true, "n": 2}')
        ledger.journal.flush()
    finally:
        if obstacle != "another writer":
            ledger._batching.release()
    assert ordinary == [1]
    for job_id, body in (("first", {"success": True}), ("second", {"success": True, "n": 2})):
        replay = ledger.claim(job_id)
        assert (replay.outcome, replay.body) == ("replay", body)
