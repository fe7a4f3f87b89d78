"""A PostgreSQL server of a test's own, for faults the shared server must not suffer.

Restarting the machine's PostgreSQL would cut every other test's connections; a scenario
that restarts its database under load starts a private server instead: ``initdb`` into the
temporary directory, ``postgres`` on a free loopback port, trust authentication, no fsync
(the data is thrown away). PostgreSQL refuses to run as root, so as root the server runs as
the ``postgres`` user, which owns the data directory.

The binaries are found on ``PATH`` or under ``/usr/lib/postgresql/<version>/bin`` (Debian);
without them the test is skipped with the reason (failed under CI, as for the shared server).
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg
import pytest

from tests.support.procs import free_port
from tests.support.waiting import wait_until


def _bin_dir() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), reverse=True)
    return Path(candidates[0]).parent if candidates else None


class PrivatePostgres:
    """``initdb`` + ``pg_ctl`` on a directory and port of this test; :meth:`restart` at will."""

    def __init__(self) -> None:
        bin_dir = _bin_dir()
        if bin_dir is None:
            reason = "no PostgreSQL binaries (pg_ctl, initdb) on this machine"
            if os.environ.get("CI"):
                pytest.fail(f"{reason} (CI needs them)")
            pytest.skip(reason)
        self.bin_dir = bin_dir
        # Not under pytest's tmp_path: as root, that is a directory only root may enter.
        self.root = Path(tempfile.mkdtemp(prefix="runnerkit-pg-"))
        self.data = self.root / "pgdata"
        self.log = self.root / "postgres.log"
        self.port = free_port()
        self.user: str | None = None
        if os.geteuid() == 0:
            self.user = "postgres"
            entry = pwd.getpwnam(self.user)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        self._run(
            "initdb",
            *("-D", str(self.data), "-U", "postgres", "--auth=trust", "--no-sync"),
            *("-E", "UTF8", "--locale=C"),
        )
        self.start()

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        command = [str(self.bin_dir / tool), *args]
        if self.user is not None:
            command = ["runuser", "-u", self.user, "--", *command]
        return subprocess.run(command, capture_output=True, text=True, check=check, timeout=120)

    def start(self) -> None:
        """Start the server (again, on the same port) and wait until it answers."""
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -c fsync=off -k {self.root}"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "start")
        wait_until(self.answers, 30, lambda: f"PostgreSQL never answered\n{self.log_tail()}")

    def stop(self, mode: str = "fast") -> None:
        """``pg_ctl stop -m fast``: every client is cut off at once, as in a restart."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop", check=False)

    def restart(self, down_s: float = 0.0) -> None:
        """Stop the server, leave it down ``down_s`` seconds, start it again."""
        self.stop()
        if down_s > 0:
            time.sleep(down_s)
        self.start()

    def answers(self) -> bool:
        try:
            with psycopg.connect(self.url, connect_timeout=2, autocommit=True) as conn:
                conn.execute("SELECT 1")
        except psycopg.Error:
            return False
        return True

    def log_tail(self, chars: int = 3000) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_text(errors="replace")[-chars:]
        return ""

    def close(self) -> None:
        """Stop the server at once and delete its files."""
        self.stop(mode="immediate")
        shutil.rmtree(self.root, ignore_errors=True)
