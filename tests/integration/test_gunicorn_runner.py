"""The example runner served by real gunicorn (deploy/gunicorn.conf.py, 2 gthread workers).

Everything goes over real HTTP on loopback, and every answer is checked against the wire
contracts, so these tests say what a JobForge peer sees from a deployed runner.
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import http.client
import json
import os
import signal
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
import requests

from runnerkit.contracts import (
    ErrorEnvelopeSchema,
    HealthCheckSchema,
    RunnerExecutionResponseSchema,
    RunnerRegistrationRequestSchema,
    is_uuid,
)
from tests.support import GunicornProcess
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

#: (connect, read) timeout of every quick request.
QUICK = (2.0, 10.0)


def job_request(
    capability_id: str,
    payload: dict[str, Any],
    *,
    timeout_ms: float | None = None,
    correlation_id: str | None = None,
) -> dict[str, Any]:
    """A RunnerExecutionRequest as JobForge would send it."""
    body: dict[str, Any] = {
        "jobId": str(uuid.uuid4()),
        "moduleId": "example",
        "capabilityId": capability_id,
        "payload": payload,
    }
    if timeout_ms is not None:
        body["timeoutMs"] = timeout_ms
    if correlation_id is not None:
        body["metadata"] = {"correlationId": correlation_id}
    return body


def execute(proc: GunicornProcess, body: dict[str, Any], **kwargs: Any) -> requests.Response:
    kwargs.setdefault("timeout", QUICK)
    return requests.post(proc.url + "/execute", json=body, **kwargs)


def explain(response: requests.Response, proc: GunicornProcess) -> str:
    """An assertion message: the answer, then the end of the server log."""
    return (
        f"{response.request.method} {response.request.path_url} -> {response.status_code} "
        f"{response.headers.get('Content-Type')}\n{response.text[:2000]}\n{proc.log_tail()}"
    )


def execution_response(response: requests.Response, proc: GunicornProcess) -> dict[str, Any]:
    """The body as a contract-valid RunnerExecutionResponse."""
    body = response.json()
    loaded: dict[str, Any] = RunnerExecutionResponseSchema().load(body)
    assert is_uuid(loaded["runnerId"]), explain(response, proc)
    return body


def error_envelope(response: requests.Response, proc: GunicornProcess) -> dict[str, Any]:
    """The contract-valid ErrorEnvelope of a JSON error answer."""
    assert response.headers["Content-Type"].startswith("application/json"), explain(response, proc)
    body = response.json()
    assert body["success"] is False, explain(response, proc)
    ErrorEnvelopeSchema().load(body["error"])
    error: dict[str, Any] = body["error"]
    return error


# -- jobs that succeed -------------------------------------------------------------------


def test_text_stats_answers_with_the_statistics(example_runner: GunicornProcess) -> None:
    text = "Hello world. Hello again!\nBye."
    correlation_id = str(uuid.uuid4())
    body = job_request("text-stats", {"text": text, "top": 2}, correlation_id=correlation_id)

    response = execute(example_runner, body)

    assert response.status_code == 200, explain(response, example_runner)
    answer = execution_response(response, example_runner)
    assert answer["jobId"] == body["jobId"]
    assert answer["success"] is True
    assert answer["data"] == {
        "characters": len(text),
        "words": 5,
        "sentences": 3,
        "lines": 2,
        "top_words": [{"word": "hello", "count": 2}, {"word": "world", "count": 1}],
    }
    assert response.headers["X-Correlation-Id"] == correlation_id


@pytest.mark.parametrize(
    ("payload", "algorithm", "raw"),
    [
        ({"data": "runnerkit ✓"}, "sha256", "runnerkit ✓".encode()),
        (
            {
                "data": base64.b64encode(b"\x00\x01binary\xff").decode(),
                "encoding": "base64",
                "algorithm": "sha512",
            },
            "sha512",
            b"\x00\x01binary\xff",
        ),
    ],
    ids=["utf8-sha256", "base64-sha512"],
)
def test_checksum_answers_with_the_digest(
    example_runner: GunicornProcess, payload: dict[str, Any], algorithm: str, raw: bytes
) -> None:
    body = job_request("checksum", payload)

    response = execute(example_runner, body)

    assert response.status_code == 200, explain(response, example_runner)
    answer = execution_response(response, example_runner)
    assert answer["jobId"] == body["jobId"]
    assert answer["success"] is True
    assert answer["data"] == {
        "algorithm": algorithm,
        "digest": hashlib.new(algorithm, raw).hexdigest(),
        "bytes": len(raw),
    }


# -- requests that are refused -----------------------------------------------------------


def test_invalid_payload_is_400_with_paths_under_payload(example_runner: GunicornProcess) -> None:
    body = job_request("text-stats", {"text": 5, "top": 101})

    response = execute(example_runner, body)

    assert response.status_code == 400, explain(response, example_runner)
    answer = execution_response(response, example_runner)
    assert answer["jobId"] == body["jobId"]
    assert answer["success"] is False
    error = answer["error"]
    assert error["category"] == "VALIDATION_ERROR"
    assert error["retryable"] is False
    paths = [detail.get("path") for detail in error["details"]]
    assert ["payload", "text"] in paths, explain(response, example_runner)
    assert ["payload", "top"] in paths, explain(response, example_runner)
    assert all(path and path[0] == "payload" for path in paths), explain(response, example_runner)


def test_unknown_capability_is_404(example_runner: GunicornProcess) -> None:
    body = job_request("no-such-capability", {})

    response = execute(example_runner, body)

    assert response.status_code == 404, explain(response, example_runner)
    answer = execution_response(response, example_runner)
    assert answer["jobId"] == body["jobId"]
    assert answer["error"]["category"] == "RESOURCE_NOT_FOUND"
    assert answer["error"]["retryable"] is False


def test_a_body_that_is_not_json_is_refused(example_runner: GunicornProcess) -> None:
    url = example_runner.url + "/execute"
    as_text = requests.post(
        url, data=b"hello", headers={"Content-Type": "text/plain"}, timeout=QUICK
    )
    broken = requests.post(
        url, data=b'{"jobId": ', headers={"Content-Type": "application/json"}, timeout=QUICK
    )

    assert as_text.status_code == 415, explain(as_text, example_runner)
    assert error_envelope(as_text, example_runner)["category"] == "VALIDATION_ERROR"
    assert broken.status_code == 400, explain(broken, example_runner)
    assert error_envelope(broken, example_runner)["category"] == "VALIDATION_ERROR"


def test_unknown_route_and_wrong_method_are_json_envelopes(
    example_runner: GunicornProcess,
) -> None:
    missing = requests.get(example_runner.url + "/no/such/route", timeout=QUICK)
    wrong_method = requests.get(example_runner.url + "/execute", timeout=QUICK)

    assert missing.status_code == 404, explain(missing, example_runner)
    assert error_envelope(missing, example_runner)["category"] == "RESOURCE_NOT_FOUND"
    assert "<html" not in missing.text.lower()
    assert wrong_method.status_code == 405, explain(wrong_method, example_runner)
    assert error_envelope(wrong_method, example_runner)["category"] == "VALIDATION_ERROR"


# -- documents ---------------------------------------------------------------------------


def test_health_is_a_valid_health_check(example_runner: GunicornProcess) -> None:
    for path in ("/health", "/health/live", "/health/ready"):
        response = requests.get(example_runner.url + path, timeout=QUICK)

        assert response.status_code == 200, explain(response, example_runner)
        health = HealthCheckSchema().load(response.json())
        assert health["service"] == "example-runner"
        assert health["status"] == "healthy"


def test_capabilities_is_a_valid_registration_request(example_runner: GunicornProcess) -> None:
    response = requests.get(example_runner.url + "/capabilities", timeout=QUICK)

    assert response.status_code == 200, explain(response, example_runner)
    document = RunnerRegistrationRequestSchema().load(response.json())
    assert document["name"] == "example-runner"
    assert sorted(c["id"] for c in document["capabilities"]) == [
        "checksum",
        "slow-count",
        "text-stats",
    ]


# -- deadlines and busy workers ----------------------------------------------------------


#: A slow-count job that would take 30 s (3 steps of 10 s), sent with a 0.5 s deadline.
DEADLINE_PAYLOAD = {"steps": 3, "step_ms": 10_000}
DEADLINE_MS = 500
#: How many such jobs are sent: the answer at the deadline is a race in the runner (see below),
#: so one job proves little. Two at a time stays within slow-count's maxConcurrency of 4.
DEADLINE_TRIALS = 16


@dataclass
class Trial:
    body: dict[str, Any]
    response: requests.Response
    elapsed: float


@pytest.fixture(scope="module")
def deadline_trials(example_runner: GunicornProcess) -> list[Trial]:
    """Jobs past their deadline, sent two at a time; each answer with how long it took."""

    def send(_: int) -> Trial:
        body = job_request("slow-count", dict(DEADLINE_PAYLOAD), timeout_ms=DEADLINE_MS)
        started = time.monotonic()
        response = execute(example_runner, body, timeout=(2.0, 20.0))
        return Trial(body, response, time.monotonic() - started)

    trials: list[Trial] = []
    with ThreadPoolExecutor(max_workers=2) as pool:
        for _ in range(DEADLINE_TRIALS // 2):
            trials += pool.map(send, range(2))
    return trials


def test_a_job_past_its_deadline_is_answered_at_the_deadline(
    example_runner: GunicornProcess, deadline_trials: list[Trial]
) -> None:
    for trial in deadline_trials:
        response = trial.response
        assert response.status_code == 504, explain(response, example_runner)
        assert trial.elapsed < 5.0, (
            f"answered after {trial.elapsed:.2f}s\n{explain(response, example_runner)}"
        )
        answer = execution_response(response, example_runner)
        assert answer["jobId"] == trial.body["jobId"]
        assert answer["executionTimeMs"] >= DEADLINE_MS * 0.9, explain(response, example_runner)
        assert answer["success"] is False


def test_a_job_past_its_deadline_is_always_answered_504_timeout(
    example_runner: GunicornProcess, deadline_trials: list[Trial]
) -> None:
    statuses = [t.response.status_code for t in deadline_trials]
    odd = next((t.response for t in deadline_trials if t.response.status_code != 504), None)
    assert odd is None, f"statuses {statuses}\n{explain(odd, example_runner)}"
    for trial in deadline_trials:
        error = execution_response(trial.response, example_runner)["error"]
        assert error["category"] == "TIMEOUT"
        assert error["retryable"] is True


@dataclass
class InFlight:
    """One ``POST /execute`` running in its own thread on its own connection."""

    body: dict[str, Any]
    client_port: int
    thread: threading.Thread
    status: int | None = None
    answer: Any = None
    error: Exception | None = None
    finished_at: float | None = None

    @property
    def finished(self) -> bool:
        return self.finished_at is not None


def send_in_background(proc: GunicornProcess, body: dict[str, Any], timeout: float) -> InFlight:
    """Start a job request; http.client, so the client port (hence the worker) is known."""
    conn = http.client.HTTPConnection(proc.host, proc.port, timeout=timeout)
    conn.connect()

    def run() -> None:
        try:
            conn.request("POST", "/execute", json.dumps(body), {"Content-Type": "application/json"})
            response = conn.getresponse()
            job.status = response.status
            job.answer = json.loads(response.read())
        except (OSError, http.client.HTTPException, ValueError) as exc:
            job.error = exc
        finally:
            conn.close()
            job.finished_at = time.monotonic()

    job = InFlight(body, conn.sock.getsockname()[1], threading.Thread(target=run, daemon=True))
    job.thread.start()
    return job


def test_health_answers_promptly_while_every_worker_is_busy(
    start_gunicorn: Any,
) -> None:
    # 4 threads per worker, 2 kept for health (RUNNERKIT_RESERVED_THREADS): 2 jobs per worker.
    proc: GunicornProcess = start_gunicorn(env={"GUNICORN_THREADS": "4"}, all_workers=True)
    per_worker = 2
    workers = proc.worker_pids()
    assert len(workers) == 2, proc.log_tail()
    steps, step_ms = 40, 250  # a 10 s job, long enough to outlast the checks below
    running: dict[int, list[InFlight]] = {pid: [] for pid in workers}
    refused: list[InFlight] = []
    everything: list[InFlight] = []

    try:
        # Fill every worker's job threads; gunicorn decides which worker takes a connection,
        # so send jobs one by one and see, from the worker's sockets, who holds each one.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            for pid, jobs in running.items():
                refused += [j for j in jobs if j.finished]
                running[pid] = [j for j in jobs if not j.finished]
            if all(len(jobs) >= per_worker for jobs in running.values()):
                break
            body = job_request("slow-count", {"steps": steps, "step_ms": step_ms})
            job = send_in_background(proc, body, timeout=40)
            everything.append(job)
            job.thread.join(0.4)
            if job.finished:
                refused.append(job)
                continue
            holder = proc.worker_for_client_port(job.client_port)
            assert holder in running, f"job held by {holder}, workers {workers}\n{proc.log_tail()}"
            running[holder].append(job)
        counts = {pid: len(jobs) for pid, jobs in running.items()}
        assert all(n == per_worker for n in counts.values()), (
            f"jobs per worker {counts}, refused {[(j.status, j.answer) for j in refused]}\n"
            f"{proc.log_tail()}"
        )
        assert all(j.status in (503, 429) for j in refused), [(j.status, j.answer) for j in refused]

        # Every worker is full: whichever worker takes one more job refuses it.
        for _ in range(2):
            extra = execute(proc, job_request("slow-count", {"steps": 1}), timeout=(2.0, 5.0))
            assert extra.status_code in (503, 429), explain(extra, proc)
            error = execution_response(extra, proc)["error"]
            assert error["retryable"] is True
            assert "Retry-After" in extra.headers, explain(extra, proc)
            if extra.status_code == 503:
                assert error["code"] == "WORKER_BUSY", explain(extra, proc)

        timings = []
        for _ in range(10):
            started = time.monotonic()
            health = requests.get(proc.url + "/health", timeout=(2.0, 2.0))
            timings.append(round(time.monotonic() - started, 3))
            assert health.status_code == 200, explain(health, proc)
            HealthCheckSchema().load(health.json())
        assert max(timings) < 2.0, f"/health took {timings} s\n{proc.log_tail()}"
        still_running = [j for jobs in running.values() for j in jobs if not j.finished]
        assert len(still_running) == per_worker * len(workers), (
            f"jobs ended before the health checks did\n{proc.log_tail()}"
        )

        for job in still_running:
            job.thread.join(timeout=30)
            assert job.status == 200, f"{job.status} {job.answer} {job.error}\n{proc.log_tail()}"
            assert job.answer["data"] == {"completed_steps": steps, "cancelled": False}
    finally:
        proc.stop(timeout=10)
        for job in everything:
            job.thread.join(timeout=5)


def test_a_worker_has_a_thread_for_every_job_its_capabilities_advertise(
    start_gunicorn: Any, tmp_path: Path
) -> None:
    # nap advertises maxConcurrency 10; one worker; GUNICORN_THREADS unset, so the worker sizes
    # its threads to the capabilities (10 + stubborn's 2 + 2 reserved) instead of gunicorn's 8,
    # which left 6 for jobs and refused the rest as 503 WORKER_BUSY. Its 8 core threads are
    # all taken by naps: the other two get threads of their own as soon as the queue stalls.
    runs = tmp_path / "runs.jsonl"
    proc: GunicornProcess = start_gunicorn(
        app_spec="tests.faults.apps.fault_runner:app",
        workers=1,
        env={"FAULT_NAP_SLOTS": "10", "GUNICORN_THREADS": None, "E2E_EXEC_LOG": str(runs)},
    )
    naps = [
        send_in_background(proc, job_request("nap", {"ms": 3000}), timeout=60) for _ in range(10)
    ]
    try:
        # The reserved threads are still free for health checks while the naps run.
        health = requests.get(proc.url + "/health/live", timeout=(5.0, 30.0))
        assert health.status_code == 200, explain(health, proc)
    finally:
        for job in naps:
            job.thread.join(timeout=60)
    answers = [(job.status, job.answer, job.error) for job in naps]
    assert all(status == 200 for status, _, _ in answers), f"{answers}\n{proc.log_tail()}"
    # All ten ran at once: every nap started before the first one ended.
    events = [json.loads(line)["event"] for line in runs.read_text().splitlines()]
    assert events[:10] == ["start"] * 10 and events[10:] == ["end"] * 10, events


def test_gunicorn_pin_workers_puts_each_worker_on_its_own_cpu(start_gunicorn: Any) -> None:
    allowed = set(psutil.Process().cpu_affinity() or [])
    proc: GunicornProcess = start_gunicorn(env={"GUNICORN_PIN_WORKERS": "1"}, all_workers=True)

    pinned = [psutil.Process(pid).cpu_affinity() for pid in proc.worker_pids()]

    assert len(pinned) == 2, proc.log_tail()
    assert all(len(cpus) == 1 and set(cpus) <= allowed for cpus in pinned), pinned
    if len(allowed) >= 2:
        assert pinned[0] != pinned[1], pinned
    assert psutil.Process(proc.master_pid).cpu_affinity() == sorted(allowed)
    response = requests.post(
        f"{proc.url}/execute",
        json=job_request("text-stats", {"text": "pinned"}),
        timeout=QUICK,
    )
    assert response.status_code == 200, response.text


def test_workers_keep_every_cpu_by_default(example_runner: GunicornProcess) -> None:
    allowed = sorted(psutil.Process().cpu_affinity() or [])

    for pid in example_runner.worker_pids():
        assert psutil.Process(pid).cpu_affinity() == allowed


def test_plain_gunicorn_advertises_the_port_it_listens_on(start_gunicorn: Any) -> None:
    # `gunicorn app:app --bind ...` without PORT: the app learns its port from the listener.
    proc: GunicornProcess = start_gunicorn(config=None, env={"PORT": None, "RUNNERKIT_PORT": None})
    response = requests.get(proc.url + "/capabilities", timeout=QUICK)

    assert response.status_code == 200, explain(response, proc)
    assert response.json()["healthCheckEndpoint"] == f"http://127.0.0.1:{proc.port}/health"


def test_an_explicit_port_wins_over_the_listener(start_gunicorn: Any) -> None:
    proc: GunicornProcess = start_gunicorn(
        config=None, env={"PORT": None, "RUNNERKIT_PORT": "4321"}
    )
    response = requests.get(proc.url + "/capabilities", timeout=QUICK)

    assert response.status_code == 200, explain(response, proc)
    assert response.json()["healthCheckEndpoint"] == "http://127.0.0.1:4321/health"


def test_the_product_gunicorn_config_opens_no_control_socket(
    start_gunicorn: Any, tmp_path: Path
) -> None:
    # gunicorn 25.1+ would open ~/.gunicorn/gunicorn.ctl, shared by every gunicorn of a user.
    home = tmp_path / "home"
    home.mkdir()
    proc: GunicornProcess = start_gunicorn(env={"HOME": str(home)}, control_socket=True)
    assert "--no-control-socket" not in proc.command()
    response = requests.get(proc.url + "/health/live", timeout=QUICK)
    assert response.status_code == 200
    assert list(home.rglob("*")) == []
    assert "control socket" not in proc.log_text().lower()


def test_the_forge_command_opens_no_control_socket() -> None:
    from gunicorn.config import KNOWN_SETTINGS

    from runnerkit.forge.serving import gunicorn_argv

    has_socket = any(s.name == "control_socket_disable" for s in KNOWN_SETTINGS)
    assert ("--no-control-socket" in gunicorn_argv("127.0.0.1:1")) is has_socket


def _raw_exchange(proc: GunicornProcess, head: bytes, body: bytes, *, half_close: bool) -> bytes:
    """Send ``head`` + ``body`` on a fresh connection; the whole answer (until close)."""
    import socket

    with socket.create_connection((proc.host, proc.port), timeout=10) as sock:
        sock.sendall(head + body)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        return _read_answer(sock)


def _read_answer(sock: Any) -> bytes:
    """One whole HTTP answer (headers, then Content-Length bytes) from ``sock``."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        (
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        ),
        0,
    )
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


