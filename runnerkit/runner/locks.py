"""The instance's cross-process job locks: concurrency slots and running jobIds.

Both are OFD byte locks, held for as long as a job runs and dropped by the kernel when their
holder dies, so a crashed worker leaks neither capacity nor a job: :class:`SlotTable` holds
one byte per concurrency slot of each capability (``slots/<capability>.lock``),
:class:`JobLocks` one byte per running jobId (``ledger.running.lock``).
"""

from __future__ import annotations

import contextlib
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
    """maxConcurrency per capability, enforced across every process of the instance.

    Taking and giving back a slot takes no thread lock: a thread marks an index as its own
    in this process's dict (``setdefault`` is atomic) before it locks the byte, and drops
    the mark only after unlocking it. A thread lock here was held across the lock's system
    call, where a thread can lose the GIL, and under load the others then queued on it.
    """

    def __init__(self, directory: str, limits: dict[str, int]) -> None:
        self.directory = directory
        self.limits = dict(limits)
        self._lock = threading.Lock()
        self._pid = 0
        self._hold: dict[str, int] = {}
        self._query: dict[str, int] = {}
        self._held: dict[str, dict[int, object]] = {}
        renew_after_fork(self)

    def renew_after_fork(self) -> None:
        """No slot is the child's: its parent's descriptors and locks stay the parent's.

        The child closes its copies of them: a lock belongs to the open file, so a copy kept
        open in a child would keep the parent's slots taken after the parent died.
        """
        if self._pid:  # opened by the parent: this is the child's copy
            for fd in (*self._hold.values(), *self._query.values()):
                _close_quietly(fd)
        self._lock = threading.Lock()
        self._pid, self._hold, self._query, self._held = 0, {}, {}, {}

    def _fds(self, capability_id: str) -> tuple[int, int, dict[int, object]]:
        if self._pid == _PID and capability_id in self._held:
            return self._hold[capability_id], self._query[capability_id], self._held[capability_id]
        with self._lock:  # the first use in this process
            if self._pid != _PID:
                # After fork the descriptors (and the locks on them) belong to the parent.
                self._hold, self._query, self._held = {}, {}, {}
                self._pid = _PID
            if capability_id not in self._held:
                path = os.path.join(self.directory, f"{capability_id}.lock")
                flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
                self._hold[capability_id] = os.open(path, flags, 0o600)
                self._query[capability_id] = os.open(path, flags, 0o600)
                self._held[capability_id] = {}
            return self._hold[capability_id], self._query[capability_id], self._held[capability_id]

    def acquire(self, capability_id: str) -> Slot | None:
        """Take a free slot, or None when every slot is held somewhere in the instance."""
        limit = self.limits[capability_id]
        hold, _, mine = self._fds(capability_id)
        start = random.randrange(limit)
        mark = object()
        for step in range(limit):
            index = (start + step) % limit
            if mine.setdefault(index, mark) is not mark:
                continue  # another thread of this process holds it, or is taking it
            try:
                ofd_lock(hold, fcntl.F_WRLCK, index)
            except OSError as exc:
                del mine[index]
                if exc.errno in (errno.EAGAIN, errno.EACCES):
                    continue
                raise
            return Slot(capability_id, index)
        return None

    def release(self, slot: Slot) -> None:
        if self._pid != _PID:
            return
        hold, _, mine = self._fds(slot.capability_id)
        if slot.index in mine:
            # Unlocked before the mark goes: a thread of this process that marked it after
            # would lock a byte this process still holds, and lose it to this unlock.
            ofd_lock(hold, fcntl.F_UNLCK, slot.index)
            mine.pop(slot.index, None)

    def in_use(self, capability_id: str) -> int:
        """How many of the capability's slots are held right now, by any process."""
        _, query, _ = self._fds(capability_id)
        return sum(
            ofd_lock(query, fcntl.F_WRLCK, i, query=True) != fcntl.F_UNLCK
            for i in range(self.limits[capability_id])
        )

    def total_in_use(self) -> int:
        return sum(self.in_use(cap) for cap in self.limits)


#: The bytes of ``ledger.running.lock`` from here up are held one per process for its life
#: (:meth:`JobLocks.hold_for_life`); jobIds hash below (56 bits).
LIFE_MARKS = 1 << 60


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
        self._mine: dict[int, list[str]] = {}
        renew_after_fork(self)

    def renew_after_fork(self) -> None:
        """No job is the child's: its parent's descriptor and locks stay the parent's (and
        the child closes its copy, as :meth:`SlotTable.renew_after_fork` says why)."""
        if self._pid:  # opened by the parent: this is the child's copy
            _close_quietly(self._fd)
        self._lock = threading.Lock()
        self._fd, self._pid, self._mine = -1, 0, {}

    @staticmethod
    def offset(job_id: str) -> int:
        return int.from_bytes(hashlib.blake2b(job_id.encode(), digest_size=7).digest(), "big")

    def _descriptor(self) -> tuple[int, dict[int, list[str]]]:
        if self._pid == _PID:
            return self._fd, self._mine
        with self._lock:  # the first use in this process
            if self._pid != _PID:
                # After fork the descriptor (and the locks on it) belong to the parent.
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                self._mine = {}
                self._pid = _PID
            return self._fd, self._mine

    def acquire(self, job_id: str) -> bool:
        """Claim ``job_id`` for this process; False when it runs already (here or elsewhere).

        No thread lock (see :class:`SlotTable`): the job's offset is marked as this thread's
        (an atomic ``setdefault``) before its byte is locked.
        """
        offset = self.offset(job_id)
        fd, mine = self._descriptor()
        mark = [job_id]
        if mine.setdefault(offset, mark) is not mark:
            # This process holds it: the same job (or, at odds of 2^-56, a namesake).
            return False
        try:
            ofd_lock(fd, fcntl.F_WRLCK, offset)
        except OSError as exc:
            del mine[offset]
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                return False
            raise
        return True

    def release(self, job_id: str) -> None:
        if self._pid != _PID:
            return
        offset = self.offset(job_id)
        mark = self._mine.get(offset)
        if mark is None or mark[0] != job_id:
            return
        # Unlocked before the mark goes (see SlotTable.release).
        ofd_lock(self._fd, fcntl.F_UNLCK, offset)
        self._mine.pop(offset, None)

    def hold_for_life(self, offset: int) -> None:
        """Lock byte ``offset`` (at or above :data:`LIFE_MARKS`, beyond any jobId's) until
        this process dies. The kernel drops every lock on one open file at once, so another
        process that gets a dead worker's job lock finds this byte free too: the ledger's
        journal says by it whether its owner lives (:mod:`.journal`)."""
        fd, _ = self._descriptor()
        ofd_lock(fd, fcntl.F_WRLCK, offset)

    def held_elsewhere(self, offset: int) -> bool:
        """Whether another process holds byte ``offset`` (:meth:`hold_for_life`)."""
        fd, _ = self._descriptor()
        return ofd_lock(fd, fcntl.F_WRLCK, offset, query=True) != fcntl.F_UNLCK


def _close_quietly(fd: int) -> None:
    if fd >= 0:
        with contextlib.suppress(OSError):
            os.close(fd)
