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
