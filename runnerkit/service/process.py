"""Which process is which: a process's identity (pid and start time, so a reused pid is not
mistaken for the one recorded), and the process whose exit ends a served instance.
"""

from __future__ import annotations

import os

import psutil


def process_start_time(pid: int) -> float | None:
    """When ``pid`` started, or None when no such process exists."""
    try:
        return float(psutil.Process(pid).create_time())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


def process_alive(pid: int, started: float | None) -> bool:
    """Whether the process recorded as ``(pid, started)`` is still that same process."""
    now_started = process_start_time(pid)
    if now_started is None:
        return False
    try:
        if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            return False
    except psutil.Error:
        return False
    return started is None or abs(now_started - started) < 0.5


def under_gunicorn() -> bool:
    """Whether this process is a gunicorn worker (gunicorn's master sets SERVER_SOFTWARE)."""
    return os.environ.get("SERVER_SOFTWARE", "").startswith("gunicorn/")


def instance_owner() -> tuple[int, float]:
    """The process whose exit ends the instance: the gunicorn master, else this process."""
    pid = os.getppid() if under_gunicorn() else os.getpid()
    return pid, process_start_time(pid) or 0.0


def keep_pid_current(namespace: dict[str, object], name: str = "_PID") -> int:
    """Set ``namespace[name]`` to this process's id now and again in every forked child.

    The job path asks several times per job whether a descriptor or connection belongs to
    this process; ``os.getpid()`` is a system call, and a module's own global is read faster
    than another module's attribute, so each module that asks keeps its own copy, kept
    current by this one hook. Returns the id, for the module's first assignment.
    """

    def note() -> None:
        namespace[name] = os.getpid()

    os.register_at_fork(after_in_child=note)
    return os.getpid()
