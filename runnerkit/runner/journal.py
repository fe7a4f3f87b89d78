"""The ledger's writes on their way into SQLite: an append-only file per process (``Journal``).

A job's answer must be stored before it is sent: a redelivery is then replayed, never run
again. One SQLite write per job did that, and under load it was most of what a job cost
above bare Flask: the writers' turn taken and given back across processes, SQLite's own
locks, and the thread switches of every wait for them. Here a job's answer (and a signed
request's digest) is appended to this process's journal instead, one ``write`` that a
``SIGKILL`` cannot undo (it is in the page cache, as a WAL commit with
``synchronous=NORMAL`` is), and a thread folds the journal into SQLite a few milliseconds
later, every record since the last fold in one transaction.

What keeps this as safe as the write it replaces:

* A job's lock (:class:`~runnerkit.runner.locks.JobLocks`) is held until its answer is in
  SQLite, so a redelivery to any worker either waits for that or finds the answer there.
  A redelivery to this process folds at once (:meth:`Journal.flush`).
* The journal's owner holds a byte of the job locks' file for as long as it lives (its
  "life mark", named in the journal's file name), on the same open file as its job locks,
  so the kernel drops all of them at once when it dies. A process that dies with records
  not folded leaves them in its file: every claim, once it holds its job's lock, looks for
  such files (:meth:`Journal.fold_dead`, one ``fcntl`` per other worker) and folds them
  before it decides, so a dead worker's finished answers are replayed, not run again.
* Folding is idempotent: an answer is only written over an unfinished row of the same
  owner, a digest only inserted, so a file folded twice changes nothing.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import errno
import fcntl
import json
import logging
import os
import secrets
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from runnerkit.runner.directory_epoch import DirectoryEpoch
from runnerkit.runner.locks import LIFE_MARKS, JobLocks
from runnerkit.service import libc_calls
from runnerkit.service.afterfork import renew_after_fork
from runnerkit.service.filelocks import ofd_lock
from runnerkit.service.gil_locks import GILLock
from runnerkit.service.libc_calls import errno_error, keeping_gil
from runnerkit.service.process import keep_pid_current

log = logging.getLogger("runnerkit.state")

#: This process's id, kept current in forked children (a module global: read per job).
_PID = keep_pid_current(globals())

#: How long the folding thread gathers records after the first one before it folds them:
#: the longest a redelivery to another worker waits for a finished job's answer.
FOLD_DELAY_S = 0.005
#: After a fold that failed (a full disk), when the thread tries again.
FOLD_RETRY_S = 0.5
#: A journal larger than this is emptied at its next fold, appends waiting meanwhile.
TRUNCATE_AT = 1 << 20
#: How often the list of other processes' journals is read again though no process said it
#: changed (:class:`DirectoryEpoch`: a process of another version, a write that failed).
RESCAN_S = 1.0


_LIBC_FTRUNCATE = keeping_gil("ftruncate", [ctypes.c_int, ctypes.c_int64], ctypes.c_int)
#: A record appended to the journal, the GIL kept (:mod:`runnerkit.service.libc_calls`).
_WRITE = libc_calls.write


def _TRUNCATE(fd: int, length: int) -> None:
    """``os.ftruncate`` keeping the GIL: the journal is cut with its lock held, and appends
    that found the lock taken would wait while this thread waited for the GIL again."""
    if _LIBC_FTRUNCATE is None:  # pragma: no cover - not glibc/Linux
        os.ftruncate(fd, length)
    elif _LIBC_FTRUNCATE(fd, length) != 0:
        raise errno_error()


#: The byte of a journal file held while a dead owner's journal is folded, so two processes
#: never fold one file at once.
_FOLDING = 0

#: ``["answer", jobId, ownerPid, ownerStarted, httpStatus, responseJson, finished]`` or
#: ``["seen", jobId, digestHex, seen]``: a JSON array per line, the jobId second.
Record = list[Any]
Fold = Callable[[list[Record]], None]


class Journal:
    """This process's journal of ledger writes, folded into SQLite by ``fold`` (see the
    module docstring). A job's lock in ``locks`` is freed once its records are folded;
    ``failed`` hears of a fold that failed (readiness), and the records wait for the next;
    ``recovered`` of the first fold that succeeds after."""

    def __init__(
        self,
        directory: str,
        fold: Fold,
        locks: JobLocks,
        failed: Callable[[BaseException], None] | None = None,
        recovered: Callable[[], None] | None = None,
    ) -> None:
        self.directory = directory
        self._fold = fold
        self._locks = locks
        self.failed = failed
        self.recovered = recovered
        #: Folds done by this process (for tests and the curious).
        self.folds = 0
        #: Why the last fold failed, until one succeeds (None: the last one did).
        self.failure: BaseException | None = None
        #: This process's journal file and the other processes', open here: closed with
        #: this object (a journal left so looks dead, and the next claim folds it).
        self._own: dict[str, int] = {}
        self._others: dict[str, int] = {}
        self._epoch = DirectoryEpoch(directory)
        self.renew_after_fork()
        renew_after_fork(self)
        weakref.finalize(self, _close_all, self._own)
        weakref.finalize(self, _close_all, self._others)

    def renew_after_fork(self) -> None:
        """Nothing of the parent's is the child's: its file, records and thread stay behind.

        The child closes its copy of the parent's descriptor: the lock on byte 0 belongs to
        the open file, so a copy kept here would keep the parent looking alive after it died.
        """
        _close_all(self._own)
        _close_all(self._others)
        self._lock = GILLock()
        self._folding = threading.Lock()
        self._pid = 0
        self._fd = -1
        self._path = ""
        self._size = 0
        self._records: list[Record] = []
        #: Jobs with records not folded: how many, and whether the job is over (its lock is
        #: then freed by the fold that folds its last record).
        self._jobs: dict[str, list[Any]] = {}
        self._digests: set[str] = set()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        #: What the list of other journals was last read at: (the epoch's value, when).
        self._scanned: tuple[object, float] = (None, 0.0)

    # -- this process's records ---------------------------------------------------------

    def append(self, record: Record) -> None:
        """Write ``record`` for its job (whose lock this process holds, and keeps until the
        record is folded). Raises ``OSError`` when it cannot be written (a full disk): then
        nothing was appended, and the caller writes to SQLite itself."""
        line = (json.dumps(record, separators=(",", ":")) + "\n").encode()
        with self._lock:
            fd = self._fd if self._pid == _PID else self._open()
            try:
                written = _WRITE(fd, line)
                if written != len(line):
                    raise OSError(errno.ENOSPC, "short write to the ledger journal")
            except OSError:
                # Cut what may have been written, or the next record would be torn with it.
                with contextlib.suppress(OSError):
                    _TRUNCATE(fd, self._size)
                raise
            self._size += len(line)
            self._records.append(record)
            entry = self._jobs.setdefault(record[1], [0, False])
            entry[0] += 1
            if record[0] == "answer":
                entry[1] = True  # the job is over: its lock goes with its last record
            else:
                self._digests.add(record[2])
        if not self._wake.is_set():
            self._wake.set()

    def holds(self, job_id: str) -> bool:
        """Whether ``job_id`` has records here not folded yet (its lock is then still held)."""
        return self._pid == _PID and job_id in self._jobs

    def release(self, job_id: str) -> bool:
        """The job is over: True when its lock may be freed now, False when the fold of its
        last record frees it (its records must be in the file before anyone may claim it)."""
        if self._pid != _PID:
            return True
        with self._lock:
            entry = self._jobs.get(job_id)
            if entry is None:
                return True
            entry[1] = True
            return False

    def saw(self, digest_hex: str) -> bool:
        """Whether a signed request's digest is among this process's records not folded."""
        return self._pid == _PID and digest_hex in self._digests

    def flush(self) -> None:
        """Fold every record appended so far into SQLite, then free their jobs' locks.

        Raises what the fold raised (the records then stay for the next fold). A journal past
        :data:`TRUNCATE_AT` is emptied too, appends waiting for that fold.
        """
        if self._pid != _PID:
            return
        with self._folding:
            if self._size > TRUNCATE_AT:
                with self._lock:
                    self._fold_taken(emptying=True)
            else:
                self._fold_taken(emptying=False)

    def _fold_taken(self, emptying: bool) -> None:
        """Fold the records appended so far (the caller holds ``_folding``; ``emptying``:
        it holds ``_lock`` too, and the file is emptied once they are folded)."""
        lock = contextlib.nullcontext() if emptying else self._lock
        with lock:
            batch, self._records = self._records, []
        if not batch:
            return
        try:
            self._fold(batch)
        except BaseException:
            with lock:
                self._records[:0] = batch
            raise
        self.folds += 1
        done: list[str] = []
        with lock:
            for record in batch:
                entry = self._jobs[record[1]]
                entry[0] -= 1
                if entry[0] == 0:
                    del self._jobs[record[1]]
                    if entry[1]:  # else the job runs on, and frees its lock when over
                        done.append(record[1])
                if record[0] == "seen":
                    self._digests.discard(record[2])
            if emptying or not self._records:
                # Nothing in the file is unfolded: start it over (appends wait on the lock).
                with contextlib.suppress(OSError):
                    _TRUNCATE(self._fd, 0)
                    self._size = 0
        for job_id in done:
            self._locks.release(job_id)

    def _open(self) -> int:
        """This process's journal file, created on its first record (``_lock`` held)."""
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        mark = LIFE_MARKS + secrets.randbits(48)
        self._locks.hold_for_life(mark)
        path = os.path.join(self.directory, f"{_PID}-{mark:x}.journal")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            self._epoch.bump()  # before any record: a claim anywhere after it sees the file
        except OSError:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        self._fd, self._path, self._size, self._pid = fd, path, 0, _PID
        self._own["file"] = fd
        self._thread = threading.Thread(
            target=_fold_in_background,
            args=(weakref.ref(self), self._wake),
            name="runnerkit-journal",
            daemon=True,
        )
        self._thread.start()
        _OPEN.add(self)
        return fd

    def _fold_now(self) -> None:
        """The folding thread's fold; one that failed is tried again after a pause."""
        if not self.fold_or_fail():
            time.sleep(FOLD_RETRY_S)
            self._wake.set()

    def fold_or_fail(self) -> bool:
        """Fold now; False when that failed. A failure is logged and reported, and until a
        fold succeeds :attr:`failure` says why (the ledger refuses new jobs meanwhile, and
        each refused claim calls this: the first after space is back takes its job)."""
        try:
            self.flush()
        except Exception as exc:  # noqa: BLE001 - a full disk: the records wait
            if self.failure is None:
                log.error(
                    "ledger journal: %d records not folded into the ledger (%s); they are "
                    "tried again every %g s",
                    len(self._records),
                    exc,
                    FOLD_RETRY_S,
                )
            self.failure = exc
            if self.failed is not None:
                self.failed(exc)
            return False
        if self.failure is not None:
            log.info("ledger journal: folded into the ledger again")
            self.failure = None
            if self.recovered is not None:
                self.recovered()
        return True

    def close(self) -> None:
        """Fold what is left and remove the file (at exit; a file left is folded by others)."""
        with self._folding, self._lock:  # no fold or append meanwhile, nor after
            if self._pid != _PID or self._fd < 0:
                return
            try:
                self._fold_taken(emptying=True)
            except Exception as exc:  # noqa: BLE001 - at exit: the file stays for another to fold
                log.warning("ledger journal left for another worker to fold: %s", exc)
                return
            with contextlib.suppress(OSError):
                os.unlink(self._path)
                self._epoch.bump()
            _close_all(self._own)
            self._fd, self._pid = -1, 0

    # -- other processes' journals --------------------------------------------------------

    def fold_dead(self) -> None:
        """Fold the journal of any process that died with records in it; a claim calls this
        before it decides, so a dead worker's finished jobs are replayed, not run again."""
        others = self._other_journals()
        for name, fd in list(others.items()):
            if not self._locks.held_elsewhere(_life_mark(name)):
                self._fold_dead_file(name, fd)

    def _other_journals(self) -> dict[str, int]:
        """The other processes' journal files, each open here (read again when a process
        says the list changed, and every :data:`RESCAN_S`)."""
        now = time.monotonic()
        changed: object = self._epoch.read()
        if changed is None:  # not mapped: the directory's own modification time
            try:
                changed = os.stat(self.directory).st_mtime_ns
            except FileNotFoundError:
                return {}
        if changed != self._scanned[0] or now - self._scanned[1] > RESCAN_S:
            self._scanned = (changed, now)
            self._rescan()
        return self._others

    def _rescan(self) -> None:
        try:
            names = {n for n in os.listdir(self.directory) if n.endswith(".journal")}
        except FileNotFoundError:
            names = set()
        mine = os.path.basename(self._path) if self._pid == _PID else ""
        others = self._others
        for name in [name for name in others if name not in names]:
            with contextlib.suppress(OSError):
                os.close(others.pop(name))
        for name in names - set(others) - {mine}:
            with contextlib.suppress(FileNotFoundError):
                others[name] = os.open(os.path.join(self.directory, name), os.O_RDWR | os.O_CLOEXEC)

    def _fold_dead_file(self, name: str, fd: int) -> None:
        path = os.path.join(self.directory, name)
        ofd_lock(fd, fcntl.F_WRLCK, _FOLDING, wait=True)
        try:
            try:
                if os.stat(path).st_ino != os.fstat(fd).st_ino:
                    return
            except FileNotFoundError:
                return  # folded by another process while this one waited
            records = list(_read_records(fd))
            if records:
                self._fold(records)
            os.unlink(path)
            with contextlib.suppress(OSError):  # others drop the file within RESCAN_S anyway
                self._epoch.bump()
            log.info("ledger journal of a dead worker folded: %d records", len(records))
        finally:
            ofd_lock(fd, fcntl.F_UNLCK, _FOLDING)


