"""Leadership of one runner instance (:class:`LeaderLease`): only the leader talks to JobForge.

An OFD lock on ``leader.lock`` frees itself when its holder dies; a lease record renewed at
every tick (``leader.lease``) frees leadership from a holder that stalls. Here as well: how
long a lease lasts for a heartbeat interval (:func:`lease_expiry_s`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import threading
import time

from runnerkit.runner.statefiles import read_json, write_json_atomic
from runnerkit.service.afterfork import renew_after_fork
from runnerkit.service.filelocks import ofd_lock
from runnerkit.service.process import process_alive
from runnerkit.service.write_failures import STORAGE

log = logging.getLogger("runnerkit.state")


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
            ofd_lock(self._descriptor(), fcntl.F_WRLCK, generation)
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
                    ofd_lock(self._fd, fcntl.F_UNLCK, successor)
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
                    ofd_lock(self._fd, fcntl.F_UNLCK, self._generation)
            self._generation = None

    def close(self) -> None:
        """Give leadership up and close the lock file (a process that is done with it)."""
        with self._guard:
            self.release()
            if self._pid == os.getpid() and self._fd >= 0:
                os.close(self._fd)
            self._fd, self._pid = -1, 0
