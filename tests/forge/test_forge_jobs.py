"""Job endpoints over the Flask test client: submit, get, list, cancel, results, events.

Jobs are started with ``JobStore.claim`` (what the dispatcher does) so these tests need no
runner process; the dispatcher itself is covered over real HTTP in test_forge_dispatcher.py.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient

from runnerkit.contracts import JobRequestSchema, parse_timestamp, utc_now
from runnerkit.errors import Conflict
from runnerkit.forge import Forge, create_app, get_forge, truth
from runnerkit.forge import db as forge_db
from runnerkit.forge.jobs import Claim, Clock
from runnerkit.service.sqlite import WriterTurns
from tests.forge.helpers import (
    capability,
    envelope,
    error_of,
    job_request,
    new_id,
    registration,
    valid,
    valid_page,
)
from tests.support.locks import lock_waiters
from tests.support.waiting import wait_until

GUIDE_EXAMPLE = Path(__file__).parents[1] / "fixtures" / "contracts"


def submit(
    client: FlaskClient,
    request: dict[str, Any],
    status: int = 202,
    headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    response = client.post("/jobs", json=request, headers=headers or {})
    assert response.status_code == status, response.get_json()
    body: dict[str, Any] = valid("JobResponse", response.get_json())
    return body


def register(client: FlaskClient, job_types: list[str] | None = None) -> str:
    body = registration(
        "fake", "http://127.0.0.1:9/health", [capability("cap", job_types or ["t"], 4)]
    )
    response = client.post("/runners/register", json=body)
    assert response.status_code == 201
    return str(response.get_json()["runnerId"])


def start(forge: Forge, job_id: str, runner_id: str) -> Claim:
    """Take the job for ``runner_id`` as the dispatcher would."""
    with forge.db.connection() as conn:
        row = forge_db.get_job(conn, job_id)
        runner = forge_db.get_runner(conn, runner_id)
    assert row is not None and runner is not None
    claim = forge.jobs.claim(row, runner, "cap")
    assert claim is not None
    return claim


def execution_response(job_id: str, runner_id: str, **extra: Any) -> dict[str, Any]:
    body = {"jobId": job_id, "success": True, "executionTimeMs": 12.5, "runnerId": runner_id}
    body.update(extra)
    return body


def event_types(client: FlaskClient, job_id: str) -> list[str]:
    page = valid_page("JobEvent", client.get(f"/jobs/{job_id}/events").get_json())
    return [e["type"] for e in page["items"]]


# --------------------------------------------------------------------------- submit


def test_submit_queues_and_is_idempotent(client: FlaskClient) -> None:
    request = job_request("t", priority=70)
    job = submit(client, request)
    assert job["status"] == "queued"
    assert job["id"] == request["id"]
    assert job["request"]["priority"] == 70
    assert job["request"]["retryPolicy"]["retryableCategories"] == []  # the JobRequest default
    again = client.post("/jobs", json=request)
    assert again.status_code == 200
    assert valid("JobResponse", again.get_json()) == job
    # Defaults written out are the same request.
    explicit = dict(request, timeoutMs=30000)
    assert client.post("/jobs", json=explicit).status_code == 200


def test_submit_same_id_different_body_conflicts(client: FlaskClient) -> None:
    request = job_request("t")
    submit(client, request)
    changed = dict(request, priority=99)
    error = error_of(client.post("/jobs", json=changed), 409, "RESOURCE_CONFLICT")
    assert error["code"] == "JOB_ID_CONFLICT"


def test_guide_example_is_rejected_naming_every_problem(client: FlaskClient) -> None:
    fixture = json.loads((GUIDE_EXAMPLE / "reject-job-request-guide-example.json").read_text())
    error = error_of(client.post("/jobs", json=fixture["value"]), 400, "VALIDATION_ERROR")
    paths = {tuple(d["path"]) for d in error["details"]}
    assert paths == {("id",), ("metadata",)}
    by_path = {d["path"][0]: d for d in error["details"]}
    assert by_path["id"]["value"] == "test-job-1"
    assert by_path["metadata"]["code"] == "required"
    assert client.get("/jobs").get_json()["total"] == 0


def test_submit_rejects_non_json_and_non_objects(client: FlaskClient) -> None:
    text = client.post("/jobs", data="hi", content_type="text/plain")
    assert error_of(text, 415, "VALIDATION_ERROR")["code"] == "UNSUPPORTED_MEDIA_TYPE"
    broken = client.post("/jobs", data='{"id": ', content_type="application/json")
    assert error_of(broken, 400, "VALIDATION_ERROR")["code"] == "INVALID_JSON"
    assert error_of(client.post("/jobs", json="x"), 400, "VALIDATION_ERROR")["code"] == (
        "INVALID_BODY"
    )


def test_submit_strict_types(client: FlaskClient) -> None:
    request = job_request("t")
    request["priority"] = "50"
    request["timeoutMs"] = 0
    request["metadata"]["createdAt"] = "2026-01-01T00:00:00+00:00"
    error = error_of(client.post("/jobs", json=request), 400, "VALIDATION_ERROR")
    paths = {tuple(d["path"]) for d in error["details"]}
    assert paths == {("priority",), ("timeoutMs",), ("metadata", "createdAt")}


def test_get_job_and_unknown(client: FlaskClient) -> None:
    job = submit(client, job_request("t"))
    response = client.get(f"/jobs/{job['id']}")
    assert response.status_code == 200
    assert valid("JobResponse", response.get_json())["status"] == "queued"
    assert error_of(client.get(f"/jobs/{new_id()}"), 404, "RESOURCE_NOT_FOUND")["code"] == (
        "JOB_NOT_FOUND"
    )


# --------------------------------------------------------------------------- listing


def test_list_filters_and_pagination(client: FlaskClient, forge: Forge) -> None:
    runner_id = register(client, ["a"])
    a_jobs = [submit(client, job_request("a"))["id"] for _ in range(3)]
    b_jobs = [submit(client, job_request("b"))["id"] for _ in range(4)]
    forge.jobs.cancel(b_jobs[0])
    start(forge, a_jobs[0], runner_id)

    page = valid_page("JobResponse", client.get("/jobs").get_json())
    assert page["total"] == 7
    assert [j["id"] for j in page["items"]] == list(reversed(a_jobs + b_jobs))  # newest first

    by_type = valid_page("JobResponse", client.get("/jobs?type=a").get_json())
    assert {j["id"] for j in by_type["items"]} == set(a_jobs)

    running = client.get("/jobs?status=running").get_json()
    assert [j["id"] for j in running["items"]] == [a_jobs[0]]
    several = client.get("/jobs?status=running,cancelled").get_json()
    assert {j["id"] for j in several["items"]} == {a_jobs[0], b_jobs[0]}
    queued_b = client.get("/jobs?status=queued&type=b").get_json()
    assert queued_b["total"] == 3

    first = valid_page("JobResponse", client.get("/jobs?limit=3").get_json())
    second = valid_page("JobResponse", client.get("/jobs?limit=3&offset=3").get_json())
    last = valid_page("JobResponse", client.get("/jobs?limit=3&offset=6").get_json())
    assert first["hasMore"] and second["hasMore"] and not last["hasMore"]
    ids = [j["id"] for p in (first, second, last) for j in p["items"]]
    assert ids == [j["id"] for j in page["items"]]
    assert client.get("/jobs?offset=100").get_json()["items"] == []


def test_list_rejects_bad_query(client: FlaskClient) -> None:
    error = error_of(client.get("/jobs?status=done"), 400, "VALIDATION_ERROR")
    assert error["details"][0]["path"] == ["status"]
    error_of(client.get("/jobs?limit=abc"), 400, "VALIDATION_ERROR")
    error_of(client.get("/jobs?limit=100000"), 400, "VALIDATION_ERROR")
    error_of(client.get("/jobs?offset=-1"), 400, "VALIDATION_ERROR")


# --------------------------------------------------------------------------- cancel


def test_cancel_queued_running_and_finished(client: FlaskClient, forge: Forge) -> None:
    runner_id = register(client)
    queued = submit(client, job_request("t"))["id"]
    response = client.post(f"/jobs/{queued}/cancel")
    assert response.status_code == 200
    assert valid("JobResponse", response.get_json())["status"] == "cancelled"
    assert client.post(f"/jobs/{queued}/cancel").status_code == 200  # already cancelled
    assert event_types(client, queued) == ["job.created", "job.queued", "job.cancelled"]

    running = submit(client, job_request("t"))["id"]
    start(forge, running, runner_id)
    assert client.post(f"/jobs/{running}/cancel").get_json()["status"] == "cancelled"

    done = submit(client, job_request("t"))["id"]
    start(forge, done, runner_id)
    assert (
        client.post(f"/jobs/{done}/result", json=execution_response(done, runner_id)).status_code
        == 200
    )
    error = error_of(client.post(f"/jobs/{done}/cancel"), 409, "RESOURCE_CONFLICT")
    assert error["code"] == "JOB_FINISHED"
    error_of(client.post(f"/jobs/{new_id()}/cancel"), 404, "RESOURCE_NOT_FOUND")


def test_cancelled_job_releases_its_slot_only_when_the_runner_is_done(
    client: FlaskClient, forge: Forge
) -> None:
    runner_id = register(client)
    job_id = submit(client, job_request("t"))["id"]
    start(forge, job_id, runner_id)
    client.post(f"/jobs/{job_id}/cancel")
    with forge.db.connection() as conn:
        assert forge_db.slot_counts(conn) == {(runner_id, "cap"): 1}  # the runner still works
    late = client.post(f"/jobs/{job_id}/result", json=execution_response(job_id, runner_id))
    assert late.status_code == 200
    assert late.headers["X-Result-Outcome"] == "ignored"
    job = valid("JobResponse", late.get_json())
    assert job["status"] == "cancelled" and "result" not in job
    with forge.db.connection() as conn:
        assert forge_db.slot_counts(conn) == {}


# --------------------------------------------------------------------------- results


def test_result_delivered_twice_is_recorded_once(client: FlaskClient, forge: Forge) -> None:
    runner_id = register(client)
    job_id = submit(client, job_request("t", timeout_ms=60_000))["id"]
    claim = start(forge, job_id, runner_id)
    assert claim.asynchronous  # timeoutMs above ASYNC_THRESHOLD_MS
    result = execution_response(job_id, runner_id, data={"words": 3})
    first = client.post(f"/jobs/{job_id}/result", json=result)
    assert first.status_code == 200
    assert first.headers["X-Result-Outcome"] == "recorded"
    job = valid("JobResponse", first.get_json())
    assert job["status"] == "completed"
    assert job["result"]["success"] is True
    assert job["result"]["data"] == {"words": 3}
    metadata = job["result"]["metadata"]
    assert metadata["attempts"] == 1
    assert metadata["runnerId"] == runner_id
    assert metadata["runnerVersion"] == "1.2.3"
    assert metadata["startedAt"] <= metadata["completedAt"]
    events_before = event_types(client, job_id)

    second = client.post(f"/jobs/{job_id}/result", json=result)
    assert second.status_code == 200
    assert second.headers["X-Result-Outcome"] == "duplicate"
    assert valid("JobResponse", second.get_json()) == job
    assert client.get(f"/jobs/{job_id}").get_json() == job
    assert event_types(client, job_id) == events_before
    assert events_before == ["job.created", "job.queued", "job.started", "job.completed"]


def test_async_failure_result_applies_the_retry_policy(client: FlaskClient, forge: Forge) -> None:
    runner_id = register(client)
    policy = {"maxRetries": 1, "backoffMs": 500, "backoffMultiplier": 2}
    job_id = submit(client, job_request("t", timeout_ms=60_000, retry_policy=policy))["id"]
    start(forge, job_id, runner_id)
    failure = execution_response(
        job_id, runner_id, success=False, error=envelope("RUNTIME_ERROR", "BOOM", retryable=True)
    )
    job = valid("JobResponse", client.post(f"/jobs/{job_id}/result", json=failure).get_json())
    assert job["status"] == "retrying"
    assert job["error"]["code"] == "BOOM"
    retrying = client.get(f"/jobs/{job_id}/events").get_json()["items"][-1]
    assert retrying["type"] == "job.retrying"
    assert retrying["data"]["delayMs"] == 500  # retry_delay(0, policy)

    with forge.db.connection() as conn:
        row = forge_db.get_job(conn, job_id)
        runner = forge_db.get_runner(conn, runner_id)
    assert row is not None and runner is not None
    assert forge.jobs.claim(row, runner, "cap") is not None  # attempt 2 (the time is not checked)
    failure2 = dict(failure, executionTimeMs=3)  # a different delivery
    job = valid("JobResponse", client.post(f"/jobs/{job_id}/result", json=failure2).get_json())
    assert job["status"] == "failed"  # maxRetries 1: two attempts in all
    assert job["result"]["success"] is False
    assert job["result"]["metadata"]["attempts"] == 2
    assert job["error"]["code"] == "BOOM"


def test_result_for_unknown_job_or_wrong_id(client: FlaskClient, forge: Forge) -> None:
    runner_id = register(client)
    unknown = new_id()
    error_of(
        client.post(f"/jobs/{unknown}/result", json=execution_response(unknown, runner_id)),
        404,
        "RESOURCE_NOT_FOUND",
    )
    job_id = submit(client, job_request("t"))["id"]
    start(forge, job_id, runner_id)
    mismatch = client.post(f"/jobs/{job_id}/result", json=execution_response(new_id(), runner_id))
    assert error_of(mismatch, 400, "VALIDATION_ERROR")["code"] == "JOB_ID_MISMATCH"
    as_runner = {"Authorization": f"Bearer {client.tokens[runner_id]}"}  # type: ignore[attr-defined]
    invalid = client.post(
        f"/jobs/{job_id}/result", json={"jobId": job_id, "success": "yes"}, headers=as_runner
    )
    paths = {tuple(d["path"]) for d in error_of(invalid, 400, "VALIDATION_ERROR")["details"]}
    assert paths == {("success",), ("executionTimeMs",), ("runnerId",)}


def test_result_from_another_runner_is_refused(client: FlaskClient, forge: Forge) -> None:
    runner_id = register(client)
    job_id = submit(client, job_request("t"))["id"]
    start(forge, job_id, runner_id)
    # Another registered runner, with its own credential: naming itself or the job's runner.
    elsewhere = registration("other", "http://127.0.0.1:8/health", [capability("c", ["x"])])
    other = client.post("/runners/register", json=elsewhere).get_json()["runnerId"]
    for named in (other, runner_id):
        stranger = client.post(
            f"/jobs/{job_id}/result",
            json=execution_response(job_id, named),
            headers={"Authorization": f"Bearer {client.tokens[other]}"},  # type: ignore[attr-defined]
        )
        assert error_of(stranger, 403, "AUTHORIZATION_ERROR")["code"] == "NOT_YOUR_RUNNER"
    # Without any credential, naming the job's runner proves nothing either.
    anonymous = client.post(
        f"/jobs/{job_id}/result",
        json=execution_response(job_id, runner_id),
        headers={"Authorization": ""},
    )
    error_of(anonymous, 401, "AUTHENTICATION_ERROR")
    assert client.get(f"/jobs/{job_id}").get_json()["status"] == "running"


# --------------------------------------------------------------------------- events


def progress(job_id: str, percent: float, **extra: Any) -> dict[str, Any]:
    event = {
        "id": new_id(),
        "type": "job.progress",
        "jobId": job_id,
        "timestamp": utc_now(),
        "data": {"percent": percent, "message": f"{percent}%"},
        "metadata": {"service": "fake", "version": "1.2.3"},
    }
    event.update(extra)
    return event


def test_progress_events(client: FlaskClient, forge: Forge) -> None:
    runner_id = register(client)
    job_id = submit(client, job_request("t"))["id"]
    # A job no runner was sent: no runner's credential speaks for it.
    not_started = client.post(
        f"/jobs/{job_id}/events",
        json=progress(job_id, 10),
        headers={"Authorization": f"Bearer {client.tokens[runner_id]}"},  # type: ignore[attr-defined]
    )
    assert error_of(not_started, 403, "AUTHORIZATION_ERROR")["code"] == "NOT_YOUR_RUNNER"

    start(forge, job_id, runner_id)
    event = progress(job_id, 50)
    response = client.post(f"/jobs/{job_id}/events", json=event)
    assert response.status_code == 202
    assert response.get_json() == {"id": event["id"], "jobId": job_id, "recorded": True}
    assert client.post(f"/jobs/{job_id}/events", json=event).get_json()["recorded"] is False
    client.post(f"/jobs/{job_id}/result", json=execution_response(job_id, runner_id))
    late = client.post(f"/jobs/{job_id}/events", json=progress(job_id, 100))
    assert late.get_json()["recorded"] is True  # outboxes deliver late; history keeps it

    page = valid_page("JobEvent", client.get(f"/jobs/{job_id}/events").get_json())
    types = [e["type"] for e in page["items"]]
    assert types == [
        "job.created",
        "job.queued",
        "job.started",
        "job.progress",
        "job.completed",
        "job.progress",
    ]
    assert page["items"][3] == event
    assert all(e["jobId"] == job_id for e in page["items"])
    ours = [e for e in page["items"] if e["type"] != "job.progress"]
    assert {e["metadata"]["service"] for e in ours} == {"jobforge"}


def test_progress_event_checks(client: FlaskClient, forge: Forge) -> None:
    runner_id = register(client)
    job_id = submit(client, job_request("t"))["id"]
    start(forge, job_id, runner_id)
    wrong = progress(new_id(), 1, type="job.completed")
    error = error_of(client.post(f"/jobs/{job_id}/events", json=wrong), 400, "VALIDATION_ERROR")
    assert {tuple(d["path"]) for d in error["details"]} == {("jobId",), ("type",)}
    invalid = progress(job_id, 1, type="job.exploded")
    error_of(client.post(f"/jobs/{job_id}/events", json=invalid), 400, "VALIDATION_ERROR")
    other = new_id()
    as_runner = {"Authorization": f"Bearer {client.tokens[runner_id]}"}  # type: ignore[attr-defined]
    error_of(
        client.post(f"/jobs/{other}/events", json=progress(other, 1), headers=as_runner),
        404,
        "RESOURCE_NOT_FOUND",
    )
    error_of(client.get(f"/jobs/{other}/events"), 404, "RESOURCE_NOT_FOUND")


def test_token_protects_result_and_events(store_config: dict[str, str]) -> None:
    app = create_app({**store_config, "DISPATCHER": False, "TOKEN": "t0k"})
    try:
        client = app.test_client()
        auth = {"Authorization": "Bearer t0k"}
        job_id = submit(client, job_request("t"), headers=auth)["id"]
        result = execution_response(job_id, new_id())
        error_of(client.post(f"/jobs/{job_id}/result", json=result), 401, "AUTHENTICATION_ERROR")
        error_of(
            client.post(f"/jobs/{job_id}/events", json=progress(job_id, 1)),
            401,
            "AUTHENTICATION_ERROR",
        )
        error_of(client.get(f"/jobs/{job_id}/events"), 401, "AUTHENTICATION_ERROR")
        assert client.get(f"/jobs/{job_id}/events", headers=auth).status_code == 200
        # The forge's TOKEN is not a runner's credential: results need the runner's own.
        answer = client.post(f"/jobs/{job_id}/result", json=result, headers=auth)
        assert error_of(answer, 403, "AUTHORIZATION_ERROR")["code"] == "RUNNER_TOKEN_REQUIRED"
    finally:
        get_forge(app).close()


def test_status_changes_are_truth_assertions(client: FlaskClient, forge: Forge) -> None:
    runner_id = register(client)
    job_id = submit(client, job_request("t"))["id"]
    start(forge, job_id, runner_id)
    client.post(f"/jobs/{job_id}/result", json=execution_response(job_id, runner_id, data=[1]))
    query = {"id": new_id(), "pattern": {"subject": job_id, "predicate": "status"}, "filters": {}}
    answer = valid("TruthQueryResult", client.post("/query", json=query).get_json())
    assert [a["object"] for a in answer["assertions"]] == ["completed", "running", "queued"]
    assert {a["source"] for a in answer["assertions"]} == {"jobforge"}
    query["pattern"] = {"subject": job_id, "predicate": "result"}
    (result,) = client.post("/query", json=query).get_json()["assertions"]
    assert result["object"]["success"] is True and result["object"]["data"] == [1]
    assert result["source"] == "fake"  # the runner's name
    valid("JobResult", result["object"])


def test_dashboard(client: FlaskClient, forge: Forge) -> None:
    register(client)
    job = job_request("t", data={"text": "<script>alert(1)</script>"})
    submit(client, job)
    page = client.get("/")
    assert page.status_code == 200
    assert page.mimetype == "text/html"
    text = page.get_data(as_text=True)
    assert job["id"] in text and "fake" in text
    assert "<script>" not in text


# --------------------------------------------------------------------------- batched writes


def test_submissions_written_together_keep_their_own_answers(forge: Forge) -> None:
    """Concurrent submissions share transactions; each still gets 202, 200 or 409."""
    schema = JobRequestSchema()
    requests = [schema.load(job_request("t")) for _ in range(16)]
    twice = schema.load(job_request("t"))
    clash = dict(twice, priority=1)
    work: list[dict[str, Any]] = [*requests, twice, twice, clash]
    start = threading.Barrier(len(work))
    answers: dict[int, Any] = {}

    def send(index: int) -> None:
        start.wait()
        try:
            answers[index] = forge.jobs.submit(work[index])[0]
        except Conflict:
            answers[index] = 409

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(work))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert [answers[i] for i in range(16)] == [202] * 16
    # Three submissions of one id: whichever is written first decides the others' answers.
    outcomes = sorted(answers[i] for i in (16, 17, 18))
    assert outcomes in ([200, 202, 409], [202, 409, 409])
    for request in requests:
        assert forge.jobs.get(request["id"])["status"] == "queued"
        events = forge.jobs.events(request["id"], limit=10, offset=0)["items"]
        assert [e["type"] for e in events] == ["job.created", "job.queued"]


def test_one_transaction_claims_several_jobs_and_skips_those_that_moved_on(
    client: FlaskClient, forge: Forge
) -> None:
    runner_id = register(client)
    ids = [submit(client, job_request("t", priority=p))["id"] for p in (10, 90, 50)]
    assert client.post(f"/jobs/{ids[2]}/cancel").status_code == 200
    with forge.db.connection() as conn:
        runner = forge_db.get_runner(conn, runner_id)
        rows = [forge_db.get_job(conn, job_id) for job_id in ids]
    assert runner is not None
    picks = [(row, runner, "cap") for row in rows if row is not None]
    with forge.db.tx() as conn:
        claims = forge.jobs.claim_all(conn, picks, Clock())
    assert [c.job_id for c in claims] == ids[:2]
    assert [c.attempt for c in claims] == [1, 1]
    assert forge.jobs.get(ids[2])["status"] == "cancelled"
    assert event_types(client, ids[2]) == ["job.created", "job.queued", "job.cancelled"]
    for job_id in ids[:2]:
        assert forge.jobs.get(job_id)["status"] == "running"
        assert event_types(client, job_id)[-1] == "job.started"


@pytest.mark.parametrize("forge_backend", ["sqlite"])  # holds SQLite's writer-turn lock file
def test_a_result_is_stamped_once_its_transaction_has_its_turn(
    client: FlaskClient, forge: Forge, db_path: str
) -> None:
    """A result that waits for another process's write is stamped when it is written, not
    when it arrived: otherwise the dispatcher, stamping first and waiting behind this
    result, records the next job started in the slot it frees before this job completed."""
    runner_id = register(client)
    job_id = submit(client, job_request("t"))["id"]
    start(forge, job_id, runner_id)
    lock = Path(f"{db_path}.writer.lock")
    statuses: list[int] = []

    def deliver() -> None:
        result = execution_response(job_id, runner_id)
        statuses.append(client.post(f"/jobs/{job_id}/result", json=result).status_code)

    thread = threading.Thread(target=deliver)
    with WriterTurns(str(lock)).hold():  # the turn of another forge process's writer
        thread.start()
        wait_until(lambda: lock_waiters(lock), 10, "the result never waited for its turn")
        waited = time.time()
        wait_until(lambda: time.time() > waited + 0.01, 10, "the clock stands still")
        released = time.time()
    thread.join(10)
    assert statuses == [200]
    (completed,) = [
        e
        for e in client.get(f"/jobs/{job_id}/events").get_json()["items"]
        if e["type"] == "job.completed"
    ]
    stamped_ms = round(parse_timestamp(completed["timestamp"]).timestamp() * 1000)
    assert stamped_ms >= int(released * 1000)


def test_a_claim_is_stamped_when_its_transaction_runs_not_when_its_tick_began(
    client: FlaskClient, forge: Forge
) -> None:
    """A slot another transaction freed while the tick waited for its turn is never shown
    freed after the claim that took it: the claim's times are read inside its transaction."""
    runner_id = register(client)
    first = submit(client, job_request("t"))["id"]
    start(forge, first, runner_id)
    tick_began = Clock()  # then the tick waits while the first job's result is recorded
    done = execution_response(first, runner_id)
    assert client.post(f"/jobs/{first}/result", json=done).status_code == 200
    completed = client.get(f"/jobs/{first}/events").get_json()["items"][-1]
    assert completed["type"] == "job.completed"
    second = submit(client, job_request("t"))["id"]
    with forge.db.connection() as conn:
        row, runner = forge_db.get_job(conn, second), forge_db.get_runner(conn, runner_id)
    assert row is not None and runner is not None
    with forge.db.tx() as conn:
        (claim,) = forge.jobs.claim_all(conn, [(row, runner, "cap")], tick_began)
    started = client.get(f"/jobs/{second}/events").get_json()["items"][-1]
    assert started["type"] == "job.started"
    assert started["timestamp"] >= completed["timestamp"]
    assert forge.jobs.get(second)["status"] == "running" and claim.attempt == 1


