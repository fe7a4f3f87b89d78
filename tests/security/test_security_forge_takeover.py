"""The takeover of a forge by whoever reaches it, replayed against real processes.

A forge under gunicorn (2 workers, every job sent asynchronously, so results come back on
``POST /jobs/<id>/result`` through the runner's outbox) and the example runner (``app:app``)
under its gunicorn config. The attacker has what the issue's attacker had: the forge's address,
the real runner's capability document and its runner id. It tries to register a look-alike
runner pointing at its own server, to evict the real runner with ``DELETE /runners/<id>``
and to post forged results naming the real runner. Every attempt is refused, the attacker's
server never hears from the forge, and each job ends with the real runner's result.

Two forges: one with RUNNERKIT_FORGE_TOKEN (the attacker has no credential at all) and one
without (loopback only: the attacker is a local process that registered a runner of its own,
so it holds a runnerToken, just not the real runner's).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import stat
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.forge.helpers import capability, heartbeat, job_request, registration
from tests.security.stack import QUICK, Stack, failure_envelope
from tests.support import GunicornProcess, JobForgeStub
from tests.support.waiting import wait_until

TOKEN = "takeover-token-3e9d1c7a"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SECRET = "takeover-signing-secret-b41f"


class Trap:
    """The attacker's server: records every request the forge might send it."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        trap = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _record(self) -> None:
                trap.calls.append(f"{self.command} {self.path}")
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_POST = _record

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Plane:
    """A forge, the real runner registered with it, and the attacker's trap."""

    def __init__(self, forge: GunicornProcess, runner: GunicornProcess, auth: dict[str, str]):
        self.forge = forge
        self.runner = runner
        self.auth = auth  # what the operator (the test) uses to look
        self.trap = Trap()
        self.runner_id = ""
        self.document: dict[str, Any] = {}

    def runners(self) -> list[dict[str, Any]]:
        response = requests.get(f"{self.forge.url}/runners", headers=self.auth, timeout=QUICK)
        assert response.status_code == 200, response.text
        items: list[dict[str, Any]] = response.json()["items"]
        return items

    def submit(self, steps: int) -> str:
        body = job_request("demo.slow", data={"steps": steps, "step_ms": 150}, timeout_ms=20_000)
        response = requests.post(
            f"{self.forge.url}/jobs", json=body, headers=self.auth, timeout=QUICK
        )
        assert response.status_code == 202, response.text
        job_id: str = response.json()["id"]
        return job_id

    def job(self, job_id: str) -> dict[str, Any]:
        response = requests.get(f"{self.forge.url}/jobs/{job_id}", headers=self.auth, timeout=QUICK)
        assert response.status_code == 200, response.text
        job: dict[str, Any] = response.json()
        return job

    def wait_status(self, job_id: str, *statuses: str, timeout: float = 30.0) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            job = self.job(job_id)
            return job if job["status"] in statuses else None

        job: dict[str, Any] = wait_until(reached, timeout, f"job {job_id} to be {statuses}")
        return job


def _plane(stack: Stack, settings: dict[str, str], runner_env: dict[str, str]) -> Plane:
    forge = stack.forge(
        Path(stack.base_dir) / "forge.sqlite3",
        settings={"ASYNC_THRESHOLD_MS": "0", "SIGNING_SECRET": SECRET, **settings},
    )
    runner = stack.runner(
        workers=2,
        jobforge_url=forge.url,
        env={
            "RUNNERKIT_HEARTBEAT_INTERVAL_MS": "1000",
            "RUNNERKIT_SIGNING_SECRET": SECRET,
            **runner_env,
        },
    )
    plane = Plane(forge, runner, AUTH if settings.get("TOKEN") else {})

    def registered() -> bool:
        items = plane.runners()
        if len(items) != 1:
            return False
        plane.runner_id = items[0]["id"]
        plane.document = items[0]
        return True

    wait_until(registered, 20, "the real runner to register")
    return plane


