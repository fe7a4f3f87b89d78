"""The instance's leader lease across real processes: a stopped leader is replaced.

A kernel lock alone is freed only when its holder dies; a SIGSTOPped leader keeps it and the
instance stops heartbeating. These tests run a leader in a child process, stop it, and check
that another process takes over as the next generation, that the old leader steps down (with
one warning) when it resumes, and that a leader that dies or lets go is replaced at once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from runnerkit.runner.deregistration import deregister_instance
from runnerkit.runner.lease import LeaderLease, lease_expiry_s
from runnerkit.runner.statefiles import write_json_atomic
from tests.support import JobForgeStub
from tests.support.locks import leader_of, ofd_locked_bytes
from tests.support.waiting import wait_until

#: A child that takes the lease, then renews it every 50 ms and prints whether it leads.
CHILD = """
import sys, time
from runnerkit.runner.lease import LeaderLease
lease = LeaderLease(sys.argv[1], expiry_s=float(sys.argv[2]))
while not lease.acquire():
    time.sleep(0.05)
print("lead", lease.generation, flush=True)
while True:
    print("renewed" if lease.renew() else "follower", flush=True)
    time.sleep(0.05)
"""

EXPIRY_S = 1.0


class Child:
    """A leading child process; its stdout lines are collected on a thread."""

    def __init__(self, state_dir: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(state_dir), str(EXPIRY_S)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        assert self.proc.stdout is not None
        stdout = self.proc.stdout
        self._reader = threading.Thread(
            target=lambda: self.lines.extend(line.strip() for line in stdout), daemon=True
        )
        self._reader.start()

    def stop(self) -> str:
        """Kill the child; its stderr."""
        self.proc.kill()
        _, err = self.proc.communicate(timeout=10)
        return err


@pytest.fixture
def child(tmp_path: Path) -> Iterator[Child]:
    made = Child(tmp_path)
    yield made
    if made.proc.poll() is None:
        made.stop()


def test_a_stopped_leader_is_replaced_and_steps_down_when_it_resumes(
    tmp_path: Path, child: Child
) -> None:
    wait_until(lambda: "lead 0" in child.lines, 10, lambda: f"the child never led: {child.lines}")
    here = LeaderLease(str(tmp_path), expiry_s=EXPIRY_S)
    assert not here.acquire()  # a live leader renewing its lease keeps it
    assert leader_of(tmp_path, [child.proc.pid]) == child.proc.pid

    child.proc.send_signal(signal.SIGSTOP)
    try:
        # Still holding its lock (the kernel frees it only at death), but not renewing.
        assert 0 in ofd_locked_bytes(tmp_path / "leader.lock")
        wait_until(here.acquire, 10, "nobody took over from the stopped leader", interval=0.05)
        assert here.generation == 1
        generation, _, pid = here.record()
        assert (generation, pid) == (1, os.getpid())
        assert set(ofd_locked_bytes(tmp_path / "leader.lock")) >= {0, 1}
    finally:
        child.proc.send_signal(signal.SIGCONT)

    wait_until(
        lambda: "follower" in child.lines,
        10,
        lambda: f"the old leader never stepped down: {child.lines}",
    )
    # It stepped down at its first look after resuming, let its lock go, and never renewed again.
    after = child.lines[child.lines.index("follower") :]
    assert "renewed" not in after, child.lines
    wait_until(lambda: 0 not in ofd_locked_bytes(tmp_path / "leader.lock"), 5, "byte 0 still held")
    assert here.check() and here.renew()
    assert here.record()[0] == 1
    err = child.stop()
    assert err.count("steps down") == 1, err


def test_a_dead_or_departing_leader_is_replaced_at_once(tmp_path: Path, child: Child) -> None:
    wait_until(lambda: "lead 0" in child.lines, 10, lambda: f"the child never led: {child.lines}")
    here = LeaderLease(str(tmp_path), expiry_s=60.0)  # its lease would not expire for a minute
    assert not here.acquire()
    child.stop()
    # The kernel dropped the dead leader's lock: the same generation, taken at once.
    assert here.acquire() and here.generation == 0
    here.release()
    other = LeaderLease(str(tmp_path), expiry_s=60.0)
    # A lease in another object of this process: OFD locks of two descriptions do conflict.
    assert other.acquire() and other.generation == 0
    assert not here.acquire()
    other.release()


def test_the_lease_outlasts_a_delay_but_not_the_forges_offline_window() -> None:
    # A follower heartbeats at most one interval plus the lease after the last heartbeat:
    # that must stay below the three missed intervals after which JobForge says offline.
    for interval_ms in (1_000, 5_000, 30_000, 120_000):
        expiry = lease_expiry_s(interval_ms)
        assert expiry >= 2.0
        if interval_ms >= 2_000:
            assert interval_ms / 1000.0 + expiry + 1.0 < 3 * interval_ms / 1000.0


def test_deregistration_takes_the_lease_from_a_stopped_leader_and_deletes_once(
    tmp_path: Path, child: Child
) -> None:
    """The master's exit hook (or the sentinel) waits for a live leader to let go, but not for
    ever for a stopped one: past its wait it takes the lease over, sends the one DELETE, and
    the stopped leader steps down when it resumes. A second caller finds nothing to do."""
    stub = JobForgeStub().start()
    try:
        key, runner_id = "4242@1.00", "5f0c9a52-07d4-4e39-9a53-0d4d3c6ad1c2"
        write_json_atomic(
            str(tmp_path / "instance.json"), {"instance": key, "jobforgeUrl": stub.url}
        )
        write_json_atomic(str(tmp_path / "identity.json"), {"instance": key, "runnerId": runner_id})
        wait_until(lambda: "lead 0" in child.lines, 10, lambda: f"no lead: {child.lines}")
        child.proc.send_signal(signal.SIGSTOP)
        try:
            assert deregister_instance(str(tmp_path), key, lock_timeout_s=1.0)
            assert LeaderLease(str(tmp_path)).record()[0] == 1  # taken over, not waited for
            assert not deregister_instance(str(tmp_path), key, lock_timeout_s=1.0)
        finally:
            child.proc.send_signal(signal.SIGCONT)
        assert [d.path for d in stub.deletes()] == [f"/runners/{runner_id}"]
        wait_until(lambda: "follower" in child.lines, 10, lambda: f"led on: {child.lines}")
    finally:
        stub.stop()


def _hold_byte(path: Path, generation: int) -> int:
    """A descriptor of another open file description holding byte ``generation``'s lock, as a
    worker that has just taken the lease and not yet written its record does."""
    import fcntl

    from runnerkit.service.filelocks import ofd_lock

    fd = os.open(path / "leader.lock", os.O_RDWR | os.O_CREAT, 0o600)
    ofd_lock(fd, fcntl.F_WRLCK, generation)
    return fd


@pytest.mark.parametrize("before", ["no record", "a dead leader's record"])
def test_a_worker_that_took_the_lease_but_has_not_recorded_it_is_not_replaced(
    tmp_path: Path, before: str
) -> None:
    """Workers starting together (or racing after the leader died): the one that takes byte g
    first is the leader, even before its record is written; another does not make itself
    generation g + 1 (a second leader, with a registration of its own)."""
    if before != "no record":
        # pid_max is at most 2**22: no process has this pid.
        no_such_pid = 2**22 + 7
        write_json_atomic(
            str(tmp_path / "leader.lease"), {"generation": 0, "pid": no_such_pid, "renewed": 1.0}
        )
    fd = _hold_byte(tmp_path, 0)
    try:
        other = LeaderLease(str(tmp_path), expiry_s=0.3)
        assert other.acquire() is False
        assert other.acquire() is False
        assert other.generation is None
        # A newcomer that never writes its record within a lease counts as stalled.
        wait_until(other.acquire, 10, "a holder that never recorded its lease kept it")
        assert other.generation == 1
    finally:
        os.close(fd)
