"""Values the contract allows but no clock, socket or SQLite column can hold, and jobs the
forge cannot handle: each gets an answer or an end, never a 500, a stuck job or a stalled
dispatcher.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import requests
from flask.testing import FlaskClient

from runnerkit.contracts import format_timestamp, utc_now
from runnerkit.forge import db as forge_db
from runnerkit.forge.dashboard_format import compact_json, pretty_json
from runnerkit.forge.dispatcher import Dispatcher
from runnerkit.forge.job_store import JobStore
from runnerkit.forge.jobs import MAX_WAIT_MS
from tests.forge.helpers import (
    Call,
    FakeRunner,
    ForgeServer,
    MakeForge,
    MakeRunner,
    Reply,
    capability,
    envelope,
    error_of,
    heartbeat,
    job_request,
    new_id,
    registration,
    sync_request,
    valid,
    wait_for,
)


def expired_job(forge: ForgeServer) -> dict[str, Any]:
    """A job of a type nobody runs, already past its expiresAt: housekeeping fails it."""
    past = format_timestamp(datetime.now(UTC) - timedelta(minutes=1))
    return forge.submit(sync_request("type.nobody", expiresAt=past))


# --------------------------------------------------------------------------- durations


def test_a_backoff_of_millennia_is_cut_and_housekeeping_goes_on(
    make_forge: MakeForge, make_runner: MakeRunner
) -> None:
    forge = make_forge()

    def flaky(fake: FakeRunner, call: Call) -> Reply:
        error = envelope("RUNTIME_ERROR", "FLAKY", retryable=True)
        return Reply(status=500, body=fake.failure(call, error))

    make_runner("r", [capability("cap", ["type.a"])], flaky).register(forge.url)
    policy = {"maxRetries": 1, "backoffMs": 1e15, "maxBackoffMs": 1e15}
    job = forge.submit(sync_request(retry_policy=policy))

    waiting = forge.wait_status(job["id"], "retrying")
    valid("JobResponse", waiting)
    (retrying,) = [e for e in forge.events(job["id"]) if e["type"] == "job.retrying"]
    assert retrying["data"]["delayMs"] == MAX_WAIT_MS
    next_at = datetime.fromisoformat(retrying["data"]["nextAttemptAt"].replace("Z", "+00:00"))
    assert next_at.year >= datetime.now(UTC).year + 99
    # The dispatcher's housekeeping still runs: an expired job fails.
    expired = expired_job(forge)
    assert forge.wait_status(expired["id"], "failed")["error"]["code"] == "JOB_EXPIRED"


def test_a_timeout_longer_than_a_socket_can_wait_is_dispatched_and_answered(
    make_forge: MakeForge, make_runner: MakeRunner
) -> None:
    forge = make_forge(ASYNC_THRESHOLD_MS=10**15)  # sent synchronously, read timeout cut
    runner = make_runner("r", [capability("cap", ["type.a"], 1)])
    runner.register(forge.url)
    first = forge.submit(sync_request(timeout_ms=1e13))
    assert forge.wait_status(first["id"], "completed")["result"]["success"] is True
    # Its slot was given back: the capability (maxConcurrency 1) takes the next job.
    second = forge.submit(sync_request(timeout_ms=1e300))
    assert forge.wait_status(second["id"], "completed")["result"]["success"] is True
    assert [c.body["jobId"] for c in runner.calls] == [first["id"], second["id"]]


def test_a_retention_longer_than_the_epoch_prunes_nothing(
    make_forge: MakeForge, make_runner: MakeRunner
) -> None:
    forge = make_forge(HISTORY_RETENTION_HOURS=1e12)
    make_runner("r", [capability("cap", ["type.a"])]).register(forge.url)
    job = forge.submit(sync_request())
    forge.wait_status(job["id"], "completed")
    assert forge.forge.jobs.prune() == 0
    assert forge.job(job["id"])["status"] == "completed"


# --------------------------------------------------------------------------- the forge's faults


def test_a_job_whose_answer_cannot_be_recorded_fails_alone(
    make_forge: MakeForge, make_runner: MakeRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    forge = make_forge()
    make_runner("r", [capability("cap", ["type.a"], 4)]).register(forge.url)
    poisoned = new_id()
    apply = JobStore._apply

    def fragile(self: JobStore, conn: Any, row: Any, outcome: Any, now: Any) -> None:
        if row["id"] == poisoned:
            raise RuntimeError("cannot record this one")
        apply(self, conn, row, outcome, now)

    monkeypatch.setattr(JobStore, "_apply", fragile)
    bad = forge.submit(sync_request(job_id=poisoned))
    good = forge.submit(sync_request())

    failed = forge.wait_status(bad["id"], "failed")
    assert failed["error"]["category"] == "INTERNAL_ERROR"
    assert failed["error"]["code"] == "FORGE_INTERNAL_ERROR"
    assert forge.wait_status(good["id"], "completed")["result"]["success"] is True
    expired = expired_job(forge)
    assert forge.wait_status(expired["id"], "failed")["error"]["code"] == "JOB_EXPIRED"
    # The failed job gave its slot back.
    with forge.forge.db.connection() as conn:
        row = forge_db.get_job(conn, bad["id"])
        assert row is not None and row["slot_runner"] is None


def test_a_dispatch_that_fails_inside_the_forge_is_a_failed_attempt_not_a_lost_one(
    make_forge: MakeForge, make_runner: MakeRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    forge = make_forge()
    runner = make_runner("r", [capability("cap", ["type.a"], 1)])
    runner.register(forge.url)
    interpret = Dispatcher.interpret
    broken = threading.Event()
    broken.set()

    def sometimes(self: Dispatcher, *args: Any) -> Any:
        if broken.is_set():
            broken.clear()
            raise RuntimeError("a bug in reading answers")
        return interpret(self, *args)

    monkeypatch.setattr(Dispatcher, "interpret", sometimes)
    job = forge.submit(sync_request(retry_policy={"maxRetries": 1, "backoffMs": 10}))
    done = forge.wait_status(job["id"], "completed", "failed")
    assert done["status"] == "completed"
    assert done["result"]["metadata"]["attempts"] == 2
    (retrying,) = [e for e in forge.events(job["id"]) if e["type"] == "job.retrying"]
    assert retrying["data"]["error"]["code"] == "DISPATCH_FAILED"


# --------------------------------------------------------------------------- async results


def test_a_result_posted_for_a_job_running_synchronously_is_refused(
    make_forge: MakeForge, make_runner: MakeRunner
) -> None:
    forge = make_forge()
    hold = threading.Event()
    runner = make_runner("r", [capability("cap", ["type.a"])], lambda f, c: Reply(hold=hold))
    runner.register(forge.url)
    job = forge.submit(sync_request())
    forge.wait_status(job["id"], "running")
    call = wait_for(lambda: runner.calls and runner.calls[0], 5, what="the runner's call")
    forged = runner.failure(call, envelope("RUNTIME_ERROR", "INJECTED", retryable=False))

    refused = runner.post_result(forged)
    body = refused.json()
    assert refused.status_code == 409, body
    assert valid("ErrorEnvelope", body["error"])["code"] == "JOB_NOT_ASYNC"
    assert body["error"]["retryable"] is True
    hold.set()
    done = forge.wait_status(job["id"], "completed", "failed")
    assert done["status"] == "completed" and done["result"]["data"] == {
        "echo": call.body["payload"]
    }


# --------------------------------------------------------------------------- the API


def _surrogate_body(document: dict[str, Any], path: list[str]) -> bytes:
    """``document`` as JSON text with a lone surrogate escape in the string at ``path``."""
    import json

    node = document
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = "MARK"
    return json.dumps(document).replace('"MARK"', '"x\\ud800"').encode()


@pytest.mark.parametrize(
    ("route", "document", "path"),
    [
        ("/jobs", job_request(), ["type"]),
        ("/jobs", job_request(), ["payload", "data", "text"]),
        (
            "/assert",
            {
                "id": new_id(),
                "subject": "s",
                "predicate": "p",
                "object": 1,
                "source": "t",
                "timestamp": utc_now(),
            },
            ["subject"],
        ),
        (
            "/query",
            {"id": new_id(), "pattern": {"subject": "s"}, "filters": {}},
            ["pattern", "subject"],
        ),
        (
            "/runners/register",
            registration("r", "http://127.0.0.1:9/health", [capability("c", ["t"])]),
            ["name"],
        ),
    ],
)
def test_a_lone_surrogate_is_a_400_on_every_route(
    client: FlaskClient, route: str, document: dict[str, Any], path: list[str]
) -> None:
    raw = _surrogate_body(document, path)
    response = client.post(route, data=raw, content_type="application/json")
    error = error_of(response, 400, "VALIDATION_ERROR")
    assert error["code"] == "INVALID_JSON"


def test_nesting_past_the_limit_is_a_400_not_a_recursion(client: FlaskClient) -> None:
    deep: Any = "leaf"
    for _ in range(500):
        deep = [deep]
    response = client.post("/jobs", json=job_request(data={"deep": deep}))
    assert error_of(response, 400, "VALIDATION_ERROR")["code"] == "BODY_TOO_DEEP"
    shallow = job_request(data={"ok": [[["leaf"]]]})
    assert client.post("/jobs", json=shallow).status_code == 202


def test_numbers_past_sqlite_integers_are_cut_or_refused(client: FlaskClient) -> None:
    too_far = str(2**63)
    for path in ("/jobs", "/runners", f"/jobs/{new_id()}/events"):
        response = client.get(path, query_string={"offset": too_far})
        assert error_of(response, 400, "VALIDATION_ERROR")["code"] == "INVALID_QUERY", path
    assert client.get("/jobs", query_string={"offset": str(2**63 - 1)}).status_code == 200

    for limit, offset in ((10**20, 0), (1e300, 10**20)):
        query = {"id": new_id(), "pattern": {}, "filters": {}, "limit": limit, "offset": offset}
        response = client.post("/query", json=query)
        assert response.status_code == 200, response.get_json()
        valid("TruthQueryResult", response.get_json())

    registered = client.post(
        "/runners/register",
        json=registration("r", "http://127.0.0.1:9/health", [capability("c", ["t"])]),
    )
    runner_id = registered.get_json()["runnerId"]
    beat = {**heartbeat(runner_id), "activeJobs": 10**30}
    assert client.post("/runners/heartbeat", json=beat).status_code == 200


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/runners/register"),
        ("GET", "/runners/heartbeat"),
        ("DELETE", "/runners/register"),
        ("DELETE", "/runners/heartbeat"),
    ],
)
def test_wrong_methods_on_runner_actions_are_405_not_an_unknown_runner(
    client: FlaskClient, method: str, path: str
) -> None:
    response = client.open(path, method=method)
    error = error_of(response, 405, "VALIDATION_ERROR")
    assert error["code"] == "METHOD_NOT_ALLOWED"
    assert response.headers["Allow"] == "POST"


def test_the_dashboard_shows_lone_surrogates_as_replacement_characters() -> None:
    value = {"text": "a\ud800b", "\udc00key": ["\udfff"]}
    for text in (pretty_json(value), compact_json(value)):
        text.encode("utf-8")  # a page can carry it
        assert "\ufffd" in text and "a\ufffdb" in text


ODD = ["a\x00b", "\ue000", "\ue0000", "x\ue000\x00y\ue000\ue000", "\x00"]


@pytest.mark.parametrize("odd", ODD)
def test_strings_with_nul_and_private_use_characters_come_back_as_sent(
    client: FlaskClient, odd: str
) -> None:
    """A JSON string may hold U+0000 (PostgreSQL's text cannot): every store keeps it."""
    job = job_request(odd, data={"text": odd}, source=odd)
    assert client.post("/jobs", json=job).status_code == 202
    got = client.get(f"/jobs/{job['id']}").get_json()
    assert got["request"]["type"] == odd
    assert got["request"]["payload"]["data"]["text"] == odd
    assert got["request"]["metadata"]["source"] == odd
    listed = client.get("/jobs", query_string={"type": odd}).get_json()
    assert [j["id"] for j in listed["items"]] == [job["id"]]

    body = registration(odd, "http://127.0.0.1:9/health", [capability(odd, [odd])])
    answer = client.post("/runners/register", json=body)
    assert answer.status_code == 201, answer.get_json()
    runners = client.get("/runners").get_json()["items"]
    assert [r["name"] for r in runners] == [odd]
    assert runners[0]["capabilities"][0]["supportedJobTypes"] == [odd]

    assertion = {
        "id": new_id(),
        "subject": odd,
        "predicate": odd,
        "object": {odd: odd},
        "source": odd,
        "timestamp": utc_now(),
    }
    assert client.post("/assert", json=assertion).status_code == 201
    query = {"id": new_id(), "pattern": {"subject": odd, "object": {odd: odd}}}
    found = client.post("/query", json=query).get_json()
    assert [a["id"] for a in found["assertions"]] == [assertion["id"]]
    assert found["assertions"][0]["source"] == odd


def test_every_route_works_with_one_database_connection_per_process(
    make_forge: MakeForge, make_runner: MakeRunner
) -> None:
    """No request takes a second pooled connection while it holds one (DB_POOL_SIZE=1): with
    a bounded pool, such a request would wait on itself. SQLite's pool is not bounded."""
    forge = make_forge(DB_POOL_SIZE=1)
    runner = make_runner("r", [capability("cap", ["type.a"])])
    runner.register(forge.url)
    job = forge.submit(sync_request())
    forge.wait_status(job["id"], "completed")
    session = requests.Session()
    for path in (
        "/health",
        "/metrics",
        "/",
        f"/jobs/{job['id']}/view",
        f"/jobs/{new_id()}/view",
        "/jobs",
        "/runners",
        f"/jobs/{job['id']}/events",
    ):
        answer = session.get(forge.url + path, timeout=(2, 20))
        assert answer.status_code in (200, 404), (path, answer.status_code, answer.text[:300])
        # Pages and /health report the database's health: it must not be their own wait.
        assert "The database query failed" not in answer.text, path
    query = {"id": new_id(), "pattern": {"subject": job["id"]}}
    found = session.post(forge.url + "/query", json=query, timeout=(2, 20)).json()
    assert found["totalCount"] >= 1