def test_the_forges_own_documents_are_canonical_json(client: FlaskClient, forge: Forge) -> None:
    """Events and assertions written in batches read back as db.dumps wrote them."""
    runner_id = register(client)
    job_id = submit(client, job_request("t"))["id"]
    start(forge, job_id, runner_id)
    result = execution_response(job_id, runner_id, data={"b": 2.0, "a": ["é", 1.5]})
    assert client.post(f"/jobs/{job_id}/result", json=result).status_code == 200
    with forge.db.connection() as conn:
        events = conn.execute("SELECT * FROM events WHERE job_id = ?", (job_id,)).fetchall()
        assertions = conn.execute(
            "SELECT * FROM assertions WHERE subject = ? ORDER BY seq", (job_id,)
        ).fetchall()
    expected = ["job.created", "job.queued", "job.started", "job.completed"]
    assert [e["type"] for e in events] == expected
    assert [json.loads(a["object"]) for a in assertions][:3] == ["queued", "running", "completed"]
    for row in [*events, *assertions]:
        assert forge_db.dumps(json.loads(row["document"])) == row["document"]
        assert json.loads(row["document"])["id"] == row["id"]
        assert uuid.UUID(row["id"]).version == 7
    for row in events:
        valid("JobEvent", json.loads(row["document"]))
    for row in assertions:
        document = json.loads(row["document"])
        valid("TruthAssertion", document)
        assert row["ts"] == truth.epoch(document["timestamp"])
        assert forge_db.dumps(document["object"]) == row["object"]
    assert json.loads(assertions[-1]["object"])["data"] == {"a": ["é", 1.5], "b": 2}


