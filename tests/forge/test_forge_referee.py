"""The forge referees: what runners send is checked against its contract, and what breaks it
is recorded against the runner (and the job), shown, and with STRICT fails the attempt.

Every test taking a forge runs on SQLite and on PostgreSQL.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient

from runnerkit.forge import Forge
from runnerkit.forge import violations as violations_module
from runnerkit.forge.jobs import Claim
from runnerkit.forge.referee import Gate, _fits, answer_violations
from runnerkit.forge.violations import Violation
from tests.forge.helpers import (
    Call,
    FakeRunner,
    MakeForge,
    MakeRunner,
    Reply,
    capability,
    envelope,
    heartbeat,
    new_id,
    registration,
    sync_request,
    valid,
    wait_for,
)
from tests.support import GunicornProcess, free_port

HEALTH = "http://127.0.0.1:3000/health"


def register(client: FlaskClient, name: str = "r1", health: str = HEALTH) -> str:
    body = registration(name, health, [capability("cap", ["t.a"])])
    response = client.post("/runners/register", json=body)
    assert response.status_code == 201, response.get_json()
    return str(response.get_json()["runnerId"])


def violations_of(client: FlaskClient, **query: str) -> dict[str, Any]:
    response = client.get("/violations", query_string=query)
    assert response.status_code == 200, response.get_json()
    body: dict[str, Any] = response.get_json()
    return body


# --------------------------------------------------------------------------- requests


def test_a_heartbeat_whose_runner_id_is_not_a_uuid_says_why_on_the_runner(
    client: FlaskClient,
) -> None:
    runner_id = register(client)
    token = client.tokens[runner_id]  # type: ignore[attr-defined]
    bad = {**heartbeat(runner_id), "runnerId": "unknown"}
    refused = client.post(
        "/runners/heartbeat", json=bad, headers={"Authorization": f"Bearer {token}"}
    )
    assert refused.status_code == 400

    runner = client.get(f"/runners/{runner_id}").get_json()
    valid("RunnerMetadata", runner)
    assert runner["contractViolations"] == 1
    assert runner["refusal"] == "heartbeat refused: runnerId: not a valid UUID (got 'unknown')"
    (found,) = violations_of(client, runnerId=runner_id)["items"]
    assert (found["contract"], found["path"]) == ("RunnerHeartbeat", "runnerId")
    assert found["message"] == "not a valid UUID (got 'unknown')"
    assert found["jobId"] is None

    # An accepted heartbeat ends the refusal; the count stays.
    assert client.post("/runners/heartbeat", json=heartbeat(runner_id)).status_code == 200
    runner = client.get(f"/runners/{runner_id}").get_json()
    assert "refusal" not in runner
    assert runner["contractViolations"] == 1


def test_a_conforming_runner_has_no_violations(client: FlaskClient) -> None:
    runner_id = register(client)
    assert client.post("/runners/heartbeat", json=heartbeat(runner_id)).status_code == 200
    assert client.get(f"/runners/{runner_id}").get_json()["contractViolations"] == 0
    assert violations_of(client, runnerId=runner_id) == {"items": [], "total": 0}
    assert violations_of(client) == {"items": [], "total": 0}


def test_without_a_credential_a_refused_heartbeat_is_tied_to_the_only_runner_at_its_address(
    make_forge: MakeForge,
) -> None:
    forge = make_forge(TRUST_RUNNER_IDS=True)
    client = forge.app.test_client()
    runner_id = register(client)
    bad = {**heartbeat(runner_id), "runnerId": "unknown"}
    assert client.post("/runners/heartbeat", json=bad).status_code == 400
    runner = client.get(f"/runners/{runner_id}").get_json()
    assert runner["contractViolations"] == 1
    assert runner["refusal"].startswith("heartbeat refused: runnerId:")

    # A second runner at the same address: the next one cannot be told apart.
    register(client, "r2", "http://localhost:3001/health")
    forge.forge.referee.gate = Gate()  # the first refusal's rate limit is not under test
    assert client.post("/runners/heartbeat", json=bad).status_code == 400
    assert client.get(f"/runners/{runner_id}").get_json()["contractViolations"] == 1
    unattributed = violations_of(client)
    assert unattributed["total"] == 1
    (found,) = unattributed["items"]
    assert found["runnerId"] is None
    assert found["source"] == "127.0.0.1 (runnerId 'unknown')"
    assert (found["contract"], found["path"]) == ("RunnerHeartbeat", "runnerId")


def test_a_refused_registration_is_recorded_with_what_it_said_of_itself(
    client: FlaskClient,
) -> None:
    body = registration("half-done", HEALTH, [capability("cap", ["t.a"])])
    del body["capabilities"][0]["inputSchema"]
    body["contractVersion"] = {"major": "1", "minor": 0, "patch": 0}
    assert client.post("/runners/register", json=body).status_code == 400
    listed = violations_of(client)
    assert listed["total"] == 2
    paths = {v["path"] for v in listed["items"]}
    assert paths == {"capabilities.0.inputSchema", "contractVersion.major"}
    assert {v["source"] for v in listed["items"]} == {
        f"127.0.0.1 (name 'half-done', healthCheckEndpoint '{HEALTH}')"
    }


def test_refused_events_and_results_are_recorded_against_the_job_and_its_runner(
    client: FlaskClient, forge: Forge
) -> None:
    runner_id = register(client)
    job_id = client.post("/jobs", json=sync_request("t.a")).get_json()["id"]
    with forge.db.tx() as conn:
        conn.execute(
            "UPDATE jobs SET status = 'running', runner_id = ?, attempts = 1 WHERE id = ?",
            (runner_id, job_id),
        )
    token = {"Authorization": f"Bearer {client.tokens[runner_id]}"}  # type: ignore[attr-defined]
    result = {"jobId": job_id, "success": True, "executionTimeMs": "5", "runnerId": runner_id}
    assert client.post(f"/jobs/{job_id}/result", json=result, headers=token).status_code == 400
    event = {"id": new_id(), "type": "job.completed", "jobId": job_id}
    assert client.post(f"/jobs/{job_id}/events", json=event, headers=token).status_code == 400

    items = violations_of(client, jobId=job_id)["items"]
    assert {(v["contract"], v["path"]) for v in items} >= {
        ("RunnerExecutionResponse", "executionTimeMs"),
        ("JobEvent", "timestamp"),
        ("JobEvent", "metadata"),
    }
    assert {v["runnerId"] for v in items} == {runner_id}
    assert client.get(f"/runners/{runner_id}").get_json()["contractViolations"] == len(items)


def test_violations_follow_a_reregistration_and_go_with_a_deregistration(
    client: FlaskClient,
) -> None:
    old = register(client)
    token = client.tokens[old]  # type: ignore[attr-defined]
    bad = {**heartbeat(old), "status": "fine"}
    client.post("/runners/heartbeat", json=bad, headers={"Authorization": f"Bearer {token}"})
    new = register(client)  # the same healthCheckEndpoint: it replaces the old one
    assert client.get(f"/runners/{new}").get_json()["contractViolations"] == 1
    assert len(violations_of(client, runnerId=new)["items"]) == 1
    assert client.delete(f"/runners/{new}").status_code == 204
    assert client.get("/violations", query_string={"runnerId": new}).status_code == 404
    with client.application.extensions["forge"].db.connection() as conn:
        left = conn.execute("SELECT COUNT(*) FROM violations").fetchone()[0]
    assert left == 0


def test_storage_is_bounded_per_runner_and_for_unknown_senders(forge: Forge) -> None:
    with forge.db.tx() as conn:
        runner_id = new_id()
        conn.execute(
            "INSERT INTO runners (id, name, version, document, health_url, base_url,"
            " registered_at, last_heartbeat_at, last_seen, status, heartbeat_interval_ms)"
            " VALUES (?, 'r', '1', '{}', 'h', '', 'x', 'x', 0, 'healthy', 1000)",
            (runner_id,),
        )
    found = [Violation("RunnerHeartbeat", "status", f"bad {i}") for i in range(3)]
    for i in range(40):
        with forge.db.tx() as conn:
            violations_module.record(
                conn, found, runner_id=runner_id, source="s", at="x", ts=float(i), unrecorded=1
            )
            violations_module.record(conn, found, runner_id=None, source="s", at="x", ts=0.0)
    with forge.db.connection() as conn:
        kept = violations_module.of_runner(conn, runner_id, limit=1000)
        unknown, unknown_total = violations_module.unattributed(conn, limit=1000)
        count = conn.execute("SELECT violations FROM runners WHERE id = ?", (runner_id,))
        total = count.fetchone()[0]
    assert len(kept) == violations_module.KEPT_PER_RUNNER
    assert total == 40 * 4  # three each time, and one the rate limit held back
    assert len(unknown) == violations_module.KEPT_UNATTRIBUTED
    assert unknown_total == 40 * 3


def test_the_gate_admits_one_per_sender_a_second_and_counts_the_rest() -> None:
    gate = Gate(every_s=1.0, per_second=3)
    assert gate.admit("a", now=10.0) == 0
    assert gate.admit("a", now=10.5) is None
    assert gate.admit("a", now=10.9) is None
    assert gate.admit("a", now=11.0) == 2
    # Many senders: at most per_second in all.
    assert [gate.admit(f"s{i}", now=12.0) for i in range(5)] == [0, 0, 0, None, None]
    assert gate.admit("s4", now=13.1) == 1


def test_the_gate_keeps_bounded_memory_under_a_flood_of_senders() -> None:
    """Senders held back by the overall limit are counted only up to ``max_keys`` of them:
    a flood from ever new addresses cannot grow the forge's memory."""
    gate = Gate(every_s=1.0, per_second=1, max_keys=50)
    assert gate.admit("first", now=1.0) == 0
    for i in range(10_000):
        assert gate.admit(f"flood{i}", now=1.5) is None
    assert len(gate._held) <= 50 and len(gate._next) <= 50
    assert gate.admit("flood0", now=2.0) == 1  # still counted: among the first 50


