"""Sentinels are started detached, and reaped: a worker keeps no zombie child.

Workers starting together may each start a sentinel; every one but the first finds the
instance watched and exits at once. A real child process shows whether it is reaped.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from runnerkit.runner.lifecycle import spawn_detached
from tests.support.waiting import wait_until


def _reaped(pid: int) -> bool:
    """Gone from the process table: exited and waited for (a zombie is still listed)."""
    return not psutil.pid_exists(pid)


def test_a_detached_child_that_exits_is_reaped_not_left_a_zombie() -> None:
    proc = spawn_detached([sys.executable, "-c", "pass"])

    # The reaper thread's wait takes the pid out of the table a moment before it sets
    # ``returncode``: both are waited for.
    wait_until(
        lambda: _reaped(proc.pid) and proc.returncode is not None,
        timeout=10.0,
        message=lambda: (
            f"child {proc.pid}: in the process table {psutil.pid_exists(proc.pid)}, "
            f"returncode {proc.returncode}"
        ),
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


def test_entries_of_masters_that_are_gone_are_forgotten(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A master without the product's on_exit hook (plain `gunicorn app:app`) leaves its entry.
    from runnerkit.runner import deregistration

    monkeypatch.setattr(deregistration, "masters_dir", lambda: str(tmp_path))
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (tmp_path / f"{gone.pid}.json").write_text("{}")
    (tmp_path / f"{os.getpid()}.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("not an entry")

    deregistration.forget_dead_masters()

    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"{os.getpid()}.json", "notes.txt"]
    )
