"""Sentinels are started detached, and reaped: a worker keeps no zombie child.

Workers starting together may each start a sentinel; every one but the first finds the
instance watched and exits at once. A real child process shows whether it is reaped.
"""

from __future__ import annotations

import os
import sys

import psutil

from runnerkit.lifecycle import spawn_detached
from tests.support.waiting import wait_until


def _reaped(pid: int) -> bool:
    """Gone from the process table: exited and waited for (a zombie is still listed)."""
    return not psutil.pid_exists(pid)


def test_a_detached_child_that_exits_is_reaped_not_left_a_zombie() -> None:
    proc = spawn_detached([sys.executable, "-c", "pass"])

    wait_until(
        lambda: _reaped(proc.pid),
        timeout=10.0,
        message=lambda: f"child {proc.pid} is still there: {psutil.Process(proc.pid).status()}",
    )
    assert proc.returncode == 0


def test_a_detached_child_runs_in_its_own_session() -> None:
    """A terminal's Ctrl-C (sent to the foreground process group) must not reach it."""
    proc = spawn_detached([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert os.getsid(proc.pid) == proc.pid
        assert os.getsid(proc.pid) != os.getsid(0)
    finally:
        proc.kill()