@pytest.mark.parametrize("forge_backend", ["sqlite"])  # SQLite's write-ahead log
def test_the_write_ahead_log_is_checkpointed_in_long_strides(
    client: FlaskClient, forge: Forge, db_path: str
) -> None:
    """Commits checkpoint the WAL only once it holds WAL_AUTOCHECKPOINT frames, not at
    SQLite's 1,000: a checkpoint copies the same hot index pages again each time. The WAL
    file keeps the size it reached, so past 1,000 frames without a checkpoint it is larger
    than a 1,000-frame WAL could be."""
    from runnerkit.forge.db.sqlite import WAL_AUTOCHECKPOINT

    wal = Path(f"{db_path}-wal")
    with forge.db.connection() as conn:
        page = int(conn.execute("PRAGMA page_size").fetchone()[0])
        assert int(conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0]) == WAL_AUTOCHECKPOINT
    frame = page + 24
    thousand = 32 + 1000 * frame  # the WAL's header, then frames of a header and a page
    for _ in range(1500):  # each adds a few frames; a 1,000-frame WAL would never grow past
        submit(client, job_request("t", data={"pad": "x" * 2000}))
        if wal.stat().st_size > 2 * thousand:
            break
    assert 2 * thousand < wal.stat().st_size < 32 + WAL_AUTOCHECKPOINT * frame