# --------------------------------------------------------------------------- answers


def _claim(runner_id: str = "") -> Claim:
    return Claim(
        job_id=new_id(),
        attempt=1,
        request={},
        runner_id=runner_id or new_id(),
        runner_name="r",
        base_url="http://127.0.0.1:1",
        capability_id="cap",
        asynchronous=False,
        correlation_id=new_id(),
    )


def test_what_an_answer_is_judged_by() -> None:
    claim = _claim()
    good = {"jobId": claim.job_id, "success": True, "executionTimeMs": 3, "runnerId": new_id()}
    assert _fits(claim, good, None)
    assert answer_violations(claim, 200, good, None) == []
    for broken, path in (
        ({**good, "runnerId": "unknown"}, "runnerId"),
        ({**good, "executionTimeMs": True}, "executionTimeMs"),
        ({**good, "executionTimeMs": -1}, "executionTimeMs"),
        ({**good, "success": "true"}, "success"),
        ({**good, "jobId": new_id()}, "jobId"),
    ):
        assert not _fits(claim, broken, None)
        assert [v.path for v in answer_violations(claim, 200, broken, None)] == [path]
    (html,) = answer_violations(claim, 500, None, None)
    assert (html.contract, html.message) == (
        "ErrorEnvelope",
        "the HTTP 500 answer is not JSON; expected an ErrorEnvelope",
    )
    bare = {"success": False, "error": {"message": "boom"}}
    assert {v.path for v in answer_violations(claim, 500, bare, None)} >= {
        "error.id",
        "error.category",
    }


