"""A storage failure at any ledger call of ``/execute`` gives back everything it took.

A disk that fills up, or an I/O error, cannot be produced at one chosen call of a real
process, so here each ledger (and slot-table) call of the execute path is made to raise
``sqlite3.OperationalError`` or ``OSError`` in turn, on the synchronous and asynchronous
paths of a signed runner's Flask test client. After every one: no concurrency slot, job
lock or in-flight count is left taken, the answer is a retryable 503 ``STATE_UNAVAILABLE``
envelope (or, when only storing the finished answer failed, the answer computed), readiness
reports the ``state`` check unhealthy, and once writes work again the same jobId runs.
"""

from __future__ import annotations

import errno
import json
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runnerkit import Runner
from runnerkit.runner.state import InstanceState
from runnerkit.service.signing import sign
from runnerkit.testing import JobForgeStub
from tests.helpers import assert_execution_response, assert_failure, request_body
from tests.support.waiting import wait_until

SECRET = "storage-fault-secret"

#: Where a fault is injected: (object attribute path, the call). ``claim`` is the ledger's
#: look-up/insert behind its job lock; ``lock`` the job lock itself; ``slot`` the slot table.
FAULT_POINTS = {
    "claim": ("ledger", "_claim_locked"),
    "lock": ("ledger.running", "acquire"),
    "queued": ("ledger", "queued"),
    "first_sight": ("ledger", "first_sight"),
    "slot": ("slots", "acquire"),
    "start": ("ledger", "start"),
    "complete": ("ledger", "complete"),
}
#: Calls made only on the asynchronous path.
ASYNC_ONLY = {"queued", "start"}

ERRORS: dict[str, Callable[[], BaseException]] = {
    "sqlite-full": lambda: sqlite3.OperationalError("database or disk is full"),
    "sqlite-io": lambda: sqlite3.OperationalError("disk I/O error"),
    "enospc": lambda: OSError(errno.ENOSPC, "No space left on device"),
    "eio": lambda: OSError(errno.EIO, "Input/output error"),
}


class Faults:
    """Makes chosen calls of one instance state raise, and puts them back."""

    def __init__(self, state: InstanceState) -> None:
        self.state = state
        self._saved: list[tuple[Any, str]] = []

    def _target(self, path: str) -> Any:
        target: Any = self.state
        for part in path.split("."):
            target = getattr(target, part)
        return target

    def inject(self, point: str, error: Callable[[], BaseException]) -> None:
        # A full disk fails the housekeeping probe too, so readiness stays down meanwhile.
        for path, name in (FAULT_POINTS[point], ("ledger", "probe")):
            target = self._target(path)

            def fail(*args: Any, **kwargs: Any) -> Any:
                raise error()

            setattr(target, name, fail)
            self._saved.append((target, name))

    def clear(self) -> None:
        while self._saved:
            target, name = self._saved.pop()
            delattr(target, name)  # the instance attribute hid the class's method


@pytest.fixture
def signed_app(
    runner: Runner, tmp_path: Path, jobforge_stub: JobForgeStub
) -> Iterator[tuple[Flask, JobForgeStub]]:
    app = runner.create_app(
        {
            "RUNNERKIT_JOBFORGE_URL": jobforge_stub.url,
            "RUNNERKIT_STATE_DIR": str(tmp_path / "state"),
            "RUNNERKIT_SIGNING_SECRET": SECRET,
        }
    )
    try:
        yield app, jobforge_stub
    finally:
        runner.close()


def _post(client: FlaskClient, body: dict[str, Any], asynchronous: bool) -> Any:
    raw = json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **sign(raw, SECRET)}
    if asynchronous:
        headers["Prefer"] = "respond-async"
    return client.post("/execute", data=raw, headers=headers)


def _leftovers(runner: Runner) -> str:
    """ "" when no slot, job lock or in-flight job is left; else what is."""
    state = runner.state
    held = {
        "slots": state.slots.total_in_use(),
        "job locks": len(state.ledger.running._mine),
        "in flight": runner.executor.in_flight,
    }
    return "" if not any(held.values()) else f"still held: {held}"


def _state_check(client: FlaskClient) -> dict[str, Any]:
    response = client.get("/health/ready")
    (item,) = [c for c in response.get_json()["checks"] if c["name"] == "state"]
    item["http"] = response.status_code
    return item


