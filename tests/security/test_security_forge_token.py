"""The forge's bearer token (RUNNERKIT_FORGE_TOKEN), and each runner's own runnerToken.

Without a credential, with a wrong one, or with another auth scheme, each endpoint runners call
answers 401 with an AUTHENTICATION_ERROR envelope (and ``WWW-Authenticate``), before it looks
at the body; with the right credential (the TOKEN to register and read, the runner's own
runnerToken for heartbeats, deregistration, results and events) the same request gets its
normal answer. Clients need the TOKEN too. (Real runners: test_security_control_plane.py;
every route of the app: test_security_forge_trust.py.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from runnerkit.contracts import utc_now
from runnerkit.forge import create_app, db, get_forge
from tests.forge.helpers import capability, heartbeat, job_request, new_id, registration, valid

TOKEN = "forge-token-4c1f9e0b-do-not-echo"

#: Authorization headers that must all be refused.
BAD_AUTH: dict[str, dict[str, str]] = {
    "missing": {},
    "wrong-token": {"Authorization": "Bearer not-the-token"},
    "token-prefix": {"Authorization": f"Bearer {TOKEN[:-1]}"},
    "token-suffix": {"Authorization": f"Bearer {TOKEN}x"},
    "basic-scheme": {"Authorization": f"Basic {TOKEN}"},
    "no-scheme": {"Authorization": TOKEN},
    "empty-bearer": {"Authorization": "Bearer "},
}
GOOD_AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def client(tmp_path: Path) -> Iterator[FlaskClient]:
    app = create_app(
        {"DB_PATH": str(tmp_path / "forge.sqlite3"), "DISPATCHER": False, "TOKEN": TOKEN}
    )
    try:
        yield app.test_client()
    finally:
        get_forge(app).close()


#: runner id → its runnerToken, for the runners these tests register.
_TOKENS: dict[str, str] = {}


def _register(client: FlaskClient) -> str:
    body = registration(
        "token-runner", "http://127.0.0.1:9/health", [capability("c", ["token.test"])]
    )
    response = client.post("/runners/register", json=body, headers=GOOD_AUTH)
    assert response.status_code == 201, response.get_json()
    runner_id: str = response.get_json()["runnerId"]
    _TOKENS[runner_id] = response.get_json()["runnerToken"]
    return runner_id


def _as_runner(headers: dict[str, str], runner_id: str) -> dict[str, str]:
    """The runner's own credential where a test means "authorised", else ``headers``."""
    if headers is GOOD_AUTH:
        return {"Authorization": f"Bearer {_TOKENS[runner_id]}"}
    return headers


def _job(client: FlaskClient) -> str:
    response = client.post("/jobs", json=job_request("token.test"), headers=GOOD_AUTH)
    assert response.status_code == 202, response.get_json()
    job_id: str = response.get_json()["id"]
    return job_id


def _running_job(client: FlaskClient) -> tuple[str, str]:
    """A job the dispatcher has sent to a new runner: (job id, runner id)."""
    job_id, runner_id = _job(client), _register(client)
    forge = get_forge(client.application)
    with forge.db.connection() as conn:
        row, runner = db.get_job(conn, job_id), db.get_runner(conn, runner_id)
    assert row is not None and runner is not None
    assert forge.jobs.claim(row, runner, "c") is not None
    return job_id, runner_id


def _result(job_id: str, runner_id: str) -> dict[str, Any]:
    return {
        "jobId": job_id,
        "success": True,
        "data": {"ok": True},
        "executionTimeMs": 1,
        "runnerId": runner_id,
    }


def _progress(job_id: str) -> dict[str, Any]:
    return {
        "id": new_id(),
        "type": "job.progress",
        "jobId": job_id,
        "timestamp": utc_now(),
        "data": {"percent": 50},
        "metadata": {"service": "token-runner", "version": "1.2.3"},
    }