@pytest.fixture(scope="module")
def token_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Plane]:
    stack = Stack(tmp_path_factory.mktemp("takeover-token"))
    plane = None
    try:
        plane = _plane(stack, {"TOKEN": TOKEN}, {"RUNNERKIT_RUNNER_TOKEN": TOKEN})
        yield plane
    finally:
        if plane is not None:
            plane.trap.close()
        stack.stop()


@pytest.fixture(scope="module")
def loopback_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Plane]:
    stack = Stack(tmp_path_factory.mktemp("takeover-loopback"))
    plane = None
    try:
        plane = _plane(stack, {}, {})
        yield plane
    finally:
        if plane is not None:
            plane.trap.close()
        stack.stop()


def _copied_registration(plane: Plane) -> dict[str, Any]:
    """The real runner's capability document, pointing at the attacker's server."""
    stolen = plane.document
    copied = registration(stolen["name"], f"{plane.trap.url}/health", stolen["capabilities"])
    copied["version"] = stolen["version"]
    return copied


def _forged_result(plane: Plane, job_id: str) -> dict[str, Any]:
    return {
        "jobId": job_id,
        "success": True,
        "data": {"completed_steps": 999_999, "cancelled": False},
        "executionTimeMs": 1,
        "runnerId": plane.runner_id,  # public, and no proof of anything
    }


def _attack_results(plane: Plane, job_ids: list[str], headers: dict[str, str]) -> None:
    for job_id in job_ids:
        plane.wait_status(job_id, "running")
        for _ in range(3):
            forged = requests.post(
                f"{plane.forge.url}/jobs/{job_id}/result",
                json=_forged_result(plane, job_id),
                headers=headers,
                timeout=QUICK,
            )
            assert forged.status_code in (401, 403), forged.text
            failure_envelope(forged)


def _real_results_win(plane: Plane, job_ids: list[str], steps: int) -> None:
    for job_id in job_ids:
        job = plane.wait_status(job_id, "completed", "failed", "cancelled")
        assert job["status"] == "completed", json.dumps(job, indent=1)
        assert job["result"]["data"] == {"completed_steps": steps, "cancelled": False}
        assert job["result"]["metadata"]["runnerId"] == plane.runner_id
    assert [r["id"] for r in plane.runners()] == [plane.runner_id]
    assert plane.trap.calls == []


def test_an_attacker_without_credentials_cannot_take_over(token_plane: Plane) -> None:
    plane = token_plane
    forge = plane.forge.url
    # 1. A look-alike runner at the attacker's address: refused, nothing registered.
    for headers in ({}, {"Authorization": "Bearer guess"}):
        fake = requests.post(
            f"{forge}/runners/register",
            json=_copied_registration(plane),
            headers=headers,
            timeout=QUICK,
        )
        assert fake.status_code == 401, fake.text
        assert failure_envelope(fake)["category"] == "AUTHENTICATION_ERROR"
    # Nor can it read the runner list, the jobs or TruthCore.
    for path in ("/runners", "/jobs"):
        assert requests.get(f"{forge}{path}", timeout=QUICK).status_code == 401
    steps = 8
    job_ids = [plane.submit(steps) for _ in range(3)]
    # 2. Evicting the real runner, again and again.
    for _ in range(5):
        evict = requests.delete(f"{forge}/runners/{plane.runner_id}", timeout=QUICK)
        assert evict.status_code == 401, evict.text
    # 3. Forged results naming the real runner, while its jobs run.
    _attack_results(plane, job_ids, {})
    _attack_results(plane, job_ids[:1], {"Authorization": "Bearer guess"})
    _real_results_win(plane, job_ids, steps)
    # The runner's own calls went through with its own credential: progress events arrived.
    events = requests.get(f"{forge}/jobs/{job_ids[0]}/events", headers=AUTH, timeout=QUICK)
    assert "job.progress" in {e["type"] for e in events.json()["items"]}


