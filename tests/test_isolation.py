"""Process isolation (``isolation = "process"``): real forks, real kills.

A capability that ignores its deadline is killed with everything it started, its slot is
free at the deadline, and whatever ``run`` returns or raises comes back from the child as it
would from a thread.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from flask.testing import FlaskClient
from marshmallow import Schema, fields

from runnerkit import Capability, Context, Runner
from runnerkit.runner.capability import CapabilityDefinitionError, Progress
from runnerkit.runner.isolation import run_isolated
from tests.helpers import (
    Echo,
    assert_execution_response,
    assert_failure,
    post_execute,
    strict_json,
)
from tests.integration.isolated_app import CAPABILITIES, Failing, Stubborn, Where, stubborn_pids
from tests.support import running
from tests.support.waiting import wait_until


@pytest.fixture
def isolated(tmp_path: Path) -> FlaskClient:
    runner = Runner("isolated-runner", version="1.0.0", capabilities=CAPABILITIES)
    app = runner.create_app(
        {"RUNNERKIT_JOBFORGE_URL": "", "RUNNERKIT_STATE_DIR": str(tmp_path / "state")}
    )
    return app.test_client()


def _context(capability: Capability, timeout_ms: float, seen: list[Progress]) -> Context:
    return Context(
        job_id="550e8400-e29b-41d4-a716-446655440000",
        capability_id=capability.id,
        correlation_id="7d444840-9dc0-11d1-b245-5ffdce74fad2",
        timeout_ms=timeout_ms,
        on_progress=seen.append,
    )


def test_a_job_runs_in_a_child_of_the_worker_and_its_answer_comes_back(
    isolated: FlaskClient,
) -> None:
    response = post_execute(isolated, "where", {})

    assert response.status_code == 200, response.get_data(as_text=True)
    body = assert_execution_response(strict_json(response))
    assert body["data"]["parentPid"] == os.getpid()
    assert body["data"]["pid"] != os.getpid()
    assert not psutil.pid_exists(body["data"]["pid"]), "the child was not reaped"


def test_progress_reported_in_the_child_reaches_the_workers_context() -> None:
    seen: list[Progress] = []
    ctx = _context(Where(), 5_000, seen)

    result = run_isolated(Where(), {}, ctx)

    assert result["parentPid"] == os.getpid()
    assert [(p.percent, p.message) for p in seen] == [(50.0, "halfway")]
    assert [(p.percent, p.message) for p in ctx.progress_updates()] == [(50.0, "halfway")]


def test_a_job_that_ignores_its_deadline_is_killed_with_what_it_started(
    isolated: FlaskClient, tmp_path: Path
) -> None:
    pid_file = tmp_path / "pids"
    started = time.monotonic()

    response = post_execute(isolated, "stubborn", {"pidFile": str(pid_file)})

    elapsed = time.monotonic() - started
    envelope = assert_failure(response, 504, "TIMEOUT")
    assert envelope["retryable"] is True
    assert elapsed < 5.0, f"answered after {elapsed:.1f} s, not at the 0.4 s deadline"
    child, sleeper = stubborn_pids(pid_file)
    assert not psutil.pid_exists(child), "the child was not killed and reaped"
    # The sleep's parent is gone: once killed it waits, a zombie, for its new parent.
    wait_until(
        lambda: not running(sleeper),
        timeout=5.0,
        message=lambda: f"the child's own process {sleeper} still runs",
    )


def test_the_slot_of_a_killed_job_is_free_at_once(isolated: FlaskClient, tmp_path: Path) -> None:
    """maxConcurrency 1: with a thread the stubborn code would keep its slot for 30 s."""
    assert Stubborn.max_concurrency == 1
    first = post_execute(isolated, "stubborn", {"pidFile": str(tmp_path / "first")})
    assert first.status_code == 504

    second = post_execute(isolated, "stubborn", {"pidFile": str(tmp_path / "second")})

    # Another TIMEOUT (it ran, and was killed too), not 429 CAPACITY_EXCEEDED.
    assert second.status_code == 504, second.get_data(as_text=True)
    assert (tmp_path / "second").exists(), "the second job never ran"


def test_a_runner_error_raised_in_the_child_keeps_its_status_code_and_details(
    isolated: FlaskClient,
) -> None:
    response = post_execute(isolated, "failing", {"how": "runner-error"})

    envelope = assert_failure(response, 400, "VALIDATION_ERROR")
    assert envelope["code"] == "TEXT_TOO_SHORT"
    assert envelope["message"] == "the text is too short"
    assert envelope["details"] == [
        {"message": "at least 3 characters", "path": ["payload", "text"]}
    ]


def test_an_exception_pickle_cannot_carry_still_comes_back_named(isolated: FlaskClient) -> None:
    response = post_execute(isolated, "failing", {"how": "unpicklable"})

    envelope = assert_failure(response, 500, "RUNTIME_ERROR")
    assert envelope["retryable"] is True


@pytest.mark.parametrize(
    ("how", "ended"), [("exit", "exited with code 3"), ("kill", "was killed by SIGKILL")]
)
def test_a_child_that_dies_without_an_answer_is_a_runtime_error(how: str, ended: str) -> None:
    seen: list[Progress] = []
    with pytest.raises(RuntimeError, match=ended):
        run_isolated(Failing(), {"how": how}, _context(Failing(), 5_000, seen))


def test_a_child_that_dies_is_answered_500_retryable(isolated: FlaskClient) -> None:
    response = post_execute(isolated, "failing", {"how": "kill"})

    envelope = assert_failure(response, 500, "RUNTIME_ERROR")
    assert envelope["retryable"] is True


def test_isolation_must_be_one_of_the_modes() -> None:
    with pytest.raises(CapabilityDefinitionError, match=r"Bad\.isolation"):

        class Bad(Where):
            id = "bad"
            isolation = "container"

    assert Where.isolation == "process"
    assert Capability.isolation == "thread"


def test_a_thread_capability_still_runs_in_the_worker(client: FlaskClient) -> None:
    """The default is unchanged: no fork for a capability that does not ask for one (a run
    in a child would leave this process's call counter as it was)."""
    before = Echo.calls

    response = post_execute(client, "echo", {"message": "hi"})

    assert response.status_code == 200
    assert Echo.calls == before + 1


def _run_stubborn(pid_file: str) -> None:
    ctx = _context(Stubborn(), 60_000, [])
    run_isolated(Stubborn(), {"pidFile": pid_file}, ctx)


def test_a_job_process_dies_with_its_worker(tmp_path: Path) -> None:
    """A SIGKILLed worker cannot kill its jobs: the kernel does (PR_SET_PDEATHSIG)."""
    pid_file = tmp_path / "pids"
    worker = multiprocessing.get_context("fork").Process(
        target=_run_stubborn, args=(str(pid_file),), daemon=True
    )
    worker.start()
    child, _sleeper = stubborn_pids(pid_file)
    assert running(child)

    os.kill(worker.pid or 0, signal.SIGKILL)
    worker.join(10)

    wait_until(lambda: not running(child), timeout=5.0, message=f"job process {child} lives on")


# -- isolation = "inline": on the request's own thread ---------------------------------------


class Inline(Capability):
    """Answers the thread it ran on; sleeps ``ms`` first."""

    id = "inline"
    job_types = ["isolated.inline"]
    max_concurrency = 1
    timeout_ms = 300
    isolation = "inline"

    class Input(Schema):
        ms = fields.Integer(required=True)

    class Output(Schema):
        thread = fields.Integer(required=True)

    def run(self, payload: dict[str, Any], ctx: Context) -> dict[str, Any]:
        time.sleep(payload["ms"] / 1000.0)
        return {"thread": threading.get_ident()}


@pytest.fixture
def inline(tmp_path: Path) -> FlaskClient:
    runner = Runner("inline-runner", version="1.0.0", capabilities=[Inline()])
    app = runner.create_app(
        {"RUNNERKIT_JOBFORGE_URL": "", "RUNNERKIT_STATE_DIR": str(tmp_path / "state")}
    )
    return app.test_client()


def test_an_inline_job_runs_on_the_request_thread(inline: FlaskClient) -> None:
    response = post_execute(inline, "inline", {"ms": 0})

    assert response.status_code == 200, response.get_data(as_text=True)
    assert strict_json(response)["data"]["thread"] == threading.get_ident()


def test_an_inline_job_that_overruns_is_answered_timeout_when_it_returns(
    inline: FlaskClient,
) -> None:
    started = time.monotonic()
    late = post_execute(inline, "inline", {"ms": 600})
    elapsed = time.monotonic() - started

    envelope = assert_failure(late, 504, "TIMEOUT")
    assert envelope["code"] == "DEADLINE_EXCEEDED"
    assert elapsed >= 0.6, "inline code cannot be answered for before it returns"
    # Its slot (maxConcurrency 1) was given back with the answer.
    assert post_execute(inline, "inline", {"ms": 0}).status_code == 200


def test_a_job_process_holds_no_copy_of_the_workers_connections(tmp_path: Path) -> None:
    """A connection the worker closes is closed for its client at once, job running or not.

    Otherwise the child's copy would keep it open: a client reusing it from a keep-alive
    pool would send a request nobody reads, and wait for its timeout.
    """
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname(), timeout=5)
        served, _ = listener.accept()  # the worker's end of a client's connection
    pid_file = tmp_path / "pids"
    errors: list[BaseException] = []

    def job() -> None:
        try:
            run_isolated(Stubborn(), {"pidFile": str(pid_file)}, _context(Stubborn(), 60_000, []))
        except BaseException as exc:  # noqa: BLE001 - inspected below
            errors.append(exc)

    worker = threading.Thread(target=job)
    worker.start()
    child, _sleeper = stubborn_pids(pid_file)
    try:
        served.close()  # the worker is done with this connection

        client.settimeout(3.0)
        assert client.recv(1) == b"", "the client did not see the connection close"
    finally:
        client.close()
        os.kill(child, signal.SIGKILL)
        worker.join(10)
    assert errors and "was killed by SIGKILL" in str(errors[0])
