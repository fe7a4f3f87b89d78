"""What one caller can make the forge store or read: bodies, unmatched jobs, runners' answers.

A real forge under gunicorn (2 workers) on its own SQLite file:

- request bodies over MAX_BODY_BYTES (1 MiB by default) are 413 envelopes and store nothing;
- a job of a type no registered runner lists fails after UNMATCHED_JOB_EXPIRY_S with
  RESOURCE_NOT_FOUND / NO_RUNNER_FOR_TYPE, while a job some runner lists keeps waiting;
- a runner answering 20 MB to ``POST /execute`` (with a Content-Length, or without one and
  closing the connection) fails the attempt with RUNNER_ERROR / ANSWER_TOO_LARGE, unretried,
  and no forge worker's peak RSS grows by anything like the answer.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests

from runnerkit.contracts import utc_now
from tests.forge.helpers import FakeRunner, Reply, capability, job_request, new_id, registration
from tests.security.stack import QUICK, Stack, failure_envelope
from tests.support import GunicornProcess
from tests.support.waiting import wait_until

MIB = 1024 * 1024
#: A runner's answer in the issue was 300 MB; 20 MB is plenty to show it is not read.
HUGE = 20_000_000
#: The cap these tests set (the default is 16 MiB).
ANSWER_CAP = MIB


@pytest.fixture(scope="module")
def forge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GunicornProcess]:
    stack = Stack(tmp_path_factory.mktemp("limits"))
    try:
        yield stack.forge(
            Path(stack.base_dir) / "forge.sqlite3",
            settings={
                "UNMATCHED_JOB_EXPIRY_S": "1",
                "MAX_ANSWER_BYTES": str(ANSWER_CAP),
                "HEARTBEAT_INTERVAL_MS": "60000",
            },
        )
    finally:
        stack.stop()


def _assertion(size: int) -> dict[str, Any]:
    return {
        "id": new_id(),
        "subject": "disk",
        "predicate": "filler",
        "object": "x" * size,
        "confidence": 1,
        "source": "attacker",
        "timestamp": utc_now(),
        "metadata": {},
    }


def _db_bytes(forge: GunicornProcess) -> int:
    db = Path(forge.env_overrides["RUNNERKIT_FORGE_DB_PATH"] or "")
    return sum(p.stat().st_size for p in db.parent.glob(db.name + "*") if p.is_file())


def test_bodies_over_one_mib_are_413_and_store_nothing(forge: GunicornProcess) -> None:
    before = _db_bytes(forge)
    big = 2 * MIB
    job = job_request("nobody.serves.this", data={"blob": "x" * big})
    for path, body in (("/assert", _assertion(big)), ("/jobs", job), ("/query", {"x": "y" * big})):
        for _ in range(5):
            response = requests.post(f"{forge.url}{path}", json=body, timeout=(2, 30))
            assert response.status_code == 413, (path, response.status_code, response.text[:300])
            assert failure_envelope(response)["category"] == "VALIDATION_ERROR"
    assert _db_bytes(forge) - before < MIB  # 15 bodies of 2 MiB left no trace
    fits = requests.post(f"{forge.url}/assert", json=_assertion(MIB // 2), timeout=QUICK)
    assert fits.status_code == 201, fits.text


def test_a_job_no_runner_can_take_fails_with_the_reason(forge: GunicornProcess) -> None:
    # A runner listing "kept.type" is registered (at a URL the forge never calls), so a job of
    # that type waits for it; nobody lists "orphan.type".
    listed = registration("lister", "unix:///nowhere/health", [capability("c", ["kept.type"])])
    assert requests.post(f"{forge.url}/runners/register", json=listed).status_code == 201
    kept = requests.post(f"{forge.url}/jobs", json=job_request("kept.type")).json()["id"]
    orphan = requests.post(f"{forge.url}/jobs", json=job_request("orphan.type")).json()["id"]

    def failed() -> dict[str, Any] | None:
        job: dict[str, Any] = requests.get(f"{forge.url}/jobs/{orphan}", timeout=QUICK).json()
        return job if job["status"] != "queued" else None

    job = wait_until(failed, 15, "the orphan job to fail")
    assert job["status"] == "failed", job
    assert job["error"]["category"] == "RESOURCE_NOT_FOUND"
    assert job["error"]["code"] == "NO_RUNNER_FOR_TYPE"
    assert "orphan.type" in job["error"]["message"]
    assert job["error"]["retryable"] is False
    assert requests.get(f"{forge.url}/jobs/{kept}", timeout=QUICK).json()["status"] == "queued"


# --------------------------------------------------------------------------- answers


def _peak_rss(pid: int) -> int:
    """The process's peak resident set (VmHWM), bytes."""
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


