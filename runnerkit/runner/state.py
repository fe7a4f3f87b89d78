"""Per-instance state shared by the gunicorn workers of one runner (:class:`InstanceState`).

gunicorn forks several workers that must act as ONE runner. They share a state directory:

* ``leader.lock`` and ``leader.lease`` — leadership (:class:`LeaderLease`, in ``lease``):
  the leader holds an OFD lock on the byte of ``leader.lock`` numbered by its generation and
  renews the lease record at every tick; only it talks to JobForge. The kernel drops the
  lock when its holder dies, so another worker takes over at once; a holder that stalls
  (SIGSTOP, a paused process) keeps its lock but its lease expires, and another worker
  takes over as the next generation. (The sentinel and the master's exit hook take turns
  with an ``flock`` on ``leader.lock``, which OFD locks do not meet.)
* ``identity.json`` — the runnerId JobForge assigned, so a new leader heartbeats as the same
  runner instead of registering again.
* ``slots/<capability>.lock`` — one byte per concurrency slot (``locks``), held with an
  open-file-description lock (``F_OFD_SETLK``) for as long as a job's code runs. A
  SIGKILLed worker's locks vanish with it, so a crash cannot leak capacity, and any process
  can count the held bytes (``F_OFD_GETLK``) without taking them.
* ``ledger.running.lock`` — one OFD lock per running job (``locks``), at an offset hashed
  from its jobId: a duplicate delivery to any worker finds it held; a dead worker's locks
  vanish.
* ``ledger.sqlite3`` — the idempotency ledger (``ledger``; SQLite, WAL): the stored answer
  of each finished job, and the asynchronous jobs accepted, queued or running, and where.
  The result outbox keeps its table in the same file.
* ``ledger.writer.lock`` — the writers' turn of that file (:class:`WriterTurns`, in
  ``runnerkit.service.sqlite``): a worker about to write waits on it in the kernel rather
  than in SQLite's busy handler, which sleeps milliseconds at a time.
* ``ledger.identity.json`` — which file (device, inode) the running instance's ledger is
  (:class:`LedgerIdentity`, in ``storage``): a worker never silently starts a second, empty
  ledger.
* ``ledger.journal/<pid>-<tag>.journal`` — each worker's finished answers and signed
  requests' digests on their way into ``ledger.sqlite3``, folded into it every few
  milliseconds (:class:`Journal`, in ``journal``); a dead worker's is folded by the next
  claim. ``ledger.journal/journals.epoch`` changes whenever a worker adds or removes one, so
  the others need not look at the folder per claim (``directory_epoch``).
* ``state.unwritable`` — present while a worker could not write the state (disk full, I/O
  error): every worker's readiness reports it (:class:`StorageHealth`, in ``storage``).

The directory is this user's alone (0700, :func:`secure_directory`, in ``statefiles``), its
files 0600. Each file's keeper has a module of its own (named above, beside this one);
:class:`InstanceState`, here, opens them all for one instance.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from typing import Any

from runnerkit.runner.lease import LeaderLease
from runnerkit.runner.ledger import Ledger
from runnerkit.runner.locks import SlotTable
from runnerkit.runner.statefiles import read_json, secure_directory, write_json_atomic
from runnerkit.runner.storage import STORAGE_ERRORS, LedgerIdentity, LedgerReplaced, StorageHealth
from runnerkit.service.write_failures import STORAGE

log = logging.getLogger("runnerkit.state")


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
        self.ledger.journal.failed = self.storage.failed
        self.ledger.journal.recovered = self.storage.recovered
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