#: This process's journals with a file, each closed at exit (:meth:`Journal.close`).
_OPEN: weakref.WeakSet[Journal] = weakref.WeakSet()


@atexit.register
def _close_every_journal() -> None:
    for journal in list(_OPEN):
        journal.close()


def _fold_in_background(ref: weakref.ref[Journal], wake: threading.Event) -> None:
    """The folding thread: gathers records for :data:`FOLD_DELAY_S`, then folds them. It
    holds its journal only while it folds, so a journal nobody uses any more can go."""
    while True:
        if not wake.wait(RESCAN_S):
            if ref() is None:
                return
            continue
        time.sleep(FOLD_DELAY_S)
        wake.clear()
        journal = ref()
        if journal is None:
            return
        journal._fold_now()
        del journal


def _life_mark(name: str) -> int:
    """The life mark a journal's file name carries (``<pid>-<mark in hex>.journal``)."""
    try:
        return int(name[: -len(".journal")].rpartition("-")[2], 16)
    except ValueError:
        return LIFE_MARKS  # never held: a stray file is folded and removed


def _close_all(descriptors: dict[str, int]) -> None:
    """Close and forget every descriptor of ``descriptors``."""
    while descriptors:
        _, fd = descriptors.popitem()
        with contextlib.suppress(OSError):
            os.close(fd)


def _read_records(fd: int) -> Any:
    """The records of a journal file; a torn or unreadable line is skipped."""
    os.lseek(fd, 0, os.SEEK_SET)
    data = b""
    while chunk := os.read(fd, 1 << 20):
        data += chunk
    for line in data.split(b"\n"):
        if not line:
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, list) and record and record[0] in ("answer", "seen"):
            yield record