def test_an_answer_that_breaks_the_contract_is_used_and_shown(
    make_forge: MakeForge, make_runner: MakeRunner
) -> None:
    forge = make_forge()

    def unknown_runner(fake: FakeRunner, call: Call) -> Reply:
        return Reply(body={**fake.success(call), "runnerId": "unknown"})

    runner = make_runner("sloppy", [capability("cap", ["type.a"])], unknown_runner)
    runner.register(forge.url)
    job = forge.submit(sync_request())
    done = forge.wait_status(job["id"], "completed", "failed")
    assert done["status"] == "completed"
    found = forge.get("/violations", params={"jobId": job["id"]}).json()["items"]
    assert [(v["contract"], v["path"], v["attempt"]) for v in found] == [
        ("RunnerExecutionResponse", "runnerId", 1)
    ]
    assert found[0]["message"] == "not a valid UUID (got 'unknown')"
    runner_doc = forge.get(f"/runners/{runner.runner_id}").json()
    assert runner_doc["contractViolations"] == 1


def test_strict_fails_the_attempt_with_schema_mismatch(
    make_forge: MakeForge, make_runner: MakeRunner
) -> None:
    forge = make_forge(STRICT=True)

    def sloppy(fake: FakeRunner, call: Call) -> Reply:
        return Reply(body={**fake.success(call), "executionTimeMs": "12"})

    runner = make_runner("sloppy", [capability("cap", ["type.a"])], sloppy)
    runner.register(forge.url)
    job = forge.submit(sync_request())
    done = forge.wait_status(job["id"], "completed", "failed")
    assert done["status"] == "failed"
    error = done["error"]
    assert (error["category"], error["code"], error["retryable"]) == (
        "SCHEMA_MISMATCH",
        "CONTRACT_VIOLATION",
        False,
    )
    assert error["details"][0]["path"] == ["executionTimeMs"]
    assert len(runner.calls_for(job["id"])) == 1  # not retried


