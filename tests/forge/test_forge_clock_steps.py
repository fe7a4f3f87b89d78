"""A step of the system clock under a real forge: gunicorn, 2 workers, a real SQLite file.

The forge's processes start with ``tests/support/clock_step`` on their path, so their
``time.time()`` is the real time plus an offset the test writes to a file (the machine's
clock is left alone; ``time.monotonic()`` does not move, as in a real step). Runners are
:class:`~tests.forge.helpers.FakeRunner` servers in this process, on the real clock.

- a forward step must not make runners look silent (offline, their jobs requeued) nor
  expire every lease;
- a backward step must not stop the housekeeping: a silent runner still goes offline and
  an attempt whose lease passed is still retried, after their own intervals.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.forge.helpers import (
    Call,
    FakeRunner,
    ForgeHTTP,
    Reply,
    capability,
    envelope,
    job_request,
    valid,
)
from tests.support import REPO_ROOT, GunicornProcess
from tests.support.waiting import wait_until

CLOCK_STEP_PATH = REPO_ROOT / "tests" / "support" / "clock_step"
#: A loaded machine is slow; none of these waits is a measurement.
PATIENCE = 60.0


class SteppedForge(ForgeHTTP):
    """``runnerkit.forge:app`` under gunicorn (2 workers) whose wall clock the test steps."""

    def __init__(self, root: Path, **settings: Any) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.db_path = root / "forge.sqlite3"
        self.offset_file = root / "clock-offset"
        self.offset_file.write_text("0")
        env: dict[str, str | None] = {
            "PYTHONPATH": str(CLOCK_STEP_PATH),
            "RUNNERKIT_TEST_CLOCK_OFFSET": str(self.offset_file),
            "RUNNERKIT_FORGE_DB_PATH": str(self.db_path),
            "RUNNERKIT_FORGE_POLL_INTERVAL_MS": "50",
            "RUNNERKIT_FORGE_CONNECT_TIMEOUT_MS": "2000",
            "RUNNERKIT_FORGE_TOKEN": None,
            "RUNNERKIT_FORGE_RUNNER_TOKEN": None,
            "RUNNERKIT_FORGE_SIGNING_SECRET": None,
            "WEB_CONCURRENCY": None,
        }
        env.update({f"RUNNERKIT_FORGE_{k}": str(v) for k, v in settings.items()})
        self.env = env
        self.proc = self._process(None)
        self.url = self.proc.url
        self.session = requests.Session()

    def _process(self, port: int | None) -> GunicornProcess:
        return GunicornProcess(
            "runnerkit.forge:app",
            log_dir=self.root,
            workers=2,
            port=port,
            env=self.env,
            extra_args=["--worker-class", "gthread", "--threads", "4"],
            name="forge",
        )

    def start(self) -> None:
        self.proc.start()
        self.proc.wait_ready("/health", timeout=PATIENCE)

    def restart(self, step_while_down: float) -> None:
        """Stop the forge, step its clock, start it again on the same port and database."""
        self.proc.stop(timeout=10)
        self.step(step_while_down)
        self.proc = self._process(self.proc.port)
        self.start()

    def stop(self) -> None:
        self.session.close()
        self.proc.stop(timeout=10)

    def step(self, seconds: float) -> float:
        """Set the forge's clock ``seconds`` off the real one; the real time of the step."""
        self.offset_file.write_text(repr(float(seconds)))
        return time.time()

    def runner_status(self, runner_id: str) -> str:
        response = self.get(f"/runners/{runner_id}")
        assert response.status_code == 200, response.text
        return str(valid("RunnerMetadata", response.json())["status"])

    def dispatcher_ticked(self) -> float:
        """The forge-clock time of the dispatcher's latest recorded tick (0: none yet)."""
        uri = f"file:{self.db_path}?mode=ro"
        with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=5.0)) as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = 'dispatcher'").fetchone()
        return float(json.loads(row[0])["ts"]) if row else 0.0

    def wait_ticks_after(self, real: float, offset: float, seconds: float) -> None:
        """Wait until the dispatcher has ticked ``seconds`` after the real time ``real`` (so
        its housekeeping ran then too: each tick records first, then sweeps)."""
        wait_until(
            lambda: self.dispatcher_ticked() >= real + offset + seconds,
            PATIENCE,
            lambda: f"the dispatcher stopped ticking\n{self.proc.log_tail()}",
        )


