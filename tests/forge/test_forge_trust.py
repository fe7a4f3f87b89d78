"""The forge's trust decisions one by one: runner credentials, dispatch targets, retention,
body limits, redaction, and a database file made before runner credentials existed."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient

from runnerkit.contracts import utc_now
from runnerkit.errors.redaction import redact
from runnerkit.forge import Forge, get_forge
from runnerkit.forge.jobs import Clock
from runnerkit.forge.targets import TargetPolicy
from runnerkit.forge.trust import token_hash
from tests.forge.helpers import (
    FakeRunner,
    ForgeServer,
    capability,
    error_of,
    forge_app,
    job_request,
    new_id,
    registration,
    sync_request,
    valid,
    wait_for,
)

# --------------------------------------------------------------------------- credentials


def test_registration_answers_a_runner_token_and_keeps_only_its_hash(
    client: FlaskClient, forge: Forge, db_path: str
) -> None:
    body = registration("r", "http://127.0.0.1:9/health", [capability("c", ["t"])])
    answer = client.post("/runners/register", json=body).get_json()
    valid("RunnerRegistrationResponse", answer)  # the extra key keeps it contract-valid
    token = answer["runnerToken"]
    assert isinstance(token, str) and len(token) >= 43  # 32 random bytes, url-safe
    with forge.db.connection() as conn:
        row = conn.execute(
            "SELECT token_hash FROM runners WHERE id = ?", (answer["runnerId"],)
        ).fetchone()
    assert row[0] == token_hash(token)
    forge.db.close()
    for path in Path(db_path).parent.rglob("*"):
        if path.is_file():
            assert token.encode() not in path.read_bytes(), path
    again = client.post("/runners/register", json=body).get_json()
    assert again["runnerToken"] != token


def test_a_database_from_before_runner_credentials_is_upgraded(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as conn:  # the runners table as released before
        conn.execute(
            "CREATE TABLE runners (id TEXT PRIMARY KEY, name TEXT NOT NULL, version TEXT NOT NULL,"
            " document TEXT NOT NULL, health_url TEXT NOT NULL, base_url TEXT NOT NULL,"
            " registered_at TEXT NOT NULL, last_heartbeat_at TEXT NOT NULL,"
            " last_seen REAL NOT NULL, status TEXT NOT NULL, heartbeat_interval_ms REAL NOT NULL,"
            " reported_active INTEGER NOT NULL DEFAULT 0)"
        )
    conn.close()
    app = forge_app({"DB_PATH": str(path), "DISPATCHER": False})
    try:
        client = app.test_client()
        body = registration("r", "http://127.0.0.1:9/health", [capability("c", ["t"])])
        answer = client.post("/runners/register", json=body)
        assert answer.status_code == 201, answer.get_json()
        runner_id = answer.get_json()["runnerId"]
        beat = {"runnerId": runner_id, "timestamp": utc_now(), "status": "healthy"}
        beat["activeJobs"] = 0
        assert client.post("/runners/heartbeat", json=beat).status_code == 200
    finally:
        get_forge(app).close()


# --------------------------------------------------------------------------- targets


@pytest.mark.parametrize(
    ("allowed", "address", "host", "verdict"),
    [
        ("", "127.0.0.1", "", True),
        ("", "10.1.2.3", "", True),
        ("", "169.254.169.254", "", False),
        ("", "169.254.0.1", "", False),
        ("", "::ffff:169.254.169.254", "", False),
        ("", "fe80::1", "", False),
        ("", "fe80::1%eth0", "", False),
        ("", "fd00:ec2::254", "", False),
        ("", "fd00:ec2::253", "", True),
        ("", "not-an-address", "", False),
        ("169.254.169.254/32", "169.254.169.254", "", True),
        ("169.254.0.0/16", "::ffff:169.254.1.1", "", True),
        ("10.0.0.0/8", "127.0.0.1", "", False),
        ("10.0.0.0/8", "10.200.0.1", "", True),
        ("10.0.0.0/8, runner", "172.18.0.5", "runner", True),
        ("10.0.0.0/8, runner", "172.18.0.5", "other", False),
        ("runner", "169.254.169.254", "runner", False),  # a name does not open metadata
        ("127.0.0.1", "127.0.0.1", "", True),
    ],
)
def test_target_classification(allowed: str, address: str, host: str, verdict: bool) -> None:
    assert TargetPolicy(allowed).allows(address, host) is verdict


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/health",
        "http://[fd00:ec2::254]/health",
        "http://[::ffff:169.254.169.254]:80/health",
        "http://[fe80::1]:3000/health",
    ],
)
def test_metadata_and_link_local_runners_are_refused_at_registration(
    client: FlaskClient, url: str
) -> None:
    body = registration("r", url, [capability("c", ["t"])])
    error = error_of(client.post("/runners/register", json=body), 400, "VALIDATION_ERROR")
    assert error["code"] == "RUNNER_ADDRESS_REFUSED"
    assert error["details"][0]["path"] == ["healthCheckEndpoint"]
    assert client.get("/runners").get_json()["total"] == 0


def test_an_allow_list_is_checked_on_every_resolved_address(store_config: dict[str, str]) -> None:
    for allowed, status in (("10.0.0.0/8", 400), ("localhost", 201), ("127.0.0.0/8,::1", 201)):
        app = forge_app({**store_config, "DISPATCHER": False, "ALLOWED_RUNNER_NETWORKS": allowed})
        try:
            body = registration("r", "http://localhost:3000/health", [capability("c", ["t"])])
            response = app.test_client().post("/runners/register", json=body)
            assert response.status_code == status, (allowed, response.get_json())
        finally:
            get_forge(app).close()


def test_a_refused_peer_fails_the_attempt_and_the_runner_gets_no_more_work(
    make_forge: Callable[..., ForgeServer], make_runner: Callable[..., FakeRunner]
) -> None:
    forge = make_forge()
    runner = make_runner("moved", [capability("cap", ["type.a"], 2)])
    runner.register(forge.url)
    # The runner's address stops being one the forge may call (a name now resolving
    # elsewhere looks the same to the dispatcher: it checks the peer it connected to).
    forge.forge.dispatcher.targets = TargetPolicy("10.0.0.0/8")
    policy = {"maxRetries": 1, "backoffMs": 10, "retryableCategories": ["NETWORK_ERROR"]}
    job = forge.submit(sync_request(retry_policy=policy))
    done = wait_for(lambda: forge.job(job["id"]).get("error"), 10, what="the attempt to fail")
    assert runner.calls == []
    assert done["code"] == "RUNNER_ADDRESS_REFUSED", done
    assert done["category"] == "NETWORK_ERROR"
    with forge.forge.db.connection() as conn:
        row = conn.execute("SELECT base_url FROM runners WHERE id = ?", (runner.runner_id,))
        assert row.fetchone()[0] == ""
    time.sleep(0.3)  # a few dispatcher ticks: the job is never sent again
    assert runner.calls == []


# --------------------------------------------------------------------------- retention


def _assertion(timestamp: str, expires: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": new_id(),
        "subject": "s",
        "predicate": "p",
        "object": 1,
        "confidence": 1,
        "source": "tests",
        "timestamp": timestamp,
        "metadata": {},
    }
    if expires is not None:
        body["expiresAt"] = expires
    return body


def _stored_ids(forge: Forge) -> set[str]:
    with forge.db.connection() as conn:
        return {r[0] for r in conn.execute("SELECT id FROM assertions WHERE source = 'tests'")}


@pytest.mark.parametrize("hours", [168.0, 0.0])
def test_assertions_past_retention_or_expiry_are_deleted(
    store_config: dict[str, str], hours: float
) -> None:
    app = forge_app({**store_config, "DISPATCHER": False, "ASSERTION_RETENTION_HOURS": hours})
    forge = get_forge(app)
    try:
        client = app.test_client()
        old = _assertion("2020-01-01T00:00:00.000Z")
        expired = _assertion(utc_now(), expires="2021-01-01T00:00:00.000Z")
        fresh = _assertion(utc_now(), expires="2999-01-01T00:00:00.000Z")
        for body in (old, expired, fresh):
            assert client.post("/assert", json=body).status_code == 201
        assert forge.jobs.prune_assertions(Clock()) == (2 if hours else 1)
        kept = {fresh["id"]} | ({old["id"]} if not hours else set())
        assert _stored_ids(forge) == kept
    finally:
        forge.close()


def test_the_dispatchers_housekeeping_prunes_assertions(
    make_forge: Callable[..., ForgeServer],
) -> None:
    first = make_forge(DISPATCHER=False)
    old = _assertion("2020-01-01T00:00:00.000Z")
    assert first.post("/assert", old).status_code == 201
    first.stop()
    second = make_forge()  # its first tick runs the hourly housekeeping
    wait_for(lambda: old["id"] not in _stored_ids(second.forge), 10, what="the prune")


# --------------------------------------------------------------------------- bodies, redaction


def test_the_body_limit_is_a_setting(store_config: dict[str, str]) -> None:
    app = forge_app({**store_config, "DISPATCHER": False, "MAX_BODY_BYTES": 1000})
    try:
        client = app.test_client()
        big = job_request("t", data={"text": "x" * 2000})
        error = error_of(client.post("/jobs", json=big), 413, "VALIDATION_ERROR")
        assert error["code"] == "PAYLOAD_TOO_LARGE"
        assert client.post("/jobs", json=job_request("t")).status_code == 202
    finally:
        get_forge(app).close()


def test_job_answers_redact_what_the_dashboard_redacts(client: FlaskClient) -> None:
    secret = "hunter2-do-not-show"
    body = job_request("t", data={"text": "hi", "db_password": secret, "nested": {"api_key": 1}})
    created = client.post("/jobs", json=body)
    assert created.status_code == 202
    for response in (created, client.get(f"/jobs/{body['id']}"), client.get("/jobs")):
        assert secret not in response.get_data(as_text=True)
    data = created.get_json()["request"]["payload"]["data"]
    assert data == {"text": "hi", "db_password": "[REDACTED]", "nested": {"api_key": "[REDACTED]"}}
    assert client.get(f"/jobs/{body['id']}").get_json() == created.get_json()
    again = client.post("/jobs", json=body)  # the same job again: 200, redacted too
    assert again.status_code == 200 and secret not in again.get_data(as_text=True)
    plain = job_request("t", data={"text": "nothing to hide", "tokens": 3})
    shown = client.post("/jobs", json=plain).get_json()["request"]["payload"]["data"]
    assert shown == {"text": "nothing to hide", "tokens": "[REDACTED]"}  # as the dashboard
    clean = job_request("t", data={"text": "nothing to hide"})
    assert client.post("/jobs", json=clean).get_json()["request"]["payload"]["data"] == {
        "text": "nothing to hide"
    }


def test_truthcore_queries_redact_what_the_dashboard_redacts(client: FlaskClient) -> None:
    secret = "hunter2-in-a-result"
    assertion = {
        "id": new_id(),
        "subject": "job-with-secret",
        "predicate": "result",
        "object": {"rows": 2, "api_key": secret},
        "source": "runner",
        "timestamp": utc_now(),
        "metadata": {"password": secret},
    }
    assert client.post("/assert", json=assertion).status_code == 201
    query = {"id": new_id(), "pattern": {"subject": "job-with-secret"}}
    answer = client.post("/query", json=query)
    assert answer.status_code == 200 and secret not in answer.get_data(as_text=True)
    (shown,) = answer.get_json()["assertions"]
    assert shown["object"] == {"rows": 2, "api_key": "[REDACTED]"} == redact(assertion["object"])


def test_the_cheap_secret_test_never_lets_a_key_through_that_redact_catches(
    client: FlaskClient,
) -> None:
    """The JSON answer is what :func:`redact` makes of the stored job, key by key, even for
    keys that only match the redaction pattern through case folding."""
    long_s = "\u017fecret"  # LATIN SMALL LETTER LONG S: folds to "secret"
    keys = ["PassWord", long_s, "X_API_KEY", "Authorization", "hmac_k", "plain", "ünïcode"]
    data = {key: f"value-of-{i}" for i, key in enumerate(keys)}
    body = job_request("t", data=data)
    created = client.post("/jobs", json=body).get_json()
    shown = client.get(f"/jobs/{body['id']}").get_json()
    assert created == shown
    assert shown["request"]["payload"]["data"] == redact(data)
    assert shown["request"]["payload"]["data"]["plain"] == "value-of-5"
    assert shown["request"]["payload"]["data"][long_s] == "[REDACTED]"