def test_a_local_runner_cannot_speak_for_another(loopback_plane: Plane) -> None:
    plane = loopback_plane
    forge = plane.forge.url
    # Without a token a loopback process may register a runner of its own (for another type,
    # so no job goes to it); its credential is its own, not the real runner's.
    own = registration("intruder", f"{plane.trap.url}/health", [capability("x", ["other.type"])])
    answer = requests.post(f"{forge}/runners/register", json=own, timeout=QUICK)
    assert answer.status_code == 201, answer.text
    intruder = {"Authorization": f"Bearer {answer.json()['runnerToken']}"}
    steps = 6
    job_ids = [plane.submit(steps) for _ in range(2)]
    for _ in range(3):
        evict = requests.delete(
            f"{forge}/runners/{plane.runner_id}", headers=intruder, timeout=QUICK
        )
        assert evict.status_code == 403, evict.text
        assert failure_envelope(evict)["code"] == "NOT_YOUR_RUNNER"
        beat = requests.post(
            f"{forge}/runners/heartbeat",
            json=heartbeat(plane.runner_id, "unhealthy"),
            headers=intruder,
            timeout=QUICK,
        )
        assert beat.status_code == 403, beat.text
    _attack_results(plane, job_ids, intruder)
    _attack_results(plane, job_ids[:1], {})
    requests.delete(f"{forge}/runners/{answer.json()['runnerId']}", headers=intruder)
    _real_results_win(plane, job_ids, steps)


# --------------------------------------------------------------------------- the runner's side


def test_the_runner_keeps_its_credential_private(token_plane: Plane) -> None:
    """identity.json (mode 0600) holds the runnerToken the forge gave; the forge only its hash."""
    state = Path(token_plane.runner.log_path).parent
    (identity_path,) = list(state.rglob("identity.json"))
    assert stat.S_IMODE(identity_path.stat().st_mode) == 0o600
    identity = json.loads(identity_path.read_text())
    assert identity["runnerId"] == token_plane.runner_id
    runner_token = identity["runnerToken"]
    db_path = token_plane.forge.env_overrides["RUNNERKIT_FORGE_DB_PATH"] or ""
    with sqlite3.connect(db_path) as conn:
        (stored,) = conn.execute(
            "SELECT token_hash FROM runners WHERE id = ?", (token_plane.runner_id,)
        ).fetchone()
    conn.close()
    assert stored == hashlib.sha256(runner_token.encode()).hexdigest()
    assert runner_token not in token_plane.runner.log_text()


def test_with_a_jobforge_that_gives_no_credential_the_shared_token_is_sent(stack: Stack) -> None:
    """An older JobForge answers registration without runnerToken: heartbeats keep the
    shared RUNNERKIT_RUNNER_TOKEN."""
    stub = JobForgeStub(heartbeat_interval_ms=500).start()
    try:
        stack.runner(
            workers=1, jobforge_url=stub.url, env={"RUNNERKIT_RUNNER_TOKEN": "shared-secret-1"}
        )
        wait_until(lambda: len(stub.heartbeats()) >= 2, 20, "two heartbeats")
        for call in stub.registrations() + stub.heartbeats():
            assert call.headers["Authorization"] == "Bearer shared-secret-1", call
    finally:
        stub.stop()


def test_a_stopped_runner_deregisters_itself_with_its_credential(stack: Stack) -> None:
    """Loopback only, no shared token: only the runner's own runnerToken can deregister it."""
    forge = stack.forge(Path(stack.base_dir) / "forge.sqlite3")
    runner = stack.runner(workers=2, jobforge_url=forge.url)

    def listed() -> int:
        total: int = requests.get(f"{forge.url}/runners", timeout=QUICK).json()["total"]
        return total

    wait_until(lambda: listed() == 1, 20, "the runner to register")
    runner.stop(timeout=30)  # SIGTERM: drain, then DELETE /runners/<id> with its runnerToken
    assert listed() == 0, forge.log_text()[-3000:]
