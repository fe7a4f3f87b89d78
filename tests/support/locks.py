"""Locks as the kernel reports them, and the worker that leads a runner instance.

Shared by the one-instance tests and the fault-injection suite: both must find the leader
the way the runner defines it (:class:`runnerkit.runner.lease.LeaderLease`), not by a guess.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from runnerkit.runner.lease import LeaderLease


def lock_lines(path: Path) -> Iterator[list[str]]:
    """``/proc/locks`` entries (held, not waiting) on the file at ``path``."""
    st = os.stat(path)
    device = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in Path("/proc/locks").read_text().splitlines():
        parts = line.split()
        # "3: FLOCK  ADVISORY  WRITE 1234 fe:00:5678 0 EOF"; waiters have "->" after the index.
        if len(parts) >= 6 and parts[1] != "->" and parts[5] == device:
            yield parts


def lock_waiters(path: Path) -> int:
    """How many lock requests on the file at ``path`` are waiting (``->`` in /proc/locks)."""
    st = os.stat(path)
    device = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    lines = Path("/proc/locks").read_text().splitlines()
    return sum(1 for line in lines if "->" in line.split()[:2] and device in line.split())


def ofd_locked_bytes(path: Path) -> list[int]:
    """Bytes of ``path`` locked with open-file-description locks.

    The kernel merges adjacent ranges of one open file description into one entry, so two
    locks of one process can show as a single two-byte lock: count bytes, not entries.
    """
    locked: list[int] = []
    for p in lock_lines(path):
        if p[1] == "OFDLCK":
            start, end = int(p[6]), int(p[7])
            locked.extend(range(start, end + 1))
    return locked


def has_open(pid: int, path: Path) -> bool:
    """Whether process ``pid`` has ``path`` open (one of /proc/<pid>/fd links to it)."""
    target = os.path.realpath(path)
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                    return True
    return False


def leader_of(state_dir: Path, workers: Iterable[int]) -> int | None:
    """The worker leading the instance of ``state_dir``, or None (none, or a takeover).

    The lease record (``leader.lease``) names a generation and a pid; that pid must be one of
    ``workers``, have ``leader.lock`` open, and the generation's byte of it must be locked.
    """
    generation, _renewed, pid = LeaderLease(str(state_dir)).record()
    lock = state_dir / "leader.lock"
    if pid not in set(workers) or not lock.exists() or not has_open(pid, lock):
        return None
    return pid if generation in ofd_locked_bytes(lock) else None