@pytest.fixture
def stepped_forge(tmp_path: Path) -> Iterator[Any]:
    forges: list[SteppedForge] = []

    def make(**settings: Any) -> SteppedForge:
        forge = SteppedForge(tmp_path / f"forge{len(forges)}", **settings)
        forges.append(forge)
        forge.start()
        return forge

    yield make
    for forge in forges:
        forge.stop()


@pytest.fixture
def runners() -> Iterator[list[FakeRunner]]:
    made: list[FakeRunner] = []
    yield made
    for runner in made:
        runner.stop()


def fail_once(fake: FakeRunner, call: Call) -> Reply:
    """Fail a job's first delivery (retryably), answer the others."""
    if len(fake.calls_for(call.body["jobId"])) == 1:
        error = envelope("RUNTIME_ERROR", "ONCE", retryable=True)
        return Reply(status=500, body=fake.failure(call, error))
    return Reply()


#: A retry 8 s after a failure, whatever the attempt.
SLOW_RETRY = {"maxRetries": 1, "backoffMs": 8000, "backoffMultiplier": 1}


def event_types(forge: SteppedForge, job_id: str) -> list[str]:
    return [e["type"] for e in forge.events(job_id)]


def test_a_forward_step_neither_silences_runners_nor_expires_leases(
    stepped_forge: Any, runners: list[FakeRunner]
) -> None:
    """The clock jumps an hour ahead while a runner runs a synchronous job and an accepted
    asynchronous one: the runner stays healthy, neither job is requeued or overdue, and both
    complete on their first attempt; a job of a type no runner takes, queued for seconds,
    is not failed as if it had waited an hour."""
    forge = stepped_forge(
        HEARTBEAT_INTERVAL_MS=3000,  # offline after 9 s of silence
        OFFLINE_AFTER_MISSED=3,
        ASYNC_THRESHOLD_MS=30_000,
        DISPATCH_MARGIN_MS=2000,
        UNMATCHED_JOB_EXPIRY_S=30,  # looked for every 7.5 s
    )
    release = threading.Event()

    def script(fake: FakeRunner, call: Call) -> Reply:
        if call.body["payload"]["how"] == "async":
            return Reply(status=202, body={"jobId": call.body["jobId"], "accepted": True})
        return Reply(hold=release)

    runner = FakeRunner("steady", [capability("cap", ["type.a"], 2)], script)
    runners.append(runner)
    runner_id = runner.register(forge.url)
    runner.start_heartbeats(0.3)
    sync_id = forge.submit(job_request("type.a", data={"how": "sync"}, timeout_ms=20_000))["id"]
    async_id = forge.submit(job_request("type.a", data={"how": "async"}, timeout_ms=60_000))["id"]
    wait_until(lambda: len(runner.calls) == 2, PATIENCE, "both jobs reached the runner")
    unmatched_id = forge.submit(job_request("type.nobody"))["id"]

    # The runner is quiet for a moment around the step (as if between two heartbeats), so
    # the forge's first look after the step finds no heartbeat newer than it.
    runner.stop_heartbeats()
    offset = 3600.0
    stepped_at = forge.step(offset)
    forge.wait_ticks_after(stepped_at, offset, 1.5)  # several sweeps on the stepped clock
    runner.start_heartbeats(0.3)
    forge.wait_ticks_after(stepped_at, offset, 2.5)

    for job_id in (sync_id, async_id):
        assert forge.job(job_id)["status"] == "running", forge.events(job_id)
        assert "job.retrying" not in event_types(forge, job_id)
        assert len(runner.calls_for(job_id)) == 1
    assert forge.runner_status(runner_id) == "healthy"
    assert "is offline" not in forge.proc.log_text()

    release.set()
    (async_call,) = runner.calls_for(async_id)
    assert runner.post_result(runner.success(async_call)).status_code == 200
    for job_id in (sync_id, async_id):
        done = forge.wait_status(job_id, "completed", "failed", timeout=PATIENCE)
        assert done["status"] == "completed", done
        assert done["result"]["metadata"]["attempts"] == 1

    forge.wait_ticks_after(stepped_at, offset, 9.0)  # unmatched jobs were looked for since
    assert forge.job(unmatched_id)["status"] == "queued", forge.events(unmatched_id)


