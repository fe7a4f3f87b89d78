"""The instance sentinel: deregisters the runner once the gunicorn master has exited.

A worker cannot tell an instance shutdown from its own recycling (``max_requests``), a crash
or a ``SIGHUP`` reload, and a plain ``gunicorn app:app`` has no master hook to run. So the
first worker starts this small process, in its own session so a terminal's Ctrl-C does not
reach it; it waits for the master to exit and then deregisters, exactly once.

Usage (started by runnerkit itself):
``python -m runnerkit.runner.sentinel STATE_DIR KEY MASTER_PID``
"""

from __future__ import annotations

import logging
import os
import select
import signal
import sys
import time

from runnerkit.runner.deregistration import deregister_instance
from runnerkit.service.filelocks import FileLock
from runnerkit.service.logs import configure_logging
from runnerkit.service.process import process_alive, process_start_time


def wait_for_exit(pid: int) -> None:
    """Block until ``pid`` has exited (pidfd when the kernel has it, else polling)."""
    started = process_start_time(pid)
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        fd = -1
    if fd >= 0:
        try:
            select.select([fd], [], [])
        finally:
            os.close(fd)
        return
    while process_alive(pid, started):
        time.sleep(0.2)


def main(argv: list[str]) -> int:
    state_dir, key, master = argv[1], argv[2], int(argv[3])
    configure_logging("runnerkit-sentinel", "", "json", "INFO", isolate=True)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    lock = FileLock(os.path.join(state_dir, "sentinel.lock"))
    if not lock.acquire(blocking=True, timeout=2.0):
        return 0  # another sentinel watches this instance
    try:
        wait_for_exit(master)
        deregister_instance(state_dir, key)
    except Exception:
        logging.getLogger("runnerkit.lifecycle").exception("sentinel failed")
        return 1
    finally:
        lock.release()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