def _result_of(stub: JobForgeStub, job_id: str) -> dict[str, Any] | None:
    found = [r.body for r in stub.results() if r.body.get("jobId") == job_id]
    return found[-1] if found else None


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    point=st.sampled_from(sorted(FAULT_POINTS)),
    error=st.sampled_from(sorted(ERRORS)),
    asynchronous=st.booleans(),
)
def test_a_storage_fault_at_any_ledger_call_gives_back_what_it_took(
    signed_app: tuple[Flask, JobForgeStub],
    runner: Runner,
    point: str,
    error: str,
    asynchronous: bool,
) -> None:
    app, stub = signed_app
    client = app.test_client()
    if point in ASYNC_ONLY and not asynchronous:
        asynchronous = True
    faults = Faults(runner.state)
    body = request_body("echo", {"message": "disk"})
    job_id = body["jobId"]
    faults.inject(point, ERRORS[error])
    try:
        response = _post(client, body, asynchronous)
        # An accepted asynchronous job takes its slot and runs on a thread of its own.
        answered_later = asynchronous and point in ("slot", "start", "complete")
        if answered_later:
            assert response.status_code == 202, response.get_json()
            wait_until(lambda: _result_of(stub, job_id), 10, "the async job's result")
            wait_until(lambda: not _leftovers(runner), 5, lambda: _leftovers(runner))
            result = _result_of(stub, job_id)
            assert result is not None
            assert_execution_response(result)
            if point != "complete":
                assert result["error"]["category"] == "SERVICE_UNAVAILABLE", result
                assert result["error"]["code"] == "STATE_UNAVAILABLE", result
                assert result["error"]["retryable"] is True
            else:  # what was computed reaches JobForge though it could not be stored
                assert result["success"] is True, result
        elif point == "complete":
            assert response.status_code == 200, response.get_json()
            assert response.get_json()["data"]["message"] == "disk"
        else:
            envelope = assert_failure(response, 503, "SERVICE_UNAVAILABLE")
            assert envelope["code"] == "STATE_UNAVAILABLE", envelope
            assert envelope["retryable"] is True
            assert response.headers["Retry-After"] == "1"
            assert "Traceback" not in response.get_data(as_text=True)
        # A stored answer's job lock is freed once the journal is folded, a few ms later.
        wait_until(lambda: not _leftovers(runner), 5, lambda: _leftovers(runner))
        state = _state_check(client)
        assert state["status"] == "unhealthy" and state["http"] == 503, state
        health = client.get("/health")
        assert health.status_code == 503, health.get_json()
    finally:
        faults.clear()

    # Space is back: the same job is not "already running" and runs; readiness recovers.
    again = _post(client, body, False)
    assert again.status_code == 200, again.get_json()
    assert again.get_json()["success"] is True
    wait_until(lambda: not _leftovers(runner), 5, lambda: _leftovers(runner))
    wait_until(lambda: _state_check(client)["status"] == "healthy", 5, "readiness to recover")


def test_readiness_recovers_without_traffic_once_writes_work(
    signed_app: tuple[Flask, JobForgeStub], runner: Runner
) -> None:
    """The worker's housekeeping probes with a tiny write while the state is marked
    unwritable, so readiness comes back by itself once space is freed."""
    app, _ = signed_app
    client = app.test_client()
    faults = Faults(runner.state)
    faults.inject("first_sight", ERRORS["sqlite-full"])
    try:
        assert _post(client, request_body("echo"), False).status_code == 503
        assert _state_check(client)["status"] == "unhealthy"
        assert Path(runner.state.storage.marker).exists()
    finally:
        faults.clear()
    wait_until(lambda: _state_check(client)["status"] == "healthy", 5, "readiness to recover")
    assert not Path(runner.state.storage.marker).exists()


def test_a_stale_running_row_of_a_live_worker_is_a_new_attempt(
    runner: Runner, tmp_path: Path, jobforge_stub: JobForgeStub
) -> None:
    """An async job's row stays ``running`` when its answer could not be written (disk full);
    its job lock is free, so a redelivery runs it as a new attempt instead of 409 for ever."""
    app = runner.create_app(
        {"RUNNERKIT_JOBFORGE_URL": jobforge_stub.url, "RUNNERKIT_STATE_DIR": str(tmp_path / "s")}
    )
    client = app.test_client()
    try:
        faults = Faults(runner.state)
        body = request_body("echo")
        faults.inject("complete", ERRORS["enospc"])
        try:
            accepted = client.post("/execute", json=body, headers={"Prefer": "respond-async"})
            assert accepted.status_code == 202
            wait_until(lambda: _result_of(jobforge_stub, body["jobId"]), 10, "the result")
            wait_until(lambda: not _leftovers(runner), 5, lambda: _leftovers(runner))
        finally:
            faults.clear()
        again = client.post("/execute", json=body)
        assert again.status_code == 200, again.get_json()
    finally:
        runner.close()
