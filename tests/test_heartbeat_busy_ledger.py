"""A heartbeat never waits long for the instance's ledger.

A writer of the process holds the ledger's connection while it waits for the writers' turn,
and a stalled worker (a SIGSTOPped former leader) can hold that turn for as long as it is
stopped. The heartbeat of the worker that took over must still go out on time, or JobForge
calls the instance offline (the frozen-leader fault scenario): it reads the ledger's counts
with a short wait and, when the ledger stays busy, sends the last count it read.
"""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from runnerkit.runner.heartbeat import Heartbeats
from runnerkit.runner.state import InstanceState


@pytest.fixture
def state(tmp_path: Path) -> InstanceState:
    return InstanceState(str(tmp_path / "state"), {"echo": 2}, retention_s=60.0)


def test_a_busy_ledger_is_given_up_on_not_waited_for(state: InstanceState) -> None:
    assert state.ledger.queued(wait=0.05) == 0
    busy = state.ledger._lock  # what a writer waiting for the writers' turn holds
    busy.acquire()
    try:
        with pytest.raises(TimeoutError):
            state.ledger.queued(wait=0.05)
        with pytest.raises(TimeoutError):
            state.ledger.completed_since(0.0, wait=0.05)
    finally:
        busy.release()
    assert state.ledger.queued(wait=0.05) == 0


def test_the_heartbeat_sends_the_last_count_while_the_ledger_is_busy(
    state: InstanceState, monkeypatch: pytest.MonkeyPatch
) -> None:
    beats = SimpleNamespace(state=state, _last_queued=0)
    counts = iter([3])
    monkeypatch.setattr(state.ledger, "queued", lambda wait=None: next(counts))
    assert Heartbeats._queued_jobs(beats) == 3  # type: ignore[arg-type]

    def busy(wait: float | None = None) -> int:
        raise TimeoutError("busy")

    monkeypatch.setattr(state.ledger, "queued", busy)
    assert Heartbeats._queued_jobs(beats) == 3, "the last count, not 0 and not a wait"

    def broken(wait: float | None = None) -> int:
        raise OSError("disk gone")

    monkeypatch.setattr(state.ledger, "queued", broken)
    assert Heartbeats._queued_jobs(beats) == 0


def test_a_read_waits_for_a_writer_that_is_not_stuck(state: InstanceState) -> None:
    busy = state.ledger._lock
    busy.acquire()
    threading.Timer(0.05, busy.release).start()
    assert state.ledger.queued() == 0  # no wait given: it waits, as before
