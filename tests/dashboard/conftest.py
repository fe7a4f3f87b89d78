"""Fixtures for the dashboard tests: an API-only forge on a SQLite file in tmp_path, seeded with
runners and jobs in every interesting state through the forge's own API and job store."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from runnerkit.contracts import utc_now
from runnerkit.errors import make_envelope
from runnerkit.forge import Forge, get_forge
from runnerkit.forge import db as forge_db
from tests.dashboard.html_query import Node, parse
from tests.forge.helpers import capability, forge_app, job_request, new_id, registration

#: Values that must never reach a page: each sits under a secret-like key somewhere.
SECRETS = ("tok-SECRET-in-payload", "pw-SECRET-nested", "SECRET-in-result", "SECRET-in-event")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """A failing browser test's report gets the end of its forge's and runner's logs."""
    report = yield
    if report.failed:
        for proc in getattr(item, "gunicorn_processes", []):
            report.sections.append((f"gunicorn log :{proc.port}", proc.log_text()[-5000:]))
    return report


@pytest.fixture
def app(tmp_path: Path, forge_db_url: str) -> Iterator[Flask]:
    """The forge behind the pages, on each store (``forge_backend``: SQLite, PostgreSQL)."""
    app = forge_app(
        {
            "DB_PATH": str(tmp_path / "var" / "forge.sqlite3"),
            "DB_URL": forge_db_url,
            "DISPATCHER": False,
            "HEARTBEAT_INTERVAL_MS": 60_000,
        }
    )
    yield app
    get_forge(app).close()


@pytest.fixture
def forge(app: Flask) -> Forge:
    return get_forge(app)


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def page(client: FlaskClient, path: str, status: int = 200) -> Node:
    """GET an HTML page, check its status and type, and parse it."""
    response = client.get(path)
    assert response.status_code == status, response.get_data(as_text=True)[:2000]
    assert response.mimetype == "text/html"
    return parse(response.get_data(as_text=True))


def submit(client: FlaskClient, request: dict[str, Any]) -> str:
    response = client.post("/jobs", json=request)
    assert response.status_code == 202, response.get_json()
    return str(request["id"])


def register(client: FlaskClient, name: str, job_types: list[str], **extra: Any) -> str:
    body = registration(
        name,
        f"http://127.0.0.1:9/{name}/health",
        [capability(f"{name}-cap", job_types, max_concurrency=4)],
    )
    body.update(extra)
    response = client.post("/runners/register", json=body)
    assert response.status_code == 201, response.get_json()
    return str(response.get_json()["runnerId"])


def start(forge: Forge, job_id: str, runner_id: str) -> None:
    """Send the job to ``runner_id`` as the dispatcher would (attempt +1, status running)."""
    with forge.db.connection() as conn:
        row = forge_db.get_job(conn, job_id)
        runner = forge_db.get_runner(conn, runner_id)
        assert row is not None and runner is not None
        cap = forge.runners.metadata(runner)["capabilities"][0]["id"]
    assert forge.jobs.claim(row, runner, cap) is not None


def deliver(client: FlaskClient, job_id: str, runner_id: str, **body: Any) -> None:
    response = client.post(
        f"/jobs/{job_id}/result",
        json={"jobId": job_id, "runnerId": runner_id, "executionTimeMs": 42.0, **body},
    )
    assert response.status_code == 200, response.get_json()
    assert response.headers["X-Result-Outcome"] == "recorded"


def progress(client: FlaskClient, job_id: str, percent: float, **data: Any) -> None:
    event = {
        "id": new_id(),
        "type": "job.progress",
        "jobId": job_id,
        "timestamp": utc_now(),
        "data": {"percent": percent, "message": f"step {percent:g}", **data},
        "metadata": {"service": "alpha", "version": "1.2.3"},
    }
    response = client.post(f"/jobs/{job_id}/events", json=event)
    assert response.status_code == 202, response.get_json()


@dataclass
class Seeded:
    """What ``seeded`` made: runner ids and job ids by name, and each job's expected status."""

    runners: dict[str, str] = field(default_factory=dict)
    jobs: dict[str, str] = field(default_factory=dict)
    status: dict[str, str] = field(default_factory=dict)


@pytest.fixture
def seeded(client: FlaskClient, forge: Forge) -> Seeded:
    """Two runners (alpha healthy, beta degraded) and jobs: completed, failed, running (on
    alpha, with progress), retrying, cancelled, queued — plus secrets under secret-like keys."""
    s = Seeded()
    alpha = register(client, "alpha", ["text.stats", "demo.slow"])
    beta = register(client, "beta", ["data.checksum"])
    response = client.post(
        "/runners/heartbeat",
        json={"runnerId": beta, "timestamp": utc_now(), "status": "degraded", "activeJobs": 0},
    )
    assert response.status_code == 200
    s.runners = {"alpha": alpha, "beta": beta}

    completed = job_request(
        "text.stats",
        data={"text": "hello world", "api_token": SECRETS[0], "opts": {"password": SECRETS[1]}},
        priority=70,
    )
    s.jobs["completed"] = submit(client, completed)
    start(forge, s.jobs["completed"], alpha)
    progress(client, s.jobs["completed"], 100)
    deliver(
        client,
        s.jobs["completed"],
        alpha,
        success=True,
        data={"words": 2, "client_secret": SECRETS[2]},
    )

    s.jobs["failed"] = submit(client, job_request("text.stats", data={"text": 42}))
    start(forge, s.jobs["failed"], alpha)
    error = make_envelope(
        "VALIDATION_ERROR",
        "INVALID_PAYLOAD",
        "payload.data.text must be a string",
        service="alpha",
        retryable=False,
        details=[{"message": "Not a valid string", "path": ["payload", "data", "text"]}],
    )
    deliver(client, s.jobs["failed"], alpha, success=False, error=error)

    s.jobs["running"] = submit(client, job_request("demo.slow", data={"steps": 50}))
    start(forge, s.jobs["running"], alpha)
    progress(client, s.jobs["running"], 40, auth_token=SECRETS[3])

    retry_policy = {"maxRetries": 3, "backoffMs": 60_000, "retryableCategories": ["NETWORK_ERROR"]}
    s.jobs["retrying"] = submit(
        client, job_request("text.stats", data={"text": "again"}, retry_policy=retry_policy)
    )
    start(forge, s.jobs["retrying"], alpha)
    flaky = make_envelope(
        "NETWORK_ERROR", "UPSTREAM_DOWN", "upstream went away", service="alpha", retryable=True
    )
    deliver(client, s.jobs["retrying"], alpha, success=False, error=flaky)

    s.jobs["cancelled"] = submit(client, job_request("text.stats", data={"text": "never"}))
    assert client.post(f"/jobs/{s.jobs['cancelled']}/cancel").status_code == 200

    s.jobs["queued"] = submit(client, job_request("data.checksum", data={"data": "x"}, priority=10))

    s.status = {name: name for name in s.jobs}
    return s
