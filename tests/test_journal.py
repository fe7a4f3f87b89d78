"""The ledger's journal: answers appended per process, folded into SQLite a few ms later.

Two :class:`Ledger` objects on one file stand for two workers: their job locks and journal
locks are open-file-description locks, which conflict between two descriptors of one process
as between two processes. A dead worker is a forked child that kills itself.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest

from runnerkit.runner import directory_epoch
from runnerkit.runner import journal as journal_module
from runnerkit.runner.ledger import Ledger
from runnerkit.runner.locks import JobLocks as LedgerLocks
from tests.support.waiting import wait_until

OK = json.dumps({"success": True, "data": {"n": 1}})
RETRYABLE = json.dumps({"success": False, "error": {"retryable": True}})


def ledger_at(tmp_path: Path) -> Ledger:
    return Ledger(str(tmp_path / "ledger.sqlite3"), retention_s=3600)


def journal_files(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "ledger.journal").glob("*.journal"))


def test_a_redelivery_to_another_worker_is_replayed_not_run(tmp_path: Path) -> None:
    first, second = ledger_at(tmp_path), ledger_at(tmp_path)
    assert first.claim("job").outcome == "run"
    first.complete("job", 200, OK)
    # At once: the answer is in the first worker's journal; the claim waits for its fold.
    claim = second.claim("job")
    assert (claim.outcome, claim.status, claim.body) == ("replay", 200, json.loads(OK))


def test_a_redelivery_to_the_same_worker_folds_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(journal_module, "FOLD_DELAY_S", 3600.0)  # the thread never folds
    ledger = ledger_at(tmp_path)
    assert ledger.claim("job").outcome == "run"
    ledger.complete("job", 200, OK)
    assert ledger.journal.holds("job")
    claim = ledger.claim("job")
    assert (claim.outcome, claim.body) == ("replay", json.loads(OK))
    assert not ledger.journal.holds("job")


def test_a_job_still_running_keeps_its_lock_when_its_digest_is_folded(tmp_path: Path) -> None:
    first, second = ledger_at(tmp_path), ledger_at(tmp_path)
    assert first.claim("job").outcome == "run"
    assert first.first_sight(b"\x01" * 32, "job") is True
    assert first.first_sight(b"\x01" * 32, "job") is False  # seen, though not folded yet
    wait_until(lambda: not first.journal.holds("job"), 5, "the digest's fold")
    assert second.claim("job").outcome == "running"  # the job has not ended
    assert second.first_sight(b"\x01" * 32, "other") is False  # the digest is in the file
    first.complete("job", 200, OK)
    assert second.claim("job").outcome == "replay"


def test_a_digest_keeps_a_given_back_claim_locked_until_it_is_folded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(journal_module, "FOLD_DELAY_S", 3600.0)
    first, second = ledger_at(tmp_path), ledger_at(tmp_path)
    assert first.claim("job").outcome == "run"
    first.first_sight(b"\x02" * 32, "job")
    first.release("job", recorded=False)  # e.g. refused after the digest was recorded
    assert first.running._mine, "the lock was freed before the digest reached the file"
    first.journal.flush()
    assert not first.running._mine
    assert second.claim("job").outcome == "run"
    assert second.first_sight(b"\x02" * 32, "job") is False


def test_a_signed_claim_looks_for_its_key_in_its_own_read(tmp_path: Path) -> None:
    first, second = ledger_at(tmp_path), ledger_at(tmp_path)
    key = (1).to_bytes(8, "big") + b"\x03" * 32
    claim = first.claim("job", signed=key)
    assert (claim.outcome, claim.signed_before) == ("run", False)
    assert first.first_sight(key, "job", claim.signed_before) is True
    first.release("job", recorded=claim.recorded)
    first.journal.flush()  # the key in the file, the job's lock free again
    claim = second.claim("job", signed=key)
    assert (claim.outcome, claim.signed_before) == ("run", True)
    assert second.first_sight(key, "job", claim.signed_before) is False
    second.release("job", recorded=claim.recorded)
    # A queued (asynchronous) claim writes its row, and is told the same.
    claim = second.claim("job", queued=True, capability="echo", signed=key)
    assert (claim.outcome, claim.recorded, claim.signed_before) == ("run", True, True)


def test_signed_keys_are_pruned_by_their_signed_time(tmp_path: Path) -> None:
    import time

    ledger = ledger_at(tmp_path)
    now_ms = int(time.time() * 1000)
    old = (now_ms - 2_000_000).to_bytes(8, "big") + b"\x04" * 32
    recent = now_ms.to_bytes(8, "big") + b"\x05" * 32
    legacy_old, legacy_recent = b"\xf0" * 32, b"\xf1" * 32  # an older runnerkit's digests
    ledger.probe()
    with sqlite3.connect(tmp_path / "ledger.sqlite3") as conn:
        conn.executemany(
            "INSERT INTO signed_requests (digest, seen) VALUES (?, ?)",
            [
                (old, time.time()),  # recorded just now, but signed too long ago to be valid
                (recent, time.time()),
                (legacy_old, time.time() - 2000),
                (legacy_recent, time.time()),
            ],
        )
    ledger.prune()
    with sqlite3.connect(tmp_path / "ledger.sqlite3") as conn:
        kept = {row[0] for row in conn.execute("SELECT digest FROM signed_requests")}
        indexes = {row[1] for row in conn.execute("PRAGMA index_list(signed_requests)")}
    assert kept == {recent, legacy_recent}
    assert "signed_requests_seen" not in indexes


def test_a_dead_workers_answers_are_folded_before_the_next_claim(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger = ledger_at(tmp_path)
    ledger.probe()  # the file exists before the fork
    monkeypatch.setattr(journal_module, "FOLD_DELAY_S", 3600.0)
    pid = os.fork()
    if pid == 0:  # the worker: runs two jobs, and is killed before its journal is folded
        try:
            worker = ledger_at(tmp_path)
            for job_id in ("done", "retry"):
                worker.claim(job_id)
            worker.complete("done", 200, OK)
            worker.complete("retry", 500, RETRYABLE)
        finally:
            os.kill(os.getpid(), signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    (left,) = journal_files(tmp_path)
    assert left.stat().st_size > 0  # the answers never reached the file
    claim = ledger.claim("done")
    assert (claim.outcome, claim.body) == ("replay", json.loads(OK))
    assert ledger.claim("retry").attempt == 2  # a new attempt, as after a stored failure
    assert journal_files(tmp_path) == [], "the dead worker's journal was not removed"


@pytest.mark.parametrize("mapped", [True, False], ids=["epoch", "epoch-not-mapped"])
def test_a_siblings_new_journal_is_seen_by_the_next_claim_without_a_look_at_the_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mapped: bool
) -> None:
    """A claim learns of a journal created since its last look through the 8 bytes its
    creator changed (a memory read): no ``stat`` of the directory, no periodic rescan. Where
    that file cannot be mapped, the directory's modification time says it instead."""
    if not mapped:
        monkeypatch.setattr(directory_epoch, "map_shared", lambda path, size: None)
    monkeypatch.setattr(journal_module, "FOLD_DELAY_S", 3600.0)
    monkeypatch.setattr(journal_module, "RESCAN_S", 3600.0)
    ledger = ledger_at(tmp_path)
    ledger.claim("mine")
    ledger.complete("mine", 200, OK)  # this worker's journal: the directory exists
    ledger.journal.flush()
    assert ledger.claim("before").outcome == "run"  # a look at the list: nobody else's
    ledger.release("before", recorded=False)
    pid = os.fork()
    if pid == 0:  # a sibling that starts, answers a job and dies before its fold
        try:
            worker = ledger_at(tmp_path)
            worker.claim("done")
            worker.complete("done", 200, OK)
        finally:
            os.kill(os.getpid(), signal.SIGKILL)
    os.waitpid(pid, 0)
    directory = os.path.realpath(ledger.journal.directory)
    looks: list[str] = []
    real_stat = os.stat

    def counting_stat(path: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(path, str) and os.path.realpath(path) == directory:
            looks.append(path)
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", counting_stat)
    claim = ledger.claim("done")
    assert (claim.outcome, claim.body) == ("replay", json.loads(OK))
    assert (looks == []) is mapped


def test_folding_a_journal_again_changes_no_later_answer(tmp_path: Path) -> None:
    ledger = ledger_at(tmp_path)
    pid, started = ledger._me
    ledger.claim("job")
    old = [["answer", "job", pid, started, 500, RETRYABLE, 1.0]]
    ledger._fold(old)
    ledger.running.release("job")
    assert ledger.claim("job").attempt == 2  # the row is the new attempt's now
    ledger._fold(old)  # e.g. a dead worker's journal read twice
    assert ledger.claim("job").outcome == "running"  # still the new attempt's, unanswered
    ledger.complete("job", 200, OK)
    ledger.journal.flush()
    ledger._fold(old)
    claim = ledger.claim("job")
    assert (claim.outcome, claim.body) == ("replay", json.loads(OK))


def test_the_journal_is_emptied_once_folded(tmp_path: Path) -> None:
    ledger = ledger_at(tmp_path)
    for index in range(20):
        ledger.claim(f"job-{index}")
        ledger.complete(f"job-{index}", 200, OK)
    (path,) = journal_files(tmp_path)
    wait_until(lambda: path.stat().st_size == 0, 5, "the journal emptied after its fold")
    assert ledger.size() == 20


def test_a_journal_that_keeps_growing_is_emptied_at_its_cap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under load a record arrives during every fold, so the file is never found empty."""
    monkeypatch.setattr(journal_module, "TRUNCATE_AT", 4096)
    monkeypatch.setattr(journal_module, "FOLD_DELAY_S", 3600.0)
    ledger = ledger_at(tmp_path)
    fold = ledger.journal._fold
    ended: list[threading.Thread] = []

    def fold_while_another_job_ends(records: Any) -> None:
        job = threading.Thread(target=ledger.complete, args=(f"next-{len(ended)}", 200, OK))
        ended.append(job)
        job.start()
        job.join(0.05)  # it appends now, or waits while the file is emptied
        fold(records)

    ledger.journal._fold = fold_while_another_job_ends
    for index in range(60):
        ledger.claim(f"job-{index}")
        ledger.claim(f"next-{index}")
        ledger.complete(f"job-{index}", 200, OK)
        ledger.journal.flush()
        ended[-1].join()
    (path,) = journal_files(tmp_path)
    assert path.stat().st_size < 2 * 4096


def test_an_unwritable_journal_stores_the_answer_in_the_file_at_once(tmp_path: Path) -> None:
    first, second = ledger_at(tmp_path), ledger_at(tmp_path)

    def full(record: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    first.journal.append = full  # type: ignore[method-assign]
    first.claim("job")
    first.complete("job", 200, OK)
    assert not first.running._mine  # freed at once: nothing waits in a journal
    assert second.claim("job").outcome == "replay"


def test_a_short_write_is_cut_so_the_next_record_is_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(journal_module, "FOLD_DELAY_S", 3600.0)
    ledger = ledger_at(tmp_path)
    ledger.claim("a")
    ledger.complete("a", 200, OK)

    write = journal_module._WRITE
    # A disk filling up: the write stops after 7 bytes.
    monkeypatch.setattr(journal_module, "_WRITE", lambda fd, data: write(fd, data[:7]))
    ledger.claim("b")
    ledger.complete("b", 200, OK)  # the short write: stored straight into the file
    monkeypatch.setattr(journal_module, "_WRITE", write)
    ledger.claim("c")
    ledger.complete("c", 200, OK)
    (path,) = journal_files(tmp_path)
    lines = path.read_bytes().splitlines()
    assert [json.loads(line)[1] for line in lines] == ["a", "c"]
    assert ledger.claim("b").outcome == "replay"


def test_a_fold_that_fails_keeps_answers_and_locks_until_it_succeeds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(journal_module, "FOLD_RETRY_S", 0.05)
    first, second = ledger_at(tmp_path), ledger_at(tmp_path)
    failures: list[BaseException] = []
    first.journal.failed = failures.append
    fold = first.journal._fold
    broken = threading.Event()
    broken.set()

    def failing(records: Any) -> None:
        if broken.is_set():
            raise OSError(errno.ENOSPC, "No space left on device")
        fold(records)

    first.journal._fold = failing
    first.claim("job")
    first.complete("job", 200, OK)
    wait_until(lambda: failures, 5, "the failed fold reported")
    assert second.claim("job").outcome == "running"  # neither run again nor lost
    with pytest.raises(sqlite3.OperationalError, match="cannot be written"):
        first.claim("new")  # no new job whose answer would wait with them
    assert not second.running.held_elsewhere(LedgerLocks.offset("new"))  # given back
    broken.clear()
    wait_until(lambda: not first.journal.holds("job"), 5, "the fold once space is back")
    assert first.journal.failure is None
    assert second.claim("job").outcome == "replay"
    assert first.claim("new").outcome == "run"


def test_a_forked_child_has_no_records_and_lets_its_parent_be_seen_dead(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The parent's job locks and life mark are on its descriptor of the job locks' file; a
    copy left open in a child would keep them held after the parent died."""
    monkeypatch.setattr(journal_module, "FOLD_DELAY_S", 3600.0)
    ledger = ledger_at(tmp_path)
    ledger.claim("job")
    ledger.complete("job", 200, OK)
    locks_file = str((tmp_path / "ledger.running.lock").resolve())
    (journal_file,) = [str(path.resolve()) for path in journal_files(tmp_path)]
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read)
            fds = os.listdir("/proc/self/fd")
            targets = {os.path.realpath(f"/proc/self/fd/{fd}") for fd in fds}
            inherited = sorted(targets & {locks_file, journal_file})
            os.write(write, json.dumps([ledger.journal.holds("job"), inherited]).encode())
        finally:
            os._exit(0)
    os.close(write)
    holds, inherited = json.loads(os.read(read, 1000))
    os.waitpid(pid, 0)
    assert holds is False and inherited == []


def test_the_journals_write_says_why_it_failed(tmp_path: Path) -> None:
    """The append keeps the GIL (libc's ``write`` through ``ctypes.PyDLL``); its failures are
    still ``OSError`` with the errno, which the ledger answers by writing to SQLite itself."""
    with pytest.raises(OSError) as failure:
        journal_module._WRITE(-1, b"x")
    assert failure.value.errno == errno.EBADF
    path = tmp_path / "f"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        assert journal_module._WRITE(fd, b"line\n") == 5
    finally:
        os.close(fd)
    assert path.read_bytes() == b"line\n"


def test_the_journals_truncate_cuts_and_says_why_it_failed(tmp_path: Path) -> None:
    """Cutting the journal (its lock held) keeps the GIL too; a failure is an ``OSError``."""
    with pytest.raises(OSError) as failure:
        journal_module._TRUNCATE(-1, 0)
    assert failure.value.errno == errno.EBADF
    path = tmp_path / "f"
    path.write_bytes(b"one\ntwo\n")
    fd = os.open(path, os.O_RDWR)
    try:
        journal_module._TRUNCATE(fd, 4)
    finally:
        os.close(fd)
    assert path.read_bytes() == b"one\n"