class _NoLength(BaseHTTPRequestHandler):
    """A runner that answers HUGE bytes with no Content-Length, ending by closing."""

    protocol_version = "HTTP/1.0"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        chunk = b"x" * MIB
        try:
            self.wfile.write(b'{"success":true,"data":"')
            for _ in range(HUGE // MIB):
                self.wfile.write(chunk)
            self.wfile.write(b'"}')
        except OSError:
            pass  # the forge stopped reading: that is the point


def _job_for(forge: GunicornProcess, job_type: str) -> dict[str, Any]:
    body = job_request(
        job_type,
        timeout_ms=5_000,
        retry_policy={"maxRetries": 3, "backoffMs": 10, "retryableCategories": ["RUNNER_ERROR"]},
    )
    response = requests.post(f"{forge.url}/jobs", json=body, timeout=QUICK)
    assert response.status_code == 202, response.text

    def final() -> dict[str, Any] | None:
        job: dict[str, Any] = requests.get(f"{forge.url}/jobs/{body['id']}", timeout=QUICK).json()
        return job if job["status"] in ("completed", "failed") else None

    job: dict[str, Any] = wait_until(final, 30, f"job {body['id']} to finish")
    return job


def test_huge_answers_fail_the_attempt_unread(forge: GunicornProcess) -> None:
    workers = forge.worker_pids()
    assert len(workers) == 2
    peaks = {pid: _peak_rss(pid) for pid in workers}
    blob = "y" * HUGE

    def answer(fake: FakeRunner, call: Any) -> Reply:
        if call.body["payload"].get("small"):
            return Reply()  # a normal answer on the same runner
        return Reply(body={"success": True, "data": {"blob": blob}})

    fake = FakeRunner("huge", [capability("c", ["huge.answer"], 4)], answer)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _NoLength)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        fake.register(forge.url)
        bare = registration(
            "no-length",
            f"http://127.0.0.1:{server.server_address[1]}/health",
            [capability("c", ["huge.unsized"])],
        )
        assert requests.post(f"{forge.url}/runners/register", json=bare).status_code == 201
        for job_type in ("huge.answer", "huge.unsized"):
            job = _job_for(forge, job_type)
            assert job["status"] == "failed", json.dumps(job)[:2000]
            error = job["error"]
            assert (error["category"], error["code"]) == ("RUNNER_ERROR", "ANSWER_TOO_LARGE")
            assert error["retryable"] is False
            assert job["result"]["metadata"]["attempts"] == 1  # not retried
            assert f"{ANSWER_CAP}" in error["message"]
        small = job_request("huge.answer", data={"small": True}, timeout_ms=5_000)
        requests.post(f"{forge.url}/jobs", json=small, timeout=QUICK)
        done = wait_until(
            lambda: (lambda j: j if j["status"] in ("completed", "failed") else None)(
                requests.get(f"{forge.url}/jobs/{small['id']}", timeout=QUICK).json()
            ),
            30,
            "the small job",
        )
        assert done["status"] == "completed", done
    finally:
        fake.stop()
        server.shutdown()
        server.server_close()
    # Neither worker read the answers: its peak RSS grew by far less than one of them.
    for pid in workers:
        assert os.path.exists(f"/proc/{pid}")
        grown = _peak_rss(pid) - peaks[pid]
        assert grown < 12 * MIB, (pid, grown)


# --------------------------------------------------------------------------- targets


def test_an_allow_list_without_loopback_refuses_a_real_runner(stack: Stack) -> None:
    forge = stack.forge(
        Path(stack.base_dir) / "forge.sqlite3",
        settings={"ALLOWED_RUNNER_NETWORKS": "10.0.0.0/8"},
    )
    runner = stack.runner(workers=1, jobforge_url=forge.url)

    def refused() -> bool:
        return "JobForge refused the registration (400 RUNNER_ADDRESS_REFUSED" in (
            runner.log_text()
        )

    wait_until(refused, 20, "the runner to log the refusal")
    assert requests.get(f"{forge.url}/runners", timeout=QUICK).json()["total"] == 0
    direct = requests.post(
        f"{forge.url}/runners/register",
        json=registration("r", f"{runner.url}/health", [capability("c", ["t"])]),
        timeout=QUICK,
    )
    error = failure_envelope(direct)
    assert direct.status_code == 400 and error["code"] == "RUNNER_ADDRESS_REFUSED"
    assert error["details"][0]["path"] == ["healthCheckEndpoint"]