#: name → (send(client, headers) -> response, status expected with the token)
Call = Callable[[FlaskClient, dict[str, str]], TestResponse]
ENDPOINTS: dict[str, tuple[Call, int]] = {
    "POST /runners/register": (
        lambda c, h: c.post(
            "/runners/register",
            json=registration("r", "http://127.0.0.1:9/health", [capability("c", ["t"])]),
            headers=h,
        ),
        201,
    ),
    "POST /runners/heartbeat": (
        lambda c, h: (
            lambda r: c.post("/runners/heartbeat", json=heartbeat(r), headers=_as_runner(h, r))
        )(_register(c)),
        200,
    ),
    "DELETE /runners/<id>": (
        lambda c, h: (lambda r: c.delete(f"/runners/{r}", headers=_as_runner(h, r)))(_register(c)),
        204,
    ),
    "GET /runners": (lambda c, h: c.get("/runners", headers=h), 200),
    "GET /runners/<id>": (lambda c, h: c.get(f"/runners/{_register(c)}", headers=h), 200),
    "POST /jobs/<id>/result": (
        # The job (sent async: its default timeoutMs is long) is recorded from its own runner.
        lambda c, h: (
            lambda jr: c.post(
                f"/jobs/{jr[0]}/result", json=_result(*jr), headers=_as_runner(h, jr[1])
            )
        )(_running_job(c)),
        200,
    ),
    "POST /jobs/<id>/events": (
        lambda c, h: (
            lambda jr: c.post(
                f"/jobs/{jr[0]}/events", json=_progress(jr[0]), headers=_as_runner(h, jr[1])
            )
        )(_running_job(c)),
        202,
    ),
    "GET /jobs/<id>/events": (
        lambda c, h: c.get(f"/jobs/{_job(c)}/events", headers=h),
        200,
    ),
}


@pytest.mark.parametrize("auth", sorted(BAD_AUTH))
@pytest.mark.parametrize("endpoint", sorted(ENDPOINTS))
def test_runner_endpoints_refuse_a_missing_or_wrong_token(
    client: FlaskClient, endpoint: str, auth: str
) -> None:
    send, _ = ENDPOINTS[endpoint]
    response = send(client, BAD_AUTH[auth])
    assert response.status_code == 401, (endpoint, auth, response.get_json())
    body = response.get_json()
    assert body["success"] is False
    error = valid("ErrorEnvelope", body["error"])
    assert error["category"] == "AUTHENTICATION_ERROR"
    assert error["code"] in ("MISSING_TOKEN", "INVALID_TOKEN")
    assert error["retryable"] is False
    assert error["service"] == "jobforge"
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    # Nothing of the token (or a near miss of it) comes back.
    assert TOKEN[:12] not in response.get_data(as_text=True)


@pytest.mark.parametrize("endpoint", sorted(ENDPOINTS))
def test_runner_endpoints_accept_the_token(client: FlaskClient, endpoint: str) -> None:
    send, status = ENDPOINTS[endpoint]
    response = send(client, GOOD_AUTH)
    assert response.status_code == status, (endpoint, response.get_json())


def test_a_refused_request_changes_nothing(client: FlaskClient) -> None:
    runner_id = _register(client)
    refused = client.delete(f"/runners/{runner_id}", headers=BAD_AUTH["wrong-token"])
    assert refused.status_code == 401
    listing = client.get("/runners", headers=GOOD_AUTH).get_json()
    assert [r["id"] for r in listing["items"]] == [runner_id]
    bogus = registration("intruder", "http://127.0.0.1:8/health", [capability("c", ["t"])])
    assert client.post("/runners/register", json=bogus).status_code == 401
    assert client.get("/runners", headers=GOOD_AUTH).get_json()["total"] == 1


def test_the_token_is_checked_before_the_body(client: FlaskClient) -> None:
    """An unauthenticated caller learns nothing about what the body should look like."""
    response = client.post(
        "/runners/register", data=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 401
    response = client.post("/runners/heartbeat", data=b"x", headers={"Content-Type": "text/plain"})
    assert response.status_code == 401


def test_client_endpoints_need_the_token_too(client: FlaskClient) -> None:
    job_id = _job(client)
    for path in (f"/jobs/{job_id}", "/jobs"):
        assert client.get(path).status_code == 401
        assert client.get(path, headers=GOOD_AUTH).status_code == 200
    assert client.post(f"/jobs/{job_id}/cancel").status_code == 401
    assert client.post(f"/jobs/{job_id}/cancel", headers=GOOD_AUTH).status_code == 200
    assert client.get("/health").status_code in (200, 503)  # no dispatcher runs here


def test_the_forges_token_does_not_speak_for_a_runner(client: FlaskClient) -> None:
    """Heartbeats, results and events need the runner's own credential, not the TOKEN."""
    job_id, runner_id = _running_job(client)
    calls = [
        client.post("/runners/heartbeat", json=heartbeat(runner_id), headers=GOOD_AUTH),
        client.post(f"/jobs/{job_id}/result", json=_result(job_id, runner_id), headers=GOOD_AUTH),
        client.post(f"/jobs/{job_id}/events", json=_progress(job_id), headers=GOOD_AUTH),
    ]
    for response in calls:
        assert response.status_code == 403, response.get_json()
        assert response.get_json()["error"]["code"] == "RUNNER_TOKEN_REQUIRED"
    # The operator may deregister a runner with the TOKEN.
    assert client.delete(f"/runners/{runner_id}", headers=GOOD_AUTH).status_code == 204
