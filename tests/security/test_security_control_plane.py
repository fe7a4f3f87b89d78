"""The forge and real runners under gunicorn, with a bearer token and signed execution requests.

One stack for the module: a forge (2 workers) with RUNNERKIT_FORGE_TOKEN and
RUNNERKIT_FORGE_SIGNING_SECRET, and three runners:

- ``good`` (app:app): the right token and the same signing secret;
- ``other-secret`` (tests.security.echo_app): the right token, a different signing secret;
- ``wrong-token`` (app:app): a wrong RUNNERKIT_RUNNER_TOKEN.

What it proves: a runner with the token registers and heartbeats (one with a wrong token never
gets in); signed jobs complete end to end; a runner whose secret differs answers 401 and the
job fails at once with AUTHENTICATION_ERROR (not retried: the envelope is not retryable, and
the contract lists the category as non-retryable), without the capability running.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from runnerkit.errors import should_retry
from runnerkit.service.signing import sign
from tests.forge.helpers import job_request, valid
from tests.security.stack import QUICK, Stack, failure_envelope
from tests.support import GunicornProcess
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

TOKEN = "cp-token-5a0d2c7e"
SECRET = "cp-signing-secret-0f3b9a"
OTHER_SECRET = "cp-another-secret-77d1"
AUTH = {"Authorization": f"Bearer {TOKEN}"}

#: The contract's default RetryPolicy, with its category lists.
CONTRACT_POLICY = {
    "maxRetries": 3,
    "backoffMs": 1000,
    "maxBackoffMs": 30000,
    "backoffMultiplier": 2,
    "retryableCategories": ["TIMEOUT", "NETWORK_ERROR", "SERVICE_UNAVAILABLE", "RUNTIME_ERROR"],
    "nonRetryableCategories": [
        "VALIDATION_ERROR",
        "SCHEMA_MISMATCH",
        "AUTHENTICATION_ERROR",
        "AUTHORIZATION_ERROR",
        "RESOURCE_NOT_FOUND",
    ],
}


class ControlPlane:
    stacks: list[Stack]

    def __init__(self, stack: Stack, forge: GunicornProcess, runners: dict[str, GunicornProcess]):
        self.stacks = [stack]
        self.forge = forge
        self.runners = runners
        self.session = requests.Session()
        self.session.headers.update(AUTH)  # every forge route but /health needs the token

    def registered(self) -> dict[str, dict[str, Any]]:
        """RunnerMetadata by health URL, as the forge lists it (with the token)."""
        response = self.session.get(
            self.forge.url + "/runners", headers=AUTH, params={"limit": 100}, timeout=QUICK
        )
        assert response.status_code == 200, response.text
        return {r["healthCheckEndpoint"]: r for r in response.json()["items"]}

    def submit(self, request: dict[str, Any]) -> str:
        response = self.session.post(self.forge.url + "/jobs", json=request, timeout=QUICK)
        assert response.status_code == 202, response.text
        job_id: str = response.json()["id"]
        return job_id

    def job(self, job_id: str) -> dict[str, Any]:
        response = self.session.get(f"{self.forge.url}/jobs/{job_id}", timeout=QUICK)
        assert response.status_code == 200, response.text
        return valid("JobResponse", response.json())

    def wait_final(self, job_id: str, timeout: float = 20.0) -> dict[str, Any]:
        def final() -> dict[str, Any] | None:
            job = self.job(job_id)
            return job if job["status"] in ("completed", "failed", "cancelled") else None

        job: dict[str, Any] = wait_until(final, timeout, f"job {job_id} to finish")
        return job

    def events(self, job_id: str) -> list[dict[str, Any]]:
        response = self.session.get(
            f"{self.forge.url}/jobs/{job_id}/events", headers=AUTH, timeout=QUICK
        )
        assert response.status_code == 200, response.text
        items: list[dict[str, Any]] = response.json()["items"]
        return items


def health_url(proc: GunicornProcess) -> str:
    return f"{proc.url}/health"


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    stack = Stack(tmp_path_factory.mktemp("control-plane"))
    try:
        forge = stack.forge(
            Path(stack.base_dir) / "forge.sqlite3",
            settings={"TOKEN": TOKEN, "SIGNING_SECRET": SECRET},
        )
        common = {"RUNNERKIT_HEARTBEAT_INTERVAL_MS": "1000"}
        runners = {
            "good": stack.runner(
                workers=2,
                jobforge_url=forge.url,
                env={
                    **common,
                    "RUNNERKIT_RUNNER_TOKEN": TOKEN,
                    "RUNNERKIT_SIGNING_SECRET": SECRET,
                },
            ),
            "other-secret": stack.runner(
                "tests.security.echo_app:app",
                workers=1,
                jobforge_url=forge.url,
                env={
                    **common,
                    "RUNNERKIT_RUNNER_TOKEN": TOKEN,
                    "RUNNERKIT_SIGNING_SECRET": OTHER_SECRET,
                },
            ),
            "wrong-token": stack.runner(
                workers=1,
                jobforge_url=forge.url,
                env={
                    **common,
                    "RUNNERKIT_RUNNER_TOKEN": "not-" + TOKEN,
                    "RUNNERKIT_SIGNING_SECRET": SECRET,
                },
            ),
        }
        plane = ControlPlane(stack, forge, runners)
        wanted = {health_url(runners["good"]), health_url(runners["other-secret"])}
        wait_until(lambda: wanted <= set(plane.registered()), 20, "both runners to register")
        yield plane
        plane.session.close()
    finally:
        stack.stop()


def test_a_runner_with_the_token_registers_and_heartbeats(plane: ControlPlane) -> None:
    good = plane.runners["good"]
    first = plane.registered()[health_url(good)]
    assert first["status"] == "healthy"
    assert [c["id"] for c in first["capabilities"]] == ["text-stats", "checksum", "slow-count"]

    def heartbeat_after() -> bool:
        latest = plane.registered()[health_url(good)]
        return bool(latest["lastHeartbeatAt"] > first["lastHeartbeatAt"])

    # The forge asks for a heartbeat every second; the runner's must arrive, token and all.
    wait_until(heartbeat_after, 8, "a heartbeat from the runner")
    ready = requests.get(good.url + "/health/ready", timeout=QUICK)
    assert ready.status_code == 200, ready.text
    assert "refused" not in good.log_text()


def test_a_runner_with_a_wrong_token_is_refused_and_says_so(plane: ControlPlane) -> None:
    intruder = plane.runners["wrong-token"]

    def refused() -> bool:
        return "JobForge refused the registration (401" in intruder.log_text()

    wait_until(refused, 10, "the wrong-token runner to log the refusal")
    assert health_url(intruder) not in plane.registered()
    ready = requests.get(intruder.url + "/health/ready", timeout=QUICK)
    assert ready.status_code == 503
    checks = {c["name"]: c for c in ready.json()["checks"]}
    assert checks["registration"]["status"] == "unhealthy"
    # The runner logs the refusal, never the token it sent.
    assert TOKEN not in intruder.log_text()


def test_signed_jobs_complete_end_to_end(plane: ControlPlane) -> None:
    texts = ["one two two", "Hello, world. Again!", "ünïcödé 🚀 text"]
    job_ids = [plane.submit(job_request("text.stats", data={"text": t})) for t in texts]
    for job_id, text in zip(job_ids, texts, strict=True):
        job = plane.wait_final(job_id)
        assert job["status"] == "completed", json.dumps(job, indent=1)
        assert job["result"]["success"] is True
        assert job["result"]["data"]["characters"] == len(text)
        assert job["result"]["metadata"]["attempts"] == 1
    log = plane.runners["good"].log_text()
    for job_id in job_ids:
        lines = [json.loads(x) for x in log.splitlines() if job_id in x and x.startswith("{")]
        assert any(x.get("outcome") == "success" for x in lines), log[-3000:]


@pytest.mark.parametrize(
    "policy",
    [
        pytest.param(None, id="no-policy"),
        pytest.param(CONTRACT_POLICY, id="contract-default-lists"),
        pytest.param(
            {"maxRetries": 3, "backoffMs": 10, "retryableCategories": ["AUTHENTICATION_ERROR"]},
            id="category-listed-retryable",
        ),
    ],
)
def test_a_runner_with_another_secret_answers_401_and_the_job_fails_unretried(
    plane: ControlPlane, policy: dict[str, Any] | None
) -> None:
    job_id = plane.submit(
        job_request("test.echo", data={"message": "hi"}, retry_policy=policy, timeout_ms=5000)
    )
    job = plane.wait_final(job_id)
    assert job["status"] == "failed", json.dumps(job, indent=1)
    error = job["error"]
    assert error["category"] == "AUTHENTICATION_ERROR", error
    assert error["code"] == "SIGNATURE_INVALID", error
    assert error["retryable"] is False
    assert job["result"]["metadata"]["attempts"] == 1
    types = [e["type"] for e in plane.events(job_id)]
    assert "job.retrying" not in types and types.count("job.started") == 1, types
    # Contract-consistent: not retryable by its flag, and by category under the default lists.
    assert should_retry(error, job["request"]["retryPolicy"]) is False
    assert should_retry({**error, "retryable": True}, CONTRACT_POLICY) is False
    # The runner refused before parsing: the capability never ran.
    log = plane.runners["other-secret"].log_text()
    assert "echo received its payload" not in log
    refusals = [
        json.loads(x)
        for x in log.splitlines()
        if x.startswith("{") and json.loads(x).get("outcome") == "AUTHENTICATION_ERROR"
    ]
    assert refusals, log[-3000:]
    assert SECRET not in log and OTHER_SECRET not in log


def test_the_signed_runner_refuses_unsigned_and_missigned_requests(plane: ControlPlane) -> None:
    good = plane.runners["good"]
    body = {
        "jobId": str(uuid.uuid4()),
        "moduleId": "m",
        "capabilityId": "text-stats",
        "payload": {"text": "a b"},
    }
    raw = json.dumps(body).encode()
    plain = {"Content-Type": "application/json"}
    cases = {
        "unsigned (a bearer token is no substitute)": {**plain, **AUTH},
        "another secret": {**plain, **sign(raw, OTHER_SECRET)},
        "too old": {**plain, **sign(raw, SECRET, timestamp_ms=int((time.time() - 600) * 1000))},
        "no timestamp": {
            **plain,
            **{k: v for k, v in sign(raw, SECRET).items() if k != "x-webhook-timestamp"},
        },
    }
    for name, headers in cases.items():
        response = requests.post(good.url + "/execute", data=raw, headers=headers, timeout=QUICK)
        assert response.status_code == 401, (name, response.text)
        assert failure_envelope(response)["category"] == "AUTHENTICATION_ERROR", name
    signed = {**plain, **sign(raw, SECRET)}
    response = requests.post(good.url + "/execute", data=raw, headers=signed, timeout=QUICK)
    assert response.status_code == 200, response.text
    assert response.json()["data"]["words"] == 2
