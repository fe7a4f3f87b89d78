"""TruthCore (/assert, /query), /health, settings, and the package's lazy ``app``."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient

from runnerkit.contracts import utc_now
from runnerkit.forge import Forge, db
from runnerkit.forge.settings import ForgeSettings
from runnerkit.service.settings import ConfigError
from tests.forge.helpers import error_of, job_request, new_id, valid, wait_for


def assertion(subject: str, predicate: str, obj: Any, **extra: Any) -> dict[str, Any]:
    body = {
        "id": new_id(),
        "subject": subject,
        "predicate": predicate,
        "object": obj,
        "source": "tests",
        "timestamp": utc_now(),
    }
    body.update(extra)
    return body


def query(client: FlaskClient, pattern: dict[str, Any], **extra: Any) -> dict[str, Any]:
    body = {"id": new_id(), "pattern": pattern, "filters": extra.pop("filters", {}), **extra}
    response = client.post("/query", json=body)
    assert response.status_code == 200, response.get_json()
    answer: dict[str, Any] = valid("TruthQueryResult", response.get_json())
    assert answer["queryId"] == body["id"]
    return answer


def objects(answer: dict[str, Any]) -> list[Any]:
    return [a["object"] for a in answer["assertions"]]


# --------------------------------------------------------------------------- TruthCore


def test_assert_stores_once(client: FlaskClient) -> None:
    body = assertion("s", "p", {"b": 1, "a": [True, None]})
    response = client.post("/assert", json=body)
    assert response.status_code == 201
    stored = valid("TruthAssertion", response.get_json())
    assert stored["confidence"] == 1 and stored["metadata"] == {}
    assert client.post("/assert", json=body).status_code == 200
    changed = dict(body, object="other")
    error_of(client.post("/assert", json=changed), 409, "RESOURCE_CONFLICT")


def test_assert_rejects_invalid(client: FlaskClient) -> None:
    body = assertion("s", "p", 1, confidence=1.5)
    del body["object"]  # null is fine, absent is not
    error = error_of(client.post("/assert", json=body), 400, "VALIDATION_ERROR")
    assert {tuple(d["path"]) for d in error["details"]} == {("object",), ("confidence",)}
    assert client.post("/assert", json=assertion("s", "p", None)).status_code == 201


def test_a_query_without_filters_uses_the_contract_default(client: FlaskClient) -> None:
    stored = client.post("/assert", json=assertion("s-nofilter", "status", "ok", confidence=0.1))
    assert stored.status_code == 201, stored.get_json()
    response = client.post("/query", json={"id": new_id(), "pattern": {"subject": "s-nofilter"}})

    assert response.status_code == 200, response.get_json()
    assert [a["subject"] for a in response.get_json()["assertions"]] == ["s-nofilter"]


def test_query_pattern_filters_and_paging(client: FlaskClient) -> None:
    posts = [
        assertion("job-1", "status", "queued", timestamp="2026-01-01T00:00:01Z"),
        assertion("job-1", "status", "completed", timestamp="2026-01-01T00:00:05Z"),
        assertion("job-1", "result", {"x": 1.0, "y": [1, 2]}, timestamp="2026-01-01T00:00:06Z"),
        assertion("job-2", "status", "completed", confidence=0.4, source="other"),
        assertion("job-3", "status", 7, expiresAt="2020-01-01T00:00:00Z"),  # expired
    ]
    for body in posts:
        assert client.post("/assert", json=body).status_code == 201

    assert objects(query(client, {"subject": "job-1", "predicate": "status"})) == [
        "completed",
        "queued",
    ]
    by_object = query(client, {"predicate": "status", "object": "completed"})
    assert {a["subject"] for a in by_object["assertions"]} == {"job-1", "job-2"}
    # Objects match by value: key order and 1 vs 1.0 do not matter.
    assert objects(query(client, {"object": {"y": [1, 2], "x": 1}})) == [{"x": 1.0, "y": [1, 2]}]
    assert query(client, {"subject": "job-3"})["totalCount"] == 0  # expired

    confident = query(client, {"predicate": "status"}, filters={"minConfidence": 0.5})
    assert {a["subject"] for a in confident["assertions"]} == {"job-1"}
    other = query(client, {}, filters={"sources": ["other"]})
    assert [a["subject"] for a in other["assertions"]] == ["job-2"]
    window = query(
        client,
        {"subject": "job-1"},
        filters={"after": "2026-01-01T00:00:02Z", "before": "2026-01-01T00:00:06Z"},
    )
    assert objects(window) == ["completed"]

    first = query(client, {"subject": "job-1"}, limit=2)
    assert first["totalCount"] == 3 and first["hasMore"] is True and len(first["assertions"]) == 2
    rest = query(client, {"subject": "job-1"}, limit=2, offset=2)
    assert rest["hasMore"] is False and len(rest["assertions"]) == 1
    assert first["queryTimeMs"] >= 0


def test_query_rejects_invalid(client: FlaskClient) -> None:
    body = {"id": "q", "pattern": {}, "filters": {"minConfidence": 2}, "limit": 0}
    error = error_of(client.post("/query", json=body), 400, "VALIDATION_ERROR")
    paths = {tuple(d["path"]) for d in error["details"]}
    assert paths == {("id",), ("filters", "minConfidence"), ("limit",)}


# --------------------------------------------------------------------------- health


def test_health_without_a_dispatcher_is_unhealthy(client: FlaskClient) -> None:
    response = client.get("/health")
    assert response.status_code == 503
    body = valid("HealthCheck", response.get_json())
    checks = {c["name"]: c for c in body["checks"]}
    assert body["service"] == "jobforge" and body["status"] == "unhealthy"
    assert checks["database"]["status"] == "healthy"
    assert checks["dispatcher"]["status"] == "unhealthy"


def test_health_with_a_ticking_dispatcher(make_forge) -> None:
    server = make_forge()

    def healthy() -> bool:
        return server.get("/health").status_code == 200

    wait_for(healthy, 5, what="a healthy forge")
    body = valid("HealthCheck", server.get("/health").json())
    assert {c["name"]: c["status"] for c in body["checks"]} == {
        "database": "healthy",
        "dispatcher": "healthy",
    }


def test_a_dispatcher_on_a_long_poll_keeps_its_heartbeat_fresh(make_forge) -> None:
    """A dispatcher that looks for work only when woken (a ten-minute poll) still records its
    heartbeat well inside DISPATCHER_STALE_MS, so ``/health`` does not call it stale."""
    server = make_forge(POLL_INTERVAL_MS=600_000, DISPATCHER_STALE_MS=1_000)

    def heartbeat() -> float:
        with server.forge.db.connection() as conn:
            record = db.get_meta(conn, "dispatcher")
        return float(record["ts"]) if isinstance(record, dict) else 0.0

    wait_for(lambda: heartbeat() > 0, 10, what="a first dispatcher tick")
    first = heartbeat()
    # Two stale windows after the first tick, with no work and no wake-up in between.
    wait_for(lambda: heartbeat() > first + 2.0, 20, what="heartbeats between polls")
    wait_for(lambda: server.get("/health").status_code == 200, 10, what="a healthy forge")


def test_health_reports_a_broken_database(
    client: FlaskClient, forge: Forge, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken() -> None:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(forge.db, "ping", broken)
    body = valid("HealthCheck", client.get("/health").get_json())
    database = next(c for c in body["checks"] if c["name"] == "database")
    assert database["status"] == "unhealthy"
    assert database["message"] == "The database query failed (OperationalError)"


# --------------------------------------------------------------------------- settings, app


def test_settings_defaults_environment_and_config() -> None:
    defaults = ForgeSettings.load({}, environ={})
    assert defaults.db_path == "./var/forge.sqlite3"
    assert defaults.heartbeat_interval_ms == 30_000
    assert defaults.offline_after_missed == 3
    assert defaults.async_threshold_ms == 10_000
    assert defaults.dispatch_margin_ms == 5_000
    assert defaults.dispatch_threads == 32
    assert defaults.poll_interval_ms == 100
    assert defaults.service_name == "jobforge"
    assert defaults.token == ""
    environ = {"RUNNERKIT_FORGE_DISPATCH_THREADS": "4", "RUNNERKIT_FORGE_DISPATCHER": "off"}
    loaded = ForgeSettings.load({"RUNNERKIT_FORGE_POLL_INTERVAL_MS": "50"}, environ=environ)
    assert (loaded.dispatch_threads, loaded.dispatcher, loaded.poll_interval_ms) == (4, False, 50)
    assert ForgeSettings.load({"DISPATCH_THREADS": 2}, environ=environ).dispatch_threads == 2
    with pytest.raises(ConfigError, match="RUNNERKIT_FORGE_DISPATCH_THREADS"):
        ForgeSettings.load({}, environ={"RUNNERKIT_FORGE_DISPATCH_THREADS": "0"})


def test_database_is_created_on_first_start_and_kept(
    make_forge, db_path: str, forge_backend: str
) -> None:
    on_sqlite = forge_backend == "sqlite"
    assert not Path(db_path).exists()
    first = make_forge(DISPATCHER=False)
    assert Path(db_path).exists() is on_sqlite
    job = first.submit(job_request("t", priority=10))
    first.stop()
    second = make_forge(DISPATCHER=False)
    assert second.job(job["id"]) == job


def test_importing_the_package_has_no_side_effects_and_app_is_lazy(tmp_path: Path) -> None:
    db_file = tmp_path / "lazy" / "forge.sqlite3"
    script = f"""
import os, sys
import runnerkit.forge as forge
assert forge._app is None
assert not os.path.exists({str(db_file)!r})
app = forge.app
assert forge.app is app
assert os.path.exists({str(db_file)!r})
assert app.test_client().get("/jobs").status_code == 200
forge.get_forge(app).close()
try:
    forge.nope
except AttributeError:
    print("ok")
"""
    env = {
        **os.environ,
        "RUNNERKIT_FORGE_DB_PATH": str(db_file),
        "RUNNERKIT_FORGE_DISPATCHER": "false",
    }
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=Path(__file__).parents[2],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