def test_strict_leaves_an_answer_that_is_not_json_to_its_retries(
    make_forge: MakeForge, make_runner: MakeRunner
) -> None:
    """An HTML 502 (a proxy in front of the runner, say) is recorded, but under STRICT too it
    fails the attempt as any 502 does: retryable, so the next attempt can succeed."""
    forge = make_forge(STRICT=True)

    def proxy_then_runner(fake: FakeRunner, call: Call) -> Reply:
        if call.index == 0:
            return Reply(status=502, body=b"<html><body>Bad Gateway</body></html>")
        return Reply()

    runner = make_runner("proxied", [capability("cap", ["type.a"])], proxy_then_runner)
    runner.register(forge.url)
    policy = {"maxRetries": 2, "backoffMs": 50}
    job = forge.submit(sync_request(retry_policy=policy))
    done = forge.wait_status(job["id"], "completed", "failed")
    assert done["status"] == "completed", done
    assert len(runner.calls_for(job["id"])) == 2
    assert forge.get(f"/runners/{runner.runner_id}").json()["contractViolations"] == 1


def test_a_conforming_runner_is_never_flagged_not_even_when_it_fails(
    make_forge: MakeForge, make_runner: MakeRunner
) -> None:
    forge = make_forge(STRICT=True)

    def alternate(fake: FakeRunner, call: Call) -> Reply:
        if call.index % 2:
            return Reply(
                status=500, body=fake.failure(call, envelope("RUNTIME_ERROR", "X", retryable=False))
            )
        return Reply()

    runner = make_runner("tidy", [capability("cap", ["type.a"], 2)], alternate)
    runner.register(forge.url)
    jobs = [forge.submit(sync_request())["id"] for _ in range(4)]
    for job_id in jobs:
        forge.wait_status(job_id, "completed", "failed")
    assert forge.get(f"/runners/{runner.runner_id}").json()["contractViolations"] == 0
    assert forge.get("/violations").json()["total"] == 0


# --------------------------------------------------------------------------- a real runner


