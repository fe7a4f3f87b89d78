"""Per-instance state shared by the gunicorn workers of one runner.

gunicorn forks several workers that must act as ONE runner. They share a state directory:

* ``leader.lock`` and ``leader.lease`` — leadership (:class:`LeaderLease`): the leader holds
  an OFD lock on the byte of ``leader.lock`` numbered by its generation and renews the lease
  record at every tick; only it talks to JobForge. The kernel drops the lock when its holder
  dies, so another worker takes over at once; a holder that stalls (SIGSTOP, a paused
  process) keeps its lock but its lease expires, and another worker takes over as the next
  generation. (The sentinel and the master's exit hook take turns with an ``flock`` on
  ``leader.lock``, which OFD locks do not meet.)
* ``identity.json`` — the runnerId JobForge assigned, so a new leader heartbeats as the same
  runner instead of registering again.
* ``slots/<capability>.lock`` — one byte per concurrency slot, held with an open-file-
  description lock (``F_OFD_SETLK``) for as long as a job's code runs. A SIGKILLed worker's
  locks vanish with it, so a crash cannot leak capacity, and any process can count the held
  bytes (``F_OFD_GETLK``) without taking them.
* ``ledger.running.lock`` — one OFD lock per running job, at an offset hashed from its
  jobId: a duplicate delivery to any worker finds it held; a dead worker's locks vanish.
* ``ledger.sqlite3`` — the idempotency ledger (SQLite, WAL): the stored answer of each
  finished job, and the asynchronous jobs accepted, queued or running, and where.
  The result outbox keeps its table in the same file.
* ``ledger.writer.lock`` — the writers' turn of that file (:class:`WriterTurns`): a worker
  about to write waits on it in the kernel rather than in SQLite's busy handler, which
  sleeps milliseconds at a time.
* ``ledger.identity.json`` — which file (device, inode) the running instance's ledger is
  (:class:`LedgerIdentity`): a worker never silently starts a second, empty ledger.
* ``state.unwritable`` — present while a worker could not write the state (disk full, I/O
  error): every worker's readiness reports it (:class:`StorageHealth`).

The directory is this user's alone (0700, :func:`secure_directory`), its files 0600.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import logging
import os
import pwd
import random
import sqlite3
import stat
import struct
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from runnerkit.service.process import process_alive, process_start_time
from runnerkit.service.settings import ConfigError

log = logging.getLogger("runnerkit.state")


# -- fork ---------------------------------------------------------------------------------


class _Renewable(Protocol):
    def renew_after_fork(self) -> None: ...


#: Objects whose locks (and connections) a forked child makes anew (:func:`renew_after_fork`).
_RENEWABLE: weakref.WeakSet[_Renewable] = weakref.WeakSet()
#: SQLite connections a forked child inherited. Never closed there: closing one in a child
#: could checkpoint and delete the WAL under the parent (SQLite: no connection across fork).
_INHERITED: list[sqlite3.Connection] = []


def renew_after_fork(obj: _Renewable) -> None:
    """Have ``obj.renew_after_fork()`` called in every child forked from this process.

    A lock held by another thread at the moment of ``fork`` stays held for ever in the child,
    where that thread does not exist: the app imported in a gunicorn master (``--preload``),
    or a worker forking an isolated job while housekeeping holds the ledger's lock, would
    deadlock on its first use. Descriptors (and the OFD locks on them) and SQLite connections
    are the parent's too: each class's ``renew_after_fork`` drops them, so the child opens
    its own on first use.
    """
    _RENEWABLE.add(obj)


def _renew_in_child() -> None:
    for obj in list(_RENEWABLE):
        obj.renew_after_fork()


os.register_at_fork(after_in_child=_renew_in_child)


class LedgerReplaced(Exception):
    """The ledger file of the running instance was deleted or replaced under it.

    Running jobs against a fresh, empty ledger would run finished jobs a second time, so
    the instance refuses new jobs instead (503 ``LEDGER_REPLACED``) until it is restarted.
    """


#: What a failing state directory raises: SQLite's errors (disk full, I/O, locked for too
#: long), the operating system's (lock and json files), and a replaced ledger.
STORAGE_ERRORS: tuple[type[BaseException], ...] = (sqlite3.Error, OSError, LedgerReplaced)


def _owner_name(uid: int) -> str:
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def secure_directory(path: str) -> None:
    """Make sure ``path`` is a directory of this user's that nobody else may write to.

    A missing one is created 0700 (its missing parents with the default mode). An existing
    one owned by another user, or writable by group or others, is refused with a
    :class:`ConfigError`: whoever controls it could read stored results, plant a ledger that
    replays answers of their own, or hold the locks. One of this user's that others may
    read or enter is narrowed to 0700.
    """
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        os.makedirs(parent, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    st = os.stat(path)
    mode = stat.S_IMODE(st.st_mode)
    me = os.geteuid()
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"The runner's state directory {path} is not a directory")
    if st.st_uid != me:
        raise ConfigError(
            f"The runner's state directory {path} is owned by {_owner_name(st.st_uid)} "
            f"(mode {mode:04o}), not by this user ({_owner_name(me)}): another user could "
            "read its stored results or plant state. Remove it, or set RUNNERKIT_STATE_DIR "
            "to a directory of your own."
        )
    if mode & 0o022:
        who = "others" if mode & 0o002 else "its group"
        raise ConfigError(
            f"The runner's state directory {path} (owned by {_owner_name(st.st_uid)}) is "
            f"writable by {who} (mode {mode:04o}): anyone who may write there could plant "
            f"state or read stored results. Run "
            f"'chmod 700 {path}' or remove it, or set RUNNERKIT_STATE_DIR to a private one."
        )
    if mode & 0o077:
        os.chmod(path, 0o700)


def private_file(path: str) -> None:
    """Create ``path`` (empty) 0600 if it is missing, or narrow it to 0600 if it exists.

    SQLite creates a database with the umask's mode (0644 as a rule) and gives its -wal and
    -shm files the main file's mode, so a ledger made here first stays private.

    An existing file is never opened here: closing any descriptor of a file drops every POSIX
    lock the process holds on it, SQLite's included. A second SQLite connection of the process
    to the same file (the outbox beside the ledger) would silently cost the first one its
    SHARED lock, and the next process to close its last connection would then think itself
    the last one, checkpoint and delete the -wal and -shm files under it: from then on that
    process wrote to and read from a WAL file no one else sees (a reload's new leader never
    saw the other workers' outbox rows). Only a file this call creates, on which no process
    can hold a lock yet, is opened and closed.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        if stat.S_IMODE(os.stat(path).st_mode) & 0o077:
            os.chmod(path, 0o600)
    else:
        os.close(fd)
    for suffix in ("-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            if stat.S_IMODE(os.stat(path + suffix).st_mode) & 0o077:
                os.chmod(path + suffix, 0o600)


#: This process's id, kept current across fork: ``os.getpid()`` is a system call, and the
#: job path asks several times per job whether a descriptor or connection is this process's.
_PID = os.getpid()


def _note_pid() -> None:
    global _PID
    _PID = os.getpid()


os.register_at_fork(after_in_child=_note_pid)


_FLOCK_STRUCT = "hhqqi"
_FLOCK_PAD = b"\0" * 8


class _Flock(ctypes.Structure):
    """``struct flock`` (Linux)."""

    _fields_ = [
        ("l_type", ctypes.c_short),
        ("l_whence", ctypes.c_short),
        ("l_start", ctypes.c_int64),
        ("l_len", ctypes.c_int64),
        ("l_pid", ctypes.c_int),
    ]


def _gil_holding_fcntl() -> Any:
    """libc's ``fcntl`` called *without* releasing the GIL (``ctypes.PyDLL``), or None.

    A lock call that never waits is one short system call, and releasing the GIL around it
    costs more than the call: under load another thread takes the GIL meanwhile, and this
    one must wait for it again (two context switches). The job path makes several such
    calls per job (job lock, slot, writers' turn), so they keep the GIL.
    """
    try:
        call = ctypes.PyDLL(None, use_errno=True).fcntl
    except (OSError, AttributeError):  # pragma: no cover - not glibc/Linux
        return None
    call.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
    call.restype = ctypes.c_int
    return call


_FCNTL = _gil_holding_fcntl()


def _ofd_lock(fd: int, kind: int, offset: int, *, query: bool = False, wait: bool = False) -> int:
    """One OFD byte-range lock call on byte ``offset``; returns the resulting ``l_type``.

    ``wait`` blocks until the lock is granted (the GIL is released meanwhile); a call that
    does not wait keeps the GIL (:func:`_gil_holding_fcntl`). A refused lock raises
    ``OSError`` (``EAGAIN``/``EACCES``) either way.
    """
    command = fcntl.F_OFD_GETLK if query else fcntl.F_OFD_SETLKW if wait else fcntl.F_OFD_SETLK
    if wait or _FCNTL is None:
        packed = struct.pack(_FLOCK_STRUCT, kind, os.SEEK_SET, offset, 1, 0) + _FLOCK_PAD
        result = fcntl.fcntl(fd, command, packed)
        return int(struct.unpack(_FLOCK_STRUCT, result[: struct.calcsize(_FLOCK_STRUCT)])[0])
    lock = _Flock(kind, os.SEEK_SET, offset, 1, 0)
    if _FCNTL(fd, command, ctypes.byref(lock)) == -1:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return int(lock.l_type)


def write_json_atomic(path: str, data: dict[str, Any]) -> None:
    """Replace ``path`` with ``data`` so a reader never sees half a file."""
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class WriteFailures:
    """Writes to this process's files that failed and have not succeeded since.

    A full disk (ENOSPC), an I/O error or a read-only directory must not stop a worker: the
    write that failed is noted here and tried again later, the worker serves on, and
    readiness answers 503 naming what failed (``Runner``'s "storage" check) until it works.
    Process-wide, as the disk is.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._failing: dict[str, str] = {}
        renew_after_fork(self)

    def renew_after_fork(self) -> None:
        self._lock = threading.Lock()

    def failed(self, what: str, exc: BaseException) -> bool:
        """Note that ``what`` could not be written; True when it was not failing before."""
        with self._lock:
            new = what not in self._failing
            self._failing[what] = f"{type(exc).__name__}: {exc}"[:200]
        return new

    def recovered(self, what: str) -> None:
        if what in self._failing:
            with self._lock:
                if self._failing.pop(what, None) is not None:
                    log.warning("%s is written again", what)

    def problems(self) -> dict[str, str]:
        with self._lock:
            return dict(self._failing)


#: The process's failed writes of its own files (see :class:`WriteFailures`); the ledger's
#: are the instance's :class:`StorageHealth`.
STORAGE = WriteFailures()


def read_json(path: str) -> dict[str, Any] | None:
    try:
        with open(path) as handle:
            value = json.load(handle)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


class FileLock:
    """A non-blocking ``flock`` held by this process until released or the process dies."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None
        self._pid = 0

    @property
    def held(self) -> bool:
        return self._fd is not None and self._pid == os.getpid()

    def acquire(self, blocking: bool = False, timeout: float | None = None) -> bool:
        if self.held:
            return True
        # A descriptor inherited across fork shares the parent's lock: never reuse it.
        self._fd = None
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise
                if not blocking or (deadline is not None and time.monotonic() >= deadline):
                    os.close(fd)
                    return False
                time.sleep(0.05)
                continue
            self._fd, self._pid = fd, os.getpid()
            return True

    def release(self) -> None:
        if self.held and self._fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
        self._fd = None


#: A leader's lease expires after this many heartbeat intervals without a renewal ...
LEASE_INTERVALS = 1.5
#: ... and never sooner than this (a busy machine may delay a renewal a little).
LEASE_MIN_S = 2.0


def lease_expiry_s(heartbeat_interval_ms: float) -> float:
    """How long a leader's lease lasts without renewal, for a heartbeat interval.

    Below two intervals on purpose: a follower heartbeats at most one interval plus the
    lease after the stalled leader's last heartbeat, which must stay under the three missed
    intervals after which JobForge calls a runner offline.
    """
    return max(LEASE_MIN_S, LEASE_INTERVALS * heartbeat_interval_ms / 1000.0)


class LeaderLease:
    """Leadership of one instance, which a holder that stalls loses.

    A kernel lock alone is freed only when its holder dies; a holder that is stopped
    (SIGSTOP, a debugger, a paused cgroup) keeps it for ever and nobody heartbeats. So the
    leader of generation ``g`` holds an open-file-description lock on byte ``g`` of
    ``leader.lock`` *and* renews the lease record ``leader.lease``
    (``{"generation", "pid", "renewed"}``) at every tick, ``renewed`` being
    ``time.monotonic()``: CLOCK_MONOTONIC is one clock for every process of the machine and
    does not jump with the wall clock. A worker that finds byte ``g`` free takes it (the
    leader died or let go); one that finds it held but the lease older than ``expiry_s``
    takes byte ``g + 1`` and writes generation ``g + 1``: the stalled holder still has its
    lock, but the record no longer names it. A held byte whose record names no live process
    belongs to a worker that has just taken it and not yet written the record: it gets a
    lease's time to do so, or two workers starting together would both lead. The leader
    reads the record before each action (:meth:`acquire`, :meth:`check`, :meth:`renew`) and
    steps down, releasing its lock, as soon as another generation is named. Two workers
    racing for one generation meet on its byte's lock; a renewal racing a takeover leaves
    one of the two named, and the other steps down at its next look. No mutex is held
    across a write, so a holder stopped at any instant cannot block the others.
    """

    def __init__(self, directory: str, expiry_s: float = LEASE_MIN_S) -> None:
        self.lock_path = os.path.join(directory, "leader.lock")
        self.record_path = os.path.join(directory, "leader.lease")
        self.expiry_s = expiry_s
        self._guard = threading.RLock()
        self._fd = -1
        self._pid = 0
        self._generation: int | None = None
        #: The held-but-unrecorded lease this process first saw, and when (see acquire).
        self._newcomer: tuple[tuple[int, float, int], float] | None = None
        renew_after_fork(self)

    def renew_after_fork(self) -> None:
        """The parent's descriptor (and its lock) stay the parent's: the child opens its own."""
        self._guard = threading.RLock()
        self._fd, self._pid, self._generation = -1, 0, None
        self._newcomer = None

    @property
    def held(self) -> bool:
        """Whether this process holds leadership (as far as it knows, see :meth:`check`)."""
        return self._generation is not None and self._pid == os.getpid()

    @property
    def generation(self) -> int | None:
        return self._generation if self.held else None

    def _descriptor(self) -> int:
        if self._pid != os.getpid():
            # After fork the descriptor, and the locks on it, belong to the parent.
            self._fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            self._pid, self._generation = os.getpid(), None
        return self._fd

    def record(self) -> tuple[int, float, int]:
        """The lease record: (generation, renewed, pid); (0, 0.0, 0) when there is none."""
        record = read_json(self.record_path) or {}
        generation, renewed, pid = (record.get(k) for k in ("generation", "renewed", "pid"))
        return (
            generation if isinstance(generation, int) and generation >= 0 else 0,
            float(renewed) if isinstance(renewed, int | float) else 0.0,
            pid if isinstance(pid, int) else 0,
        )

    def _write(self, generation: int) -> None:
        write_json_atomic(
            self.record_path,
            {"generation": generation, "pid": os.getpid(), "renewed": time.monotonic()},
        )
        STORAGE.recovered("leader.lease")  # a failure noted by _try_write is over

    def _try_write(self, generation: int) -> bool:
        """:meth:`_write`, a failure noted (:data:`STORAGE`) instead of raised."""
        try:
            self._write(generation)
        except OSError as exc:
            if STORAGE.failed("leader.lease", exc):
                log.warning("cannot write %s (%s)", self.record_path, exc)
            return False
        return True

    def _lock(self, generation: int) -> bool:
        try:
            _ofd_lock(self._descriptor(), fcntl.F_WRLCK, generation)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                return False
            raise
        return True

    def acquire(self, *, force: bool = False) -> bool:
        """Keep or take leadership now (never blocks); whether this process leads.

        ``force`` takes over from a live holder whatever its lease says (deregistration,
        once its wait for the holder is over).
        """
        with self._guard:
            self._descriptor()
            generation, renewed, pid = self.record()
            if self.held:
                if generation == self._generation:
                    return True
                self._step_down(generation)
                return False
            if self._lock(generation):
                # Nobody holds it: the first leader, or the last one died or let go. The
                # record already names this generation, so a write that fails (a full disk)
                # only leaves the lease to expire, and then another worker takes over.
                self._generation = generation
                self._try_write(generation)
                return True
            now = time.monotonic()
            age = now - renewed
            if not force and 0.0 <= age <= self.expiry_s:
                # A live leader renewed the record since: it can be written again, so a
                # takeover this process could not record (a full disk) is no longer a
                # problem of its storage (readiness would stay 503 until it led).
                if pid != os.getpid():
                    STORAGE.recovered("leader.lease")
                return False
            if not force and not (pid > 0 and process_alive(pid, None)):
                # Byte g is held, but the record names no live process (none at all on a
                # new instance, or a leader that died): another worker has just taken the
                # byte and not yet written the record. Taking g + 1 now would make a second
                # leader, with a registration of its own; the newcomer gets a lease's time
                # to write its record before it counts as stalled.
                seen = (generation, renewed, pid)
                if self._newcomer is None or self._newcomer[0] != seen:
                    self._newcomer = (seen, now)
                if now - self._newcomer[1] <= self.expiry_s:
                    return False
            successor = generation + 1
            if not self._lock(successor):
                return False  # another worker is taking over right now
            if not self._try_write(successor):
                # Unrecorded, the stalled holder would never learn it was replaced.
                with contextlib.suppress(OSError):
                    _ofd_lock(self._fd, fcntl.F_UNLCK, successor)
                return False
            self._generation = successor
            log.warning(
                "the leader (pid %d) has not renewed its lease for %.1f s; this process "
                "takes over as generation %d",
                pid,
                age,
                successor,
            )
            return True

    def check(self) -> bool:
        """Whether this process still leads: the record names its generation.

        A leader that was stalled and replaced finds another generation named and steps down
        here, before it heartbeats, registers or delivers anything.
        """
        with self._guard:
            if not self.held:
                return False
            generation, _, _ = self.record()
            if generation != self._generation:
                self._step_down(generation)
                return False
            return True

    def renew(self) -> bool:
        """Renew the lease (the leader, at every tick); False once this process does not lead."""
        with self._guard:
            if not self.check():
                return False
            assert self._generation is not None
            self._write(self._generation)  # clears a noted failure (see _write)
            return True

    def _step_down(self, generation: int) -> None:
        log.warning(
            "this process led as generation %d but was stalled and replaced by generation %d; "
            "it steps down",
            self._generation,
            generation,
        )
        self.release()

    def release(self) -> None:
        """Give leadership up (the record stays: the next worker takes the same generation)."""
        with self._guard:
            if self.held and self._generation is not None:
                with contextlib.suppress(OSError):
                    _ofd_lock(self._fd, fcntl.F_UNLCK, self._generation)
            self._generation = None

    def close(self) -> None:
        """Give leadership up and close the lock file (a process that is done with it)."""
        with self._guard:
            self.release()
            if self._pid == os.getpid() and self._fd >= 0:
                os.close(self._fd)
            self._fd, self._pid = -1, 0


class WriterTurns:
    """Turns for the writers of one SQLite file, across processes: a blocking OFD lock.

    A writer that finds the file locked by another process is put to sleep by SQLite's busy
    handler (1, 2, 5, 10, 15, 20, 25 ms … between tries), however soon the lock frees up.
    Under a steady stream of writes from several workers those sleeps, not the writes, set
    the pace. Writers queue here first instead: a blocked ``F_OFD_SETLKW`` wakes the moment
    the holder lets go, and the kernel drops the lock of a holder that dies.

    Threads of one process take turns on a re-entrant lock before that (an OFD lock belongs
    to the descriptor, which every thread of the process shares); a nested turn is the outer
    one. Both are made anew after fork: a parent's thread may have held them.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._guard = threading.Lock()
        self._pid = 0
        self._fd = -1
        self._turn = threading.RLock()
        self._depth = 0
        renew_after_fork(self)

    def renew_after_fork(self) -> None:
        self._guard = threading.Lock()
        self._turn, self._depth = threading.RLock(), 0
        self._fd, self._pid = -1, 0

    def _current(self) -> tuple[threading.RLock, int]:
        with self._guard:
            if self._pid != _PID:
                self._turn, self._depth = threading.RLock(), 0
                os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                self._pid = _PID
            return self._turn, self._fd

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Wait for this process's, then the file's, turn; hold both inside the block."""
        turn, fd = self._current()
        with turn:
            outer = self._depth == 0
            if outer:
                try:
                    # Mostly free: taken without giving up the GIL; else wait for it.
                    _ofd_lock(fd, fcntl.F_WRLCK, 0)
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN, errno.EACCES):
                        raise
                    _ofd_lock(fd, fcntl.F_WRLCK, 0, wait=True)
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if outer:
                    _ofd_lock(fd, fcntl.F_UNLCK, 0)


def prepare_wal(
    conn: sqlite3.Connection,
    writers: WriterTurns,
    setup: Callable[[sqlite3.Connection], None],
) -> None:
    """Put a new connection's file in WAL mode, then run ``setup`` (tables, pragmas).

    In the writers' turn, so processes opening a new file together do it one at a time.
    Switching to WAL also needs every reader gone, a lock SQLite's busy timeout does not wait
    for: a worker that meets another's read retries here a moment.
    """
    with writers.hold():
        for attempt in range(100):
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
                setup(conn)
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or attempt == 99:
                    raise
                time.sleep(0.02)


@dataclass
class Slot:
    """A held concurrency slot; give it back with :meth:`SlotTable.release`."""

    capability_id: str
    index: int


class SlotTable:
    """maxConcurrency per capability, enforced across every process of the instance."""

    def __init__(self, directory: str, limits: dict[str, int]) -> None:
        self.directory = directory
        self.limits = dict(limits)
        self._lock = threading.Lock()
        self._pid = 0
        self._hold: dict[str, int] = {}
        self._query: dict[str, int] = {}
        self._held: dict[str, set[int]] = {}
        renew_after_fork(self)

    def renew_after_fork(self) -> None:
        """No slot is the child's: its parent's descriptors and locks stay the parent's."""
        self._lock = threading.Lock()
        self._pid, self._hold, self._query, self._held = 0, {}, {}, {}

    def _fds(self, capability_id: str) -> tuple[int, int]:
        if self._pid != _PID:
            # After fork the descriptors (and the locks on them) belong to the parent.
            self._hold, self._query, self._held = {}, {}, {}
            self._pid = _PID
        if capability_id not in self._hold:
            path = os.path.join(self.directory, f"{capability_id}.lock")
            flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
            self._hold[capability_id] = os.open(path, flags, 0o600)
            self._query[capability_id] = os.open(path, flags, 0o600)
            self._held[capability_id] = set()
        return self._hold[capability_id], self._query[capability_id]

    def acquire(self, capability_id: str) -> Slot | None:
        """Take a free slot, or None when every slot is held somewhere in the instance."""
        limit = self.limits[capability_id]
        with self._lock:
            hold, _ = self._fds(capability_id)
            mine = self._held[capability_id]
            start = random.randrange(limit)
            for step in range(limit):
                index = (start + step) % limit
                if index in mine:
                    continue
                try:
                    _ofd_lock(hold, fcntl.F_WRLCK, index)
                except OSError as exc:
                    if exc.errno in (errno.EAGAIN, errno.EACCES):
                        continue
                    raise
                mine.add(index)
                return Slot(capability_id, index)
        return None

    def release(self, slot: Slot) -> None:
        with self._lock:
            if self._pid != _PID:
                return
            hold, _ = self._fds(slot.capability_id)
            self._held[slot.capability_id].discard(slot.index)
            _ofd_lock(hold, fcntl.F_UNLCK, slot.index)

    def in_use(self, capability_id: str) -> int:
        """How many of the capability's slots are held right now, by any process."""
        with self._lock:
            _, query = self._fds(capability_id)
            return sum(
                _ofd_lock(query, fcntl.F_WRLCK, i, query=True) != fcntl.F_UNLCK
                for i in range(self.limits[capability_id])
            )

    def total_in_use(self) -> int:
        return sum(self.in_use(cap) for cap in self.limits)


class JobLocks:
    """Which jobIds run right now anywhere in the instance: one OFD lock per running job.

    Each jobId maps to one byte of ``path`` at an offset hashed from it (56 bits: the file
    stays empty, locks beyond its end are fine). Taking the lock is how a process claims a
    job; a duplicate delivery to any worker finds it held. The kernel drops the locks of a
    process that dies, so a crashed job is free to run again, as before, without any write.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._fd = -1
        self._pid = 0
        self._mine: dict[int, str] = {}
        renew_after_fork(self)

    def renew_after_fork(self) -> None:
        """No job is the child's: its parent's descriptor and locks stay the parent's."""
        self._lock = threading.Lock()
        self._fd, self._pid, self._mine = -1, 0, {}

    @staticmethod
    def offset(job_id: str) -> int:
        return int.from_bytes(hashlib.blake2b(job_id.encode(), digest_size=7).digest(), "big")

    def _descriptor(self) -> int:
        if self._pid != _PID:
            # After fork the descriptor (and the locks on it) belong to the parent.
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            self._pid, self._mine = _PID, {}
        return self._fd

    def acquire(self, job_id: str) -> bool:
        """Claim ``job_id`` for this process; False when it runs already (here or elsewhere)."""
        offset = self.offset(job_id)
        with self._lock:
            fd = self._descriptor()
            if offset in self._mine:
                # This process holds it: the same job (or, at odds of 2^-56, a namesake).
                return False
            try:
                _ofd_lock(fd, fcntl.F_WRLCK, offset)
            except OSError as exc:
                if exc.errno in (errno.EAGAIN, errno.EACCES):
                    return False
                raise
            self._mine[offset] = job_id
            return True

    def release(self, job_id: str) -> None:
        offset = self.offset(job_id)
        with self._lock:
            if self._pid != _PID or self._mine.get(offset) != job_id:
                return
            del self._mine[offset]
            _ofd_lock(self._fd, fcntl.F_UNLCK, offset)


LEDGER_COLUMNS = frozenset(
    {
        "job_id",
        "state",
        "owner_pid",
        "owner_started",
        "attempt",
        "http_status",
        "response",
        "created",
        "finished",
        "async",
        "correlation_id",
    }
)


#: The rows of jobs not finished yet; the same text in the partial index and its queries, so
#: SQLite can use the index.
_UNFINISHED = "state IN ('running', 'queued')"


@dataclass
class Claim:
    """The ledger's answer to "may this worker run jobId now?"."""

    outcome: str  # "run" | "replay" | "running"
    status: int = 0
    body: dict[str, Any] | None = None
    attempt: int = 1
    #: A "run" claim that wrote a row (asynchronous, or a new attempt); a first synchronous
    #: claim writes nothing, so giving it back (:meth:`Ledger.release`) writes nothing either.
    recorded: bool = False


class LedgerIdentity:
    """Which file (``st_dev``, ``st_ino``) the ledger of the running instance is.

    Deleting ``ledger.sqlite3*`` under a running instance splits it in two: workers that
    have it open keep the unlinked file, and a worker started afterwards (gunicorn recycles
    them) would create a new, empty one and run finished jobs again. So the first process
    of an instance to open the ledger records its identity in ``ledger.identity.json``,
    keyed by the instance; every later opening by a process of that instance must find
    that same file, and each worker compares it again on its housekeeping tick
    (:meth:`verify`, one ``stat``). A mismatch or a missing file makes :attr:`broken` say
    what changed: the ledger then refuses claims (:class:`LedgerReplaced`) and readiness
    turns unhealthy. A new instance (the whole runner restarted) records the file anew.
    """

    def __init__(self, path: str, instance: Callable[[], str]) -> None:
        self.path = path
        self.record_path = os.path.join(os.path.dirname(path), "ledger.identity.json")
        self.instance = instance
        #: What happened to the ledger ("" while it is the instance's own file).
        self.broken = ""
        self._expected: tuple[int, int] | None = None

    def _recorded(self) -> tuple[int, int] | None:
        record = read_json(self.record_path)
        if not record or record.get("instance") != self.instance():
            return None
        try:
            return int(record["dev"]), int(record["ino"])
        except (KeyError, TypeError, ValueError):
            return None

    def _break(self, what: str) -> None:
        if not self.broken:
            self.broken = (
                f"the ledger {self.path} {what} while this instance runs; new jobs are "
                "refused so that finished ones cannot run twice: restart the runner"
            )
            log.error("ledger replaced: %s", self.broken)
        raise LedgerReplaced(self.broken)

    def _compare(self, expected: tuple[int, int]) -> None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._break("was deleted")
        else:
            if (st.st_dev, st.st_ino) != expected:
                self._break(
                    f"was replaced (device/inode {expected[0]}/{expected[1]} became "
                    f"{st.st_dev}/{st.st_ino})"
                )

    def before_open(self) -> None:
        """Raise :class:`LedgerReplaced` if the instance recorded a file that is not there."""
        if self.broken:
            raise LedgerReplaced(self.broken)
        expected = self._recorded()
        if expected is not None:
            self._compare(expected)

    def after_open(self) -> None:
        """Record the file just opened as the instance's, or check it is the recorded one."""
        st = os.stat(self.path)
        current = (st.st_dev, st.st_ino)
        expected = self._recorded()
        if expected is None:
            write_json_atomic(
                self.record_path,
                {"instance": self.instance(), "dev": current[0], "ino": current[1]},
            )
        elif expected != current:
            self._compare(expected)  # raises LedgerReplaced
        self._expected = current

    def verify(self) -> str:
        """Compare the file with the recorded identity now; "" when it is the same."""
        if not self.broken:
            expected = self._expected or self._recorded()
            if expected is not None:
                with contextlib.suppress(LedgerReplaced):
                    self._compare(expected)
        return self.broken


class StorageHealth:
    """Whether the instance's state can be written right now.

    A write that fails (disk full, I/O error) sets :attr:`failure` in its process and leaves
    the marker file ``state.unwritable``, which the readiness check of every worker sees.
    The next write that succeeds in a process that had failed (a job's answer stored, or
    the housekeeping probe every worker runs while the marker exists) clears both. Reading
    :attr:`failure` costs nothing on the path of a job; the marker is looked at only by
    readiness and housekeeping.
    """

    def __init__(self, directory: str) -> None:
        self.marker = os.path.join(directory, "state.unwritable")
        #: This process's last storage failure; "" while its writes work.
        self.failure = ""

    def failed(self, exc: BaseException) -> None:
        """A write failed: degrade readiness (here, and for every worker via the marker)."""
        message = f"{type(exc).__name__}: {exc}"[:300]
        first = not self.failure
        self.failure = message
        with contextlib.suppress(OSError):
            # An empty file still fits on a full disk where its text may not.
            fd = os.open(self.marker, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
            with contextlib.suppress(OSError):
                os.write(fd, message.encode()[:300])
            os.close(fd)
        if first:
            log.error(
                "the instance's state cannot be written (%s); jobs are answered 503 "
                "STATE_UNAVAILABLE and readiness is unhealthy until a write succeeds",
                message,
            )

    def recovered(self) -> None:
        """A write succeeded: clear this process's failure and the instance's marker."""
        had = self.failure
        self.failure = ""
        try:
            os.unlink(self.marker)
        except FileNotFoundError:
            if not had:
                return
        except OSError:
            return
        log.info("the instance's state can be written again")

    def marked(self) -> bool:
        return self.failure != "" or os.path.exists(self.marker)

    def problem(self) -> str:
        """What is wrong with the state's writes ("" when nothing)."""
        if self.failure:
            return self.failure
        try:
            with open(self.marker, encoding="utf-8", errors="replace") as handle:
                text = handle.read(300)
        except FileNotFoundError:
            return ""
        except OSError as exc:
            text = type(exc).__name__
        return text or "a worker of this instance could not write its state"


class SQLiteFile:
    """One SQLite file shared by the instance's processes: a connection per process, WAL.

    A connection must not cross ``fork``, so a process that finds one made by its parent opens
    its own. Writes go through :meth:`_transaction` (``BEGIN IMMEDIATE``) or :meth:`_write`
    (one statement), both in the writers' turn (:class:`WriterTurns`, ``<name>.writer.lock``)
    so a writer of one worker waits for another's exactly as long as it writes.
    """

    def __init__(self, path: str, identity: LedgerIdentity | None = None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._pid = 0
        self._writers = WriterTurns(os.path.splitext(path)[0] + ".writer.lock")
        #: Which file this must be for the running instance (None: any, e.g. in a test).
        self.identity = identity
        renew_after_fork(self)

    def renew_after_fork(self) -> None:
        """The child opens its own connection; the parent's is kept, never closed here."""
        self._lock = threading.Lock()
        if self._conn is not None:
            _INHERITED.append(self._conn)
        self._conn, self._pid = None, 0

    def _setup(self, conn: sqlite3.Connection) -> None:
        """Create the tables this store needs (called once per process)."""

    def _initialise(self, conn: sqlite3.Connection) -> None:
        """WAL mode and the tables (:func:`prepare_wal`)."""
        prepare_wal(conn, self._writers, self._setup)

    def _db(self) -> sqlite3.Connection:
        if self._conn is None or self._pid != _PID:
            if self._conn is not None:
                _INHERITED.append(self._conn)  # a parent's (see renew_after_fork)
                self._conn = None
            # Checked before anything could create the file: a worker started after the
            # running instance's ledger vanished must not begin a fresh, empty one.
            if self.identity is not None:
                self.identity.before_open()
            private_file(self.path)
            conn = sqlite3.connect(
                self.path, timeout=10.0, isolation_level=None, check_same_thread=False
            )
            try:
                self._initialise(conn)
                if self.identity is not None:
                    self.identity.after_open()
            except BaseException:
                conn.close()
                raise
            self._conn, self._pid = conn, _PID
        return self._conn

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock, self._writers.hold():
            conn = self._db()
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    @contextlib.contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        """The process's connection, for reads."""
        with self._lock:
            yield self._db()

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """The process's connection for one autocommitted write, in the writers' turn."""
        with self._lock, self._writers.hold():
            yield self._db()


#: Default memory of signed requests' digests: beyond the 300 s age and 60 s future window.
EVENT_MEMORY_S = 900.0


class Ledger(SQLiteFile):
    """The idempotency ledger: one row per jobId, shared by every worker through SQLite.

    A finished job's answer is replayed when it was a success or a failure that a retry
    cannot change; after a retryable failure a new delivery is a new attempt and runs again.
    A job whose owner process died mid-run is taken over by the next delivery.
    """

    def __init__(
        self,
        path: str,
        retention_s: float,
        max_entries: int = 100_000,
        identity: LedgerIdentity | None = None,
    ) -> None:
        super().__init__(path, identity)
        self.running = JobLocks(os.path.splitext(path)[0] + ".running.lock")
        self.retention_s = retention_s
        #: How long a signed request's digest is remembered: past a signature's validity.
        self.event_memory_s = EVENT_MEMORY_S
        self.max_entries = max_entries
        self._me = (0, 0.0)
        self._since_prune = 0

    def _setup(self, conn: sqlite3.Connection) -> None:
        columns = {row[1] for row in conn.execute("PRAGMA table_info(jobs)")}
        if columns and not columns >= LEDGER_COLUMNS:
            # A ledger from an older runnerkit: its rows only serve replays, start afresh.
            conn.execute("DROP TABLE jobs")
        conn.execute(
            "CREATE TABLE IF NOT EXISTS jobs ("
            " job_id TEXT PRIMARY KEY, state TEXT NOT NULL, owner_pid INTEGER,"
            " owner_started REAL, attempt INTEGER NOT NULL DEFAULT 1, http_status INTEGER,"
            " response TEXT, created REAL NOT NULL, finished REAL,"
            " async INTEGER NOT NULL DEFAULT 0, correlation_id TEXT, capability TEXT,"
            " queue_seq INTEGER)"
        )
        # Where an asynchronous job stands in its capability's line for a slot (see
        # :meth:`ahead`); added to a ledger of an older runnerkit, whose rows are kept.
        columns = {row[1] for row in conn.execute("PRAGMA table_info(jobs)")}
        for column, kind in (("capability", "TEXT"), ("queue_seq", "INTEGER")):
            if column not in columns:
                conn.execute(f"ALTER TABLE jobs ADD COLUMN {column} {kind}")
        conn.execute("CREATE INDEX IF NOT EXISTS jobs_finished ON jobs(finished)")
        # Signed requests that reached a run (the SHA-256 of what their signature covers), for
        # as long as a signature is valid. Older ledgers keyed them on the unsigned event id.
        conn.execute("DROP TABLE IF EXISTS events")
        conn.execute(
            "CREATE TABLE IF NOT EXISTS signed_requests"
            " (digest BLOB PRIMARY KEY, seen REAL NOT NULL) WITHOUT ROWID"
        )
        conn.execute("CREATE INDEX IF NOT EXISTS signed_requests_seen ON signed_requests(seen)")
        # Only unfinished (asynchronous) jobs, a handful: housekeeping looks for orphans among
        # them twice a second, which must not cost a scan of every answer kept.
        conn.execute(
            f"CREATE INDEX IF NOT EXISTS jobs_unfinished ON jobs(state) WHERE {_UNFINISHED}"
        )
        # One row, rewritten by :meth:`probe` to learn whether writes work again.
        conn.execute("CREATE TABLE IF NOT EXISTS probe (id INTEGER PRIMARY KEY, at REAL)")
        self._me = (os.getpid(), process_start_time(os.getpid()) or 0.0)

    def claim(
        self,
        job_id: str,
        *,
        queued: bool = False,
        correlation_id: str = "",
        capability: str = "",
    ) -> Claim:
        """Decide whether this process runs ``job_id``; a "run" claim holds its job lock
        until :meth:`complete` or :meth:`release`.

        The job lock (:class:`JobLocks`) settles who runs it; the rows settle what happened
        before. A synchronous job never seen before, the common case, costs one read here
        and one write at :meth:`complete`. ``queued`` records an asynchronous job that waits
        for a slot of ``capability`` before it runs: its row exists from now on, for
        recovery and counting, and takes the next place in the instance's line for that
        capability's slots (:meth:`ahead`).
        """
        if self.identity is not None and self.identity.broken:
            raise LedgerReplaced(self.identity.broken)
        if not self.running.acquire(job_id):
            return Claim("running")
        try:
            claim = self._claim_locked(job_id, queued, correlation_id, capability)
        except BaseException:
            self.running.release(job_id)
            raise
        if claim.outcome != "run":
            self.running.release(job_id)
        return claim

    def _claim_locked(
        self, job_id: str, queued: bool, correlation_id: str, capability: str
    ) -> Claim:
        if not queued:
            with self._connection() as conn:
                known = conn.execute("SELECT 1 FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
            if known is None:
                return Claim("run")
        now = time.time()
        state = "queued" if queued else "running"
        with self._transaction() as conn:
            pid, started = self._me
            # The line's next place, in the writers' turn: one order for every process. Only
            # unfinished rows are looked at (the partial index), the line is made of them.
            seq = None
            if queued:
                (last,) = conn.execute(
                    f"SELECT MAX(queue_seq) FROM jobs WHERE {_UNFINISHED}"
                ).fetchone()
                seq = int(last or 0) + 1
            row = conn.execute(
                "SELECT state, owner_pid, owner_started, attempt, http_status, response"
                " FROM jobs WHERE job_id = ?",
                (job_id,),
            ).fetchone()
            if row is None:
                values = (job_id, state, pid, started, now, int(queued), correlation_id)
                conn.execute(
                    "INSERT INTO jobs (job_id, state, owner_pid, owner_started, created, async,"
                    " correlation_id, capability, queue_seq) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (*values, capability, seq),
                )
                return Claim("run", recorded=True)
            _, owner_pid, owner_started, attempt, http_status, response = row
            if row[0] in ("running", "queued") and process_alive(owner_pid, owner_started):
                # The job lock is ours, so nobody runs the job: the row is one whose answer
                # (or release) could not be written, e.g. on a full disk. Left alone, it
                # would answer 409 for as long as its worker lives; it is a new attempt.
                log.warning(
                    "job %s: its %s entry of live pid %s has no answer; running it again "
                    "as attempt %s",
                    job_id,
                    row[0],
                    owner_pid,
                    attempt + 1,
                )
            if row[0] == "done":
                body = json.loads(response)
                if body.get("success") or not (body.get("error") or {}).get("retryable"):
                    return Claim("replay", http_status, body, attempt)
            conn.execute(
                "UPDATE jobs SET state = ?, owner_pid = ?, owner_started = ?, async = ?,"
                " correlation_id = ?, attempt = attempt + 1, http_status = NULL,"
                " response = NULL, finished = NULL, capability = ?, queue_seq = ?"
                " WHERE job_id = ?",
                (state, pid, started, int(queued), correlation_id, capability, seq, job_id),
            )
            return Claim("run", attempt=attempt + 1, recorded=True)

    def release(self, job_id: str, *, recorded: bool = True) -> None:
        """Forget a claim that never ran (rejected before the capability started).

        ``recorded=False`` (``Claim.recorded``) frees only the job lock: a first synchronous
        claim wrote no row, and a runner refusing jobs at capacity (429) should not queue in
        the writers' turn to delete nothing.
        """
        if not recorded:
            self.running.release(job_id)
            return
        try:
            with self._transaction() as conn:
                conn.execute(
                    "DELETE FROM jobs WHERE job_id = ? AND state IN ('running', 'queued')"
                    " AND owner_pid = ?",
                    (job_id, self._me[0]),
                )
        finally:
            self.running.release(job_id)

    def start(self, job_id: str) -> None:
        """A queued asynchronous job got its slot and runs now."""
        with self._transaction() as conn:
            conn.execute("UPDATE jobs SET state = 'running' WHERE job_id = ?", (job_id,))

    def ahead(self, job_id: str, capability: str) -> int:
        """How many asynchronous jobs wait for a slot of ``capability`` ahead of ``job_id``
        (accepted before it by any worker of the instance), not counting those of dead
        workers (their orphaned rows are the leader's to answer). A waiting job takes a free
        slot only when fewer jobs are ahead of it than slots are free: first come, first
        served across the instance, whichever worker accepted each job."""
        with self._connection() as conn:
            rows = conn.execute(
                f"SELECT owner_pid, owner_started FROM jobs WHERE {_UNFINISHED}"
                " AND state = 'queued' AND capability = ? AND queue_seq <"
                " (SELECT queue_seq FROM jobs WHERE job_id = ?)",
                (capability, job_id),
            ).fetchall()
        alive = {(self._me[0], self._me[1]): True}  # a few workers own them all
        for owner in rows:
            if owner not in alive:
                alive[owner] = process_alive(*owner)
        return sum(1 for owner in rows if alive[owner])

    def queued(self) -> int:
        """Asynchronous jobs accepted but still waiting for a slot."""
        with self._connection() as conn:
            (count,) = conn.execute(
                f"SELECT COUNT(*) FROM jobs WHERE {_UNFINISHED} AND state = 'queued'"
            ).fetchone()
        return int(count)

    def orphans(self) -> list[tuple[str, bool, str, int]]:
        """Unfinished jobs whose owner has died: ``(jobId, async, correlationId, ownerPid)``."""
        with self._connection() as conn:
            rows = conn.execute(
                "SELECT job_id, async, owner_pid, owner_started, correlation_id FROM jobs"
                f" WHERE {_UNFINISHED}"
            ).fetchall()
        return [
            (job_id, bool(is_async), correlation or "", pid)
            for job_id, is_async, pid, started, correlation in rows
            if not process_alive(pid, started)
        ]

    def complete(self, job_id: str, http_status: int, body_json: str) -> None:
        """Store the answer of a finished job, as the JSON text sent, then free its job lock.

        In that order: a redelivery that gets the lock next is sure to find the answer.
        """
        now = time.time()
        try:
            with self._write() as conn:
                pid, started = self._me
                conn.execute(
                    "INSERT INTO jobs (job_id, state, owner_pid, owner_started, http_status,"
                    " response, created, finished) VALUES (?, 'done', ?, ?, ?, ?, ?, ?)"
                    " ON CONFLICT(job_id) DO UPDATE SET state = 'done',"
                    " http_status = excluded.http_status, response = excluded.response,"
                    " finished = excluded.finished",
                    (job_id, pid, started, http_status, body_json, now, now),
                )
        finally:
            self.running.release(job_id)
        self._since_prune += 1
        if self._since_prune >= 1000:
            self.prune()

    def forget(self, job_id: str, owner_pid: int) -> None:
        """Drop an orphaned synchronous claim: its caller saw the connection fail.

        Only while the dead owner still holds it: a redelivery may have claimed it meanwhile.
        """
        with self._transaction() as conn:
            conn.execute(
                "DELETE FROM jobs WHERE job_id = ? AND state != 'done' AND owner_pid = ?",
                (job_id, owner_pid),
            )

    def fail_orphan(
        self, job_id: str, owner_pid: int, http_status: int, body: dict[str, Any]
    ) -> bool:
        """Store a failure for a job whose owner died, unless someone else took it since."""
        with self._transaction() as conn:
            cur = conn.execute(
                "UPDATE jobs SET state = 'done', http_status = ?, response = ?, finished = ?"
                " WHERE job_id = ? AND state != 'done' AND owner_pid = ?",
                (http_status, json.dumps(body), time.time(), job_id, owner_pid),
            )
        return cur.rowcount > 0

    def first_sight(self, digest: bytes) -> bool:
        """Record a signed request's digest (:func:`runnerkit.signing.request_digest`); False
        if it was recorded before."""
        with self._transaction() as conn:
            cur = conn.execute(
                "INSERT OR IGNORE INTO signed_requests (digest, seen) VALUES (?, ?)",
                (digest, time.time()),
            )
        return cur.rowcount > 0

    def probe(self) -> None:
        """One tiny write: raises when the ledger cannot be written (disk full, I/O error)."""
        with self._write() as conn:
            conn.execute("INSERT OR REPLACE INTO probe (id, at) VALUES (1, ?)", (time.time(),))

    def prune(self) -> int:
        """Drop finished entries past retention, and the oldest beyond ``max_entries``."""
        self._since_prune = 0
        with self._transaction() as conn:
            conn.execute(
                "DELETE FROM signed_requests WHERE seen < ?",
                (time.time() - self.event_memory_s,),
            )
            cur = conn.execute(
                "DELETE FROM jobs WHERE state = 'done' AND finished < ?",
                (time.time() - self.retention_s,),
            )
            removed = cur.rowcount
            (count,) = conn.execute("SELECT COUNT(*) FROM jobs").fetchone()
            if count > self.max_entries:
                cur = conn.execute(
                    "DELETE FROM jobs WHERE job_id IN (SELECT job_id FROM jobs"
                    " WHERE state = 'done' ORDER BY finished LIMIT ?)",
                    (count - self.max_entries,),
                )
                removed += cur.rowcount
        return int(removed)

    def completed_since(self, since: float) -> int:
        """Jobs finished after the wall-clock time ``since`` (for jobThroughput)."""
        with self._connection() as conn:
            (count,) = conn.execute(
                "SELECT COUNT(*) FROM jobs WHERE state = 'done' AND finished >= ?", (since,)
            ).fetchone()
        return int(count)

    def size(self) -> int:
        with self._connection() as conn:
            (count,) = conn.execute("SELECT COUNT(*) FROM jobs").fetchone()
        return int(count)


class InstanceState:
    """The state directory of one runner instance and everything kept in it."""

    def __init__(
        self,
        directory: str,
        limits: dict[str, int],
        retention_s: float,
        instance: Callable[[], str] | None = None,
    ) -> None:
        """``instance`` names the running instance (:func:`runnerkit.lifecycle.instance_key`);
        with it the ledger's file identity is kept (:class:`LedgerIdentity`)."""
        self.directory = directory
        self.ensure_directory()
        self.leader = LeaderLease(directory)
        self.slots = SlotTable(os.path.join(directory, "slots"), limits)
        ledger_path = os.path.join(directory, "ledger.sqlite3")
        identity = LedgerIdentity(ledger_path, instance) if instance is not None else None
        self.ledger = Ledger(ledger_path, retention_s, identity=identity)
        self.storage = StorageHealth(directory)
        self.identity_path = os.path.join(directory, "identity.json")
        self.instance_path = os.path.join(directory, "instance.json")
        self._identity_cache: tuple[float, dict[str, Any] | None] = (-1.0, None)
        #: An identity this process could not write (a full disk): it carries on with it.
        self._unsaved: dict[str, Any] | None = None

    def ensure_directory(self) -> bool:
        """Make the state directory (checked: :func:`secure_directory`) and ``slots/``; False,
        noted and logged, if a full disk stops it (a directory of another user's is a
        :class:`ConfigError`, raised)."""
        try:
            secure_directory(self.directory)
            os.makedirs(os.path.join(self.directory, "slots"), mode=0o700, exist_ok=True)
        except OSError as exc:
            if STORAGE.failed("the state directory", exc):
                log.warning("cannot make the state directory %s (%s)", self.directory, exc)
            return False
        STORAGE.recovered("the state directory")
        return True

    def identity(self) -> dict[str, Any] | None:
        """The registration JobForge gave this instance, if any (cached by file mtime)."""
        if self._unsaved is not None:
            return self._unsaved
        try:
            mtime = os.stat(self.identity_path).st_mtime
        except FileNotFoundError:
            self._identity_cache = (-1.0, None)
            return None
        if mtime != self._identity_cache[0]:
            self._identity_cache = (mtime, read_json(self.identity_path))
        return self._identity_cache[1]

    def save_identity(self, identity: dict[str, Any]) -> None:
        """Write the identity; on a full disk this process keeps it in memory instead.

        The other workers then read the older file until a later save (every heartbeat
        saves) succeeds; should this worker die first, the next leader registers again.
        """
        try:
            write_json_atomic(self.identity_path, identity)
        except OSError as exc:
            if STORAGE.failed("identity.json", exc):
                log.warning("cannot write %s (%s); kept in memory", self.identity_path, exc)
            self._unsaved = identity
            return
        self._unsaved = None
        STORAGE.recovered("identity.json")

    def forget_unsaved_identity(self) -> None:
        """Not leading: read the identity from its file again, and a failure of this process
        to save it (which only the leader does) no longer degrades its readiness."""
        if self._unsaved is not None:
            self._unsaved = None
            STORAGE.recovered("identity.json")

    def clear_identity(self) -> None:
        self._unsaved = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.identity_path)

    def problem(self) -> str:
        """Why the state cannot take jobs now ("" when it can): a replaced ledger, or writes
        that fail. For readiness and ``/health``; a ``stat`` or two, never on a job's path."""
        identity = self.ledger.identity
        return (identity.verify() if identity is not None else "") or self.storage.problem()

    def readiness_item(self) -> dict[str, Any]:
        """The ``state`` HealthCheck item of ``/health`` and ``/health/ready``."""
        problem = self.problem()
        item: dict[str, Any] = {
            "name": "state",
            "status": "unhealthy" if problem else "healthy",
            "responseTimeMs": 0,
        }
        if problem:
            item["message"] = problem[:500]
        return item

    def check_storage(self) -> bool:
        """Each worker's housekeeping: compare the ledger's identity, and while a write has
        failed anywhere in the instance, probe with a tiny write so readiness recovers
        without traffic once space is freed. True when the ledger was replaced."""
        identity = self.ledger.identity
        if identity is not None and identity.verify():
            return True
        if not self.storage.marked():
            return False
        try:
            self.ledger.probe()
        except LedgerReplaced:
            return True
        except STORAGE_ERRORS as exc:
            self.storage.failed(exc)
        else:
            self.storage.recovered()
        return False
