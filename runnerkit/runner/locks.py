"""The instance's cross-process job locks: concurrency slots and running jobIds.

Both are OFD byte locks, held for as long as a job runs and dropped by the kernel when their
holder dies, so a crashed worker leaks neither capacity nor a job: :class:`SlotTable` holds
one byte per concurrency slot of each capability (``slots/<capability>.lock``),
:class:`JobLocks` one byte per running jobId (``ledger.running.lock``).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import random
import threading
from dataclasses import dataclass

from runnerkit.service.afterfork import renew_after_fork
from runnerkit.service.filelocks import ofd_lock
from runnerkit.service.process import keep_pid_current

#: This process's id, kept current in forked children (a module global: read per job).
_PID = keep_pid_current(globals())


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
                    ofd_lock(hold, fcntl.F_WRLCK, index)
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
            ofd_lock(hold, fcntl.F_UNLCK, slot.index)

    def in_use(self, capability_id: str) -> int:
        """How many of the capability's slots are held right now, by any process."""
        with self._lock:
            _, query = self._fds(capability_id)
            return sum(
                ofd_lock(query, fcntl.F_WRLCK, i, query=True) != fcntl.F_UNLCK
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
                ofd_lock(fd, fcntl.F_WRLCK, offset)
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
            ofd_lock(self._fd, fcntl.F_UNLCK, offset)