@pytest.mark.parametrize("strict", [False, True], ids=["default", "strict"])
def test_the_nonconforming_flask_runner_is_refereed(
    make_forge: MakeForge, tmp_path: Path, strict: bool
) -> None:
    """The plain-Flask runner a hurried team writes from the guide: it registers, then
    heartbeats and answers as ``runnerId: "unknown"``. The forge says so on its row, takes
    its answer by default and fails the attempt with STRICT."""
    forge = make_forge(TRUST_RUNNER_IDS=True, STRICT=strict)
    port = free_port()
    env = {
        "NONCONFORMING_FORGE_URL": forge.url,
        "NONCONFORMING_HEALTH_URL": f"http://127.0.0.1:{port}/health",
        "NONCONFORMING_HEARTBEAT_S": "0.2",
    }
    runner = GunicornProcess(
        "tests.support.nonconforming_runner:app", log_dir=tmp_path, workers=1, port=port, env=env
    )
    with runner:
        runner.wait_ready("/health")

        def refused() -> dict[str, Any] | None:
            items = forge.get("/runners").json()["items"]
            return items[0] if items and "refusal" in items[0] else None

        row = wait_for(refused, what="the runner's refused heartbeat")
        assert row["name"] == "nonconforming-runner"
        assert row["refusal"] == ("heartbeat refused: runnerId: not a valid UUID (got 'unknown')")
        job = forge.submit(sync_request("math.add", data={"a": 2, "b": 3}))
        done = forge.wait_status(job["id"], "completed", "failed")
    found = forge.get("/violations", params={"jobId": job["id"]}).json()["items"]
    assert [(v["contract"], v["path"], v["message"]) for v in found] == [
        ("RunnerExecutionResponse", "runnerId", "not a valid UUID (got 'unknown')")
    ]
    if strict:
        assert done["status"] == "failed"
        assert done["error"]["category"] == "SCHEMA_MISMATCH"
    else:
        assert done["status"] == "completed"
        assert done["result"]["data"]["sum"] == 5
    counted = forge.get(f"/runners/{row['id']}").json()["contractViolations"]
    assert counted >= 2  # its heartbeats (one a second at most) and the answer


def test_runnerkit_runners_shows_the_count_and_the_refusal(make_forge: MakeForge) -> None:
    from click.testing import CliRunner

    from runnerkit.cli import main

    forge = make_forge()
    client = forge.app.test_client()
    runner_id = register(client)
    token = {"Authorization": f"Bearer {client.tokens[runner_id]}"}  # type: ignore[attr-defined]
    bad = {**heartbeat(runner_id), "runnerId": "unknown"}
    assert client.post("/runners/heartbeat", json=bad, headers=token).status_code == 400
    result = CliRunner().invoke(
        main, ["runners", "--url", forge.url], env={"RUNNERKIT_FORGE_TOKEN": ""}
    )
    assert result.exit_code == 0, result.output
    header, row, *notes = result.output.splitlines()
    assert header.split()[5:7] == ["HEARTBEAT", "VIOLATIONS"]
    assert row.split()[5] == "1"
    assert notes[0] == (
        f"r1 {runner_id}: heartbeat refused: runnerId: not a valid UUID (got 'unknown')"
    )
    assert "GET /violations?runnerId=" in notes[1]


def test_a_heartbeat_without_its_runner_token_says_why_on_the_runner(client: FlaskClient) -> None:
    runner_id = register(client)
    refused = client.post(
        "/runners/heartbeat", json=heartbeat(runner_id), headers={"Authorization": ""}
    )
    assert refused.status_code == 401
    runner = client.get(f"/runners/{runner_id}").get_json()
    assert runner["refusal"].startswith("heartbeat refused: it carries no runnerToken")
    assert runner["contractViolations"] == 0  # the forge's rule, not the contract's


def test_a_runner_marked_offline_for_refused_heartbeats_is_logged_with_the_reason(
    make_forge: MakeForge, caplog: pytest.LogCaptureFixture
) -> None:
    forge = make_forge(HEARTBEAT_INTERVAL_MS=200, OFFLINE_AFTER_MISSED=1)
    client = forge.app.test_client()
    runner_id = register(client)
    token = {"Authorization": f"Bearer {client.tokens[runner_id]}"}  # type: ignore[attr-defined]
    caplog.set_level("WARNING", logger="runnerkit.forge")
    bad = {**heartbeat(runner_id), "runnerId": "unknown"}
    assert client.post("/runners/heartbeat", json=bad, headers=token).status_code == 400
    wait_for(lambda: forge.get(f"/runners/{runner_id}").json()["status"] == "offline")
    offline = [r.getMessage() for r in caplog.records if "is offline" in r.getMessage()]
    assert offline == [
        f"runner {runner_id} missed its heartbeats and is offline (heartbeat refused: "
        "runnerId: not a valid UUID (got 'unknown'))"
    ]
    refused = [r.getMessage() for r in caplog.records if r.name == "runnerkit.forge.referee"]
    assert refused == [
        f"heartbeat refused: runnerId: not a valid UUID (got 'unknown') (from runner {runner_id})"
    ]