def test_a_backward_step_does_not_stop_housekeeping(
    stepped_forge: Any, runners: list[FakeRunner]
) -> None:
    """The clock jumps two minutes back: a runner that then falls silent still goes offline
    after its heartbeat window, an accepted job whose result never comes is still retried
    once its lease passes, and a retry scheduled before the step waits its own delay, not
    the step on top (all well before the two minutes are made up)."""
    forge = stepped_forge(
        HEARTBEAT_INTERVAL_MS=500,  # offline after 1.5 s of silence
        OFFLINE_AFTER_MISSED=3,
        ASYNC_THRESHOLD_MS=1000,
        DISPATCH_MARGIN_MS=500,  # an asynchronous attempt's lease: timeoutMs + 1 s
    )

    def accept_once(fake: FakeRunner, call: Call) -> Reply:
        if len(fake.calls_for(call.body["jobId"])) == 1:
            return Reply(status=202, body={"jobId": call.body["jobId"], "accepted": True})
        return Reply()  # the retry completes at once

    keeper = FakeRunner("keeper", [capability("cap", ["type.a"])], accept_once)
    leaver = FakeRunner("leaver", [capability("other", ["type.b"])])
    failer = FakeRunner("failer", [capability("again", ["type.c"])], fail_once)
    runners.extend([keeper, leaver, failer])
    keeper.register(forge.url)
    leaver_id = leaver.register(forge.url)
    failer.register(forge.url)
    for runner in runners:
        runner.start_heartbeats(0.2)
    policy = {"maxRetries": 1, "backoffMs": 100}
    job_id = forge.submit(job_request("type.a", timeout_ms=3000, retry_policy=policy))["id"]
    retry_id = forge.submit(job_request("type.c", timeout_ms=500, retry_policy=SLOW_RETRY))["id"]
    wait_until(lambda: keeper.calls_for(job_id), PATIENCE, "the job reached its runner")
    wait_until(
        lambda: forge.job(retry_id)["status"] == "retrying", PATIENCE, "the retry was scheduled"
    )

    forge.step(-120.0)
    leaver.stop_heartbeats()

    wait_until(
        lambda: forge.runner_status(leaver_id) == "offline",
        PATIENCE,
        lambda: f"the silent runner never went offline\n{forge.proc.log_tail()}",
    )
    done = forge.wait_status(job_id, "completed", "failed", timeout=PATIENCE)
    assert done["status"] == "completed", done
    assert done["result"]["metadata"]["attempts"] == 2
    retrying = [e for e in forge.events(job_id) if e["type"] == "job.retrying"]
    assert [e["data"]["error"]["code"] for e in retrying] == ["RESULT_OVERDUE"]
    retried = forge.wait_status(retry_id, "completed", "failed", timeout=PATIENCE)
    assert retried["status"] == "completed", retried
    assert retried["result"]["metadata"]["attempts"] == 2
    health = forge.get("/health").json()
    assert health["status"] == "healthy", health


def test_a_retry_keeps_its_delay_when_the_clock_stepped_back_while_the_forge_was_down(
    stepped_forge: Any, runners: list[FakeRunner]
) -> None:
    """A retry is scheduled 8 s out; the forge stops, the clock steps two minutes back, the
    forge starts again: the retry runs after about its delay, not the step on top."""
    forge = stepped_forge(HEARTBEAT_INTERVAL_MS=1000, OFFLINE_AFTER_MISSED=3)
    failer = FakeRunner("failer", [capability("again", ["type.c"])], fail_once)
    runners.append(failer)
    failer.register(forge.url)
    failer.start_heartbeats(0.2)
    job_id = forge.submit(job_request("type.c", timeout_ms=500, retry_policy=SLOW_RETRY))["id"]
    wait_until(lambda: forge.job(job_id)["status"] == "retrying", PATIENCE, "no retry scheduled")

    forge.restart(step_while_down=-120.0)

    done = forge.wait_status(job_id, "completed", "failed", timeout=PATIENCE)
    assert done["status"] == "completed", done
    assert done["result"]["metadata"]["attempts"] == 2
