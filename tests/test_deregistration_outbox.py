"""Deregistration after a drain that could not deliver everything (issue item 5): the one
DELETE still goes out, with one warning naming how many outbox rows were left."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from runnerkit.runner.deregistration import deregister_instance, undelivered
from runnerkit.runner.jobforge import JobForgeClient
from runnerkit.runner.outbox import Outbox
from runnerkit.runner.statefiles import write_json_atomic
from tests.support import JobForgeStub


def test_deregistration_warns_once_with_the_count_of_undelivered_outbox_rows(
    tmp_path: Path, runnerkit_caplog: pytest.LogCaptureFixture
) -> None:
    stub = JobForgeStub().start()
    try:
        key, runner_id = "4243@1.00", "0b0d6a4e-54a4-4a83-9f3b-3b8ad39a4c56"
        write_json_atomic(
            str(tmp_path / "instance.json"), {"instance": key, "jobforgeUrl": stub.url}
        )
        write_json_atomic(str(tmp_path / "identity.json"), {"instance": key, "runnerId": runner_id})
        assert undelivered(str(tmp_path)) == 0  # no outbox file yet
        outbox = Outbox(str(tmp_path / "ledger.sqlite3"), JobForgeClient(stub.url))
        for n in range(2):
            outbox.add("event", f"{stub.url}/jobs/j/events", {"n": n})
        assert undelivered(str(tmp_path)) == 2

        assert deregister_instance(str(tmp_path), key, lock_timeout_s=1.0)
        warnings = [
            r.getMessage() for r in runnerkit_caplog.records if r.levelno == logging.WARNING
        ]
        assert len(warnings) == 1, warnings
        assert "2 outbox message(s)" in warnings[0]
        assert [d.path for d in stub.deletes()] == [f"/runners/{runner_id}"]
    finally:
        stub.stop()


def test_deregistration_after_a_full_delivery_says_nothing_of_the_outbox(
    tmp_path: Path, runnerkit_caplog: pytest.LogCaptureFixture
) -> None:
    stub = JobForgeStub().start()
    try:
        key, runner_id = "4244@1.00", "6f3c8a40-0d9b-4f43-8a44-3c07f8bfb0a1"
        write_json_atomic(
            str(tmp_path / "instance.json"), {"instance": key, "jobforgeUrl": stub.url}
        )
        write_json_atomic(str(tmp_path / "identity.json"), {"instance": key, "runnerId": runner_id})
        outbox = Outbox(str(tmp_path / "ledger.sqlite3"), JobForgeClient(stub.url))
        assert outbox.add("event", f"{stub.url}/jobs/j/events", {"n": 1}, send_now=True)
        assert deregister_instance(str(tmp_path), key, lock_timeout_s=1.0)
        assert not [r for r in runnerkit_caplog.records if r.levelno >= logging.WARNING]
    finally:
        stub.stop()