def _status_and_json(answer: bytes) -> tuple[int, dict[str, Any]]:
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body.decode()) if body.strip() else {}


def test_a_malformed_chunked_body_is_a_400_envelope(example_runner: GunicornProcess) -> None:
    head = (
        b"POST /execute HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )
    answer = _raw_exchange(example_runner, head, b"zz\r\nabc\r\n0\r\n\r\n", half_close=False)
    status, body = _status_and_json(answer)
    assert status == 400, answer[:500]
    assert body["error"]["category"] == "VALIDATION_ERROR"
    assert body["error"]["code"] == "BODY_UNREADABLE"


def test_a_body_shorter_than_its_content_length_is_refused_not_run(
    example_runner: GunicornProcess,
) -> None:
    raw = json.dumps(job_request("text-stats", {"text": "cut short"})).encode()
    head = (
        b"POST /execute HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(raw) + 50}\r\nConnection: close\r\n\r\n".encode()
    )
    answer = _raw_exchange(example_runner, head, raw, half_close=True)
    status, body = _status_and_json(answer)
    assert status == 400, answer[:500]
    assert body["error"]["code"] == "BODY_TRUNCATED"


def test_a_client_that_stalls_mid_body_is_answered_and_frees_its_thread(
    start_gunicorn: Any,
) -> None:
    import socket

    proc: GunicornProcess = start_gunicorn(
        env={"RUNNERKIT_CLIENT_IDLE_TIMEOUT_S": "0.5", "GUNICORN_THREADS": "3"}, workers=1
    )
    head = (
        b"POST /execute HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100\r\n\r\n{"
    )
    stalled = []
    for _ in range(3):  # as many as the worker has threads
        sock = socket.create_connection((proc.host, proc.port), timeout=10)
        sock.sendall(head)
        stalled.append(sock)
    try:
        for sock in stalled:
            answer = _read_answer(sock)
            status, body = _status_and_json(answer)
            assert status == 400, answer[:300]
            assert body["error"]["code"] == "BODY_UNREADABLE"
        # Every thread is free again.
        response = requests.get(proc.url + "/health/live", timeout=QUICK)
        assert response.status_code == 200
    finally:
        for sock in stalled:
            sock.close()


@pytest.mark.parametrize(
    ("request_bytes", "status", "code"),
    [
        (b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, "URI_TOO_LONG"),
        (b"GET /health HTTP/1.1\r\nHost: x\r\nBad Header: 1\r\n\r\n", 400, "BAD_REQUEST"),
        (b"GET /health HTTP/9.9\r\nHost: x\r\n\r\n", 400, "BAD_REQUEST"),
        (
            b"GET /health HTTP/1.1\r\nHost: x\r\n"
            + b"".join(b"X-H%d: v\r\n" % i for i in range(150))
            + b"\r\n",
            431,
            "HEADERS_TOO_LARGE",
        ),
    ],
    ids=["uri-too-long", "bad-header-name", "bad-version", "too-many-headers"],
)
def test_requests_gunicorn_refuses_itself_get_an_envelope_not_a_page(
    example_runner: GunicornProcess, request_bytes: bytes, status: int, code: str
) -> None:
    import socket

    with socket.create_connection((example_runner.host, example_runner.port), timeout=10) as sock:
        sock.sendall(request_bytes)
        answer = _read_answer(sock)
    got, body = _status_and_json(answer)
    assert got == status, answer[:300]
    assert b"content-type: application/json" in answer.lower()
    error = ErrorEnvelopeSchema().load(body["error"])
    assert error["code"] == code and error["service"] == "example-runner"
    assert error["timestamp"].endswith("Z") and body["success"] is False


def test_the_forge_served_as_runnerkit_forge_serves_it_answers_envelopes_too(
    start_gunicorn: Any, tmp_path: Path
) -> None:
    import socket

    from runnerkit.forge.serving import OPTIONS

    forge: GunicornProcess = start_gunicorn(
        app_spec="runnerkit.forge:app",
        config=None,
        workers=1,
        extra_args=list(OPTIONS),
        env={"RUNNERKIT_FORGE_DB_PATH": str(tmp_path / "forge.sqlite3")},
        ready_path="/health",
    )
    with socket.create_connection((forge.host, forge.port), timeout=10) as sock:
        sock.sendall(b"GET /" + b"j" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = _read_answer(sock)
    status, body = _status_and_json(answer)
    assert status == 414, answer[:300]
    error = ErrorEnvelopeSchema().load(body["error"])
    assert error["code"] == "URI_TOO_LONG" and error["service"] == "jobforge"


def test_clients_that_stall_mid_headers_are_dropped_and_health_answers(
    start_gunicorn: Any,
) -> None:
    import socket

    proc: GunicornProcess = start_gunicorn(
        env={"RUNNERKIT_CLIENT_IDLE_TIMEOUT_S": "0.5", "GUNICORN_THREADS": "3"}, workers=1
    )
    stalled = []
    for _ in range(6):  # twice as many as the worker has threads
        sock = socket.create_connection((proc.host, proc.port), timeout=10)
        sock.sendall(b"POST /execute HTTP/1.1\r\nHost: x\r\n")  # and never the rest
        stalled.append(sock)
    try:
        for sock in stalled:
            assert sock.recv(65536) == b""  # closed by the worker, not by this 10 s timeout
        response = requests.get(proc.url + "/health/live", timeout=QUICK)
        assert response.status_code == 200
    finally:
        for sock in stalled:
            sock.close()


def test_a_hung_health_check_does_not_hold_shutdown(start_gunicorn: Any) -> None:
    # The graceful timeout is long, as in production: only the worker's own exit ends it early.
    proc = start_gunicorn(
        app_spec="tests.integration.hung_health_app:app",
        workers=1,
        env={"GUNICORN_GRACEFUL_TIMEOUT": "60", "RUNNERKIT_HEALTH_CHECK_TIMEOUT_MS": "300"},
    )
    health = requests.get(proc.url + "/health", timeout=10)
    assert health.status_code == 503
    stuck = [c for c in health.json()["checks"] if c["name"] == "stuck-dependency"]
    assert stuck and stuck[0]["status"] == "unhealthy", health.json()

    proc.signal(signal.SIGTERM)

    # The check sleeps 60 s; a worker that waited for it would still be alive long after this.
    assert proc.wait_exit(timeout=20) == 0, proc.log_tail()


def test_workers_tell_the_arbiter_they_live_though_less_often_than_each_turn(
    start_gunicorn: Any,
) -> None:
    """The worker class tells the arbiter it lives at most every half second (a tenth of
    the timeout when shorter), idle or busy: with a 2 s timeout the arbiter keeps them."""
    proc = start_gunicorn(
        app_spec="bench.apps.flask_app:app",
        config=None,
        extra_args=["--worker-class", "runnerkit.gunicorn_worker.ThreadWorker", "--timeout", "2"],
        all_workers=True,
    )
    workers = sorted(proc.worker_pids())
    time.sleep(3)  # idle, past the timeout
    with requests.Session() as session:
        until = time.monotonic() + 3  # busy, past it again
        while time.monotonic() < until:
            assert session.get(proc.url + "/health/live", timeout=10).status_code == 200
    assert sorted(proc.worker_pids()) == workers, proc.log_tail()
    assert "WORKER TIMEOUT" not in proc.log_tail()


def test_workers_whose_arbiter_died_exit_and_answers_carry_the_date(
    start_gunicorn: Any,
) -> None:
    """The worker looks for a changed arbiter every half second, not at every turn of its
    loop, and still leaves once its arbiter is gone. Every answer's Date header (made once a
    second) is the current time in the HTTP format."""
    proc = start_gunicorn(
        app_spec="bench.apps.flask_app:app",
        config=None,
        extra_args=["--worker-class", "runnerkit.gunicorn_worker.ThreadWorker"],
        all_workers=True,
    )
    with requests.Session() as session:
        for _ in range(3):
            before = time.time()
            answer = session.get(proc.url + "/health/live", timeout=10)
            after = time.time()
            stamped = email.utils.parsedate_to_datetime(answer.headers["Date"]).timestamp()
            assert int(before) <= stamped <= after, (before, answer.headers["Date"], after)
            assert answer.headers["Date"].endswith(" GMT")
            time.sleep(0.6)
    workers = proc.worker_pids()
    os.kill(proc.master_pid, signal.SIGKILL)
    wait_until(
        lambda: not any(_alive(pid) for pid in workers),
        30,
        lambda: f"workers outlived their arbiter\n{proc.log_tail()}",
    )


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_every_log_line_is_one_json_object_gunicorn_lines_included(start_gunicorn: Any) -> None:
    proc = start_gunicorn(all_workers=True)
    requests.post(proc.url + "/execute", data=b"{", timeout=5)  # a 400, logged by the runner
    assert proc.stop(timeout=15) == 0

    lines = [line for line in proc.log_text().splitlines() if line.strip()]
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            pytest.fail(f"not a JSON line: {line!r}")
    gunicorn = [r for r in records if r.get("component") == "gunicorn.error"]
    messages = " | ".join(r["message"] for r in gunicorn)
    assert "Listening at" in messages and "Booting worker" in messages, messages
    assert any("Shutting down" in r["message"] for r in gunicorn), messages
    # Once the app is loaded, a worker's gunicorn lines name the runner.
    assert {r["service"] for r in records} <= {"gunicorn", "example-runner"}
    assert any(r["service"] == "example-runner" for r in gunicorn), gunicorn


def test_plain_gunicorn_app_app_serves_with_the_runners_settings(start_gunicorn: Any) -> None:
    # No -c: gunicorn reads ./gunicorn.conf.py, which is deploy/gunicorn.conf.py.
    proc = start_gunicorn(config=None, workers=1)
    log = proc.log_text()
    assert "Using worker: runnerkit.gunicorn_worker.ThreadWorker" in log, log[-2000:]
    assert "worker class" not in log and "GUNICORN_TIMEOUT" not in log, log[-2000:]
    refused = requests.post(
        proc.url + "/execute", data=b"{", headers={"Content-Type": "application/json"}, timeout=5
    )
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "INVALID_JSON"


@pytest.mark.parametrize(
    ("args", "says"),
    [
        # (with more than one thread gunicorn itself turns sync into gthread)
        (
            ["--worker-class", "sync", "--threads", "1"],
            "--worker-class runnerkit.gunicorn_worker.ThreadWorker",
        ),
        (["--timeout", "5"], "raise GUNICORN_TIMEOUT (--timeout)"),
        (["--threads", "2"], "raise GUNICORN_THREADS (--threads)"),
    ],
)
def test_gunicorn_settings_that_break_a_promise_are_named_at_startup(
    start_gunicorn: Any, args: list[str], says: str
) -> None:
    proc = start_gunicorn(config=None, workers=1, extra_args=args)
    lines = [line for line in proc.log_text().splitlines() if says in line]
    assert len(lines) == 1, proc.log_text()[-3000:]
    assert json.loads(lines[0])["level"] == "error"
