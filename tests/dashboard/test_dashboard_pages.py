"""The dashboard pages over Flask's test client: what they show, filters, escaping, redaction."""

from __future__ import annotations

import json
import time
import uuid

from flask.testing import FlaskClient

from runnerkit.contracts import JOB_STATUSES, utc_now
from runnerkit.errors import make_envelope
from runnerkit.forge import Forge
from runnerkit.forge.jobs import Clock
from tests.dashboard.conftest import SECRETS, Seeded, deliver, page, register, start, submit
from tests.dashboard.html_query import Node
from tests.forge.helpers import job_request, new_id


def rows_by_id(doc: Node) -> dict[str, Node]:
    return {row["data-job-id"]: row for row in doc.find_all("job-row")}


def filter_counts(doc: Node) -> dict[str, int]:
    return {
        link["data-status"]: int(link.find("status-count").text())
        for link in doc.find_all("status-filter")
    }


# --------------------------------------------------------------------------- the dashboard


def test_runners_are_listed_with_status_capabilities_and_active_jobs(
    client: FlaskClient, seeded: Seeded
) -> None:
    doc = page(client, "/")
    runners = {row["data-runner-id"]: row for row in doc.find_all("runner-row")}
    assert set(runners) == set(seeded.runners.values())

    alpha = runners[seeded.runners["alpha"]]
    assert alpha.find("runner-name").text() == "alpha"
    assert alpha.find("runner-status").text() == "healthy"
    assert alpha["data-status"] == "healthy"
    assert "text.stats" in alpha.find("runner-capabilities").text()
    assert "demo.slow" in alpha.find("runner-capabilities").text()
    # Only the job the forge records as running on alpha counts (not the finished ones).
    assert alpha.find("runner-active-jobs").text() == "1"
    assert alpha.find("runner-heartbeat").find(tag="time")["datetime"].endswith("Z")

    beta = runners[seeded.runners["beta"]]
    assert beta.find("runner-status").text() == "degraded"
    assert beta.find("runner-active-jobs").text() == "0"
    assert "data.checksum" in beta.find("runner-capabilities").text()
    assert doc.find("runners-summary").text() == "1 healthy of 2"


def test_jobs_are_listed_newest_first_with_their_facts(client: FlaskClient, seeded: Seeded) -> None:
    doc = page(client, "/")
    rows = doc.find_all("job-row")
    order = [row["data-job-id"] for row in rows]
    assert order == list(reversed(seeded.jobs.values()))
    by_id = rows_by_id(doc)
    for name, job_id in seeded.jobs.items():
        row = by_id[job_id]
        assert row["data-status"] == seeded.status[name]
        assert row.find("job-status").text() == seeded.status[name]
        link = row.find("job-link")
        assert link["href"] == f"/jobs/{job_id}/view"

    completed = by_id[seeded.jobs["completed"]]
    assert completed.find("job-type").text() == "text.stats"
    assert completed.find("job-priority").text() == "70"
    assert completed.find("job-attempts").text() == "1"
    assert completed.find("job-duration").text().endswith(("ms", "s"))
    assert '"words": 2' in completed.find("job-outcome").text()

    failed = by_id[seeded.jobs["failed"]]
    outcome = failed.find("job-outcome").text()
    assert "VALIDATION_ERROR INVALID_PAYLOAD" in outcome
    assert "must be a string" in outcome

    running = by_id[seeded.jobs["running"]]
    assert running.find("job-progress").find(tag="progress")["value"] == "40"
    assert "40%" in running.find("job-progress").text()
    assert running.find("job-duration").text() != "—"  # elapsed so far

    retrying = by_id[seeded.jobs["retrying"]]
    assert "NETWORK_ERROR UPSTREAM_DOWN" in retrying.find("job-outcome").text()
    queued = by_id[seeded.jobs["queued"]]
    assert queued.find("job-attempts").text() == "0"
    assert queued.find("job-duration").text() == "—"


def test_status_links_carry_counts(client: FlaskClient, seeded: Seeded) -> None:
    doc = page(client, "/")
    counts = filter_counts(doc)
    assert list(counts) == ["all", *JOB_STATUSES]
    assert counts["all"] == len(seeded.jobs)
    for status in JOB_STATUSES:
        assert counts[status] == list(seeded.status.values()).count(status), status
    links = {link["data-status"]: link for link in doc.find_all("status-filter")}
    assert links["failed"]["href"] == "/?status=failed"
    assert links["all"]["aria-current"] == "page"


def test_status_filter(client: FlaskClient, seeded: Seeded) -> None:
    doc = page(client, "/?status=failed")
    assert list(rows_by_id(doc)) == [seeded.jobs["failed"]]
    current = [
        link["data-status"]
        for link in doc.find_all("status-filter")
        if "aria-current" in link.attrs
    ]
    assert current == ["failed"]
    # Counts stay global while filtering.
    assert filter_counts(doc)["all"] == len(seeded.jobs)

    doc = page(client, "/?status=queued,running")
    assert set(rows_by_id(doc)) == {seeded.jobs["queued"], seeded.jobs["running"]}
    doc = page(client, "/?status=pending")
    assert doc.find_all("job-row") == []
    assert "No pending jobs" in doc.find("jobs-empty").text()


def test_bad_filters_get_a_friendly_page(client: FlaskClient, seeded: Seeded) -> None:
    doc = page(client, "/?status=exploded", status=400)
    problem = doc.find("problem")
    assert "Unknown job status exploded" in problem.text()
    assert problem.find(tag="a")["href"] == "/"
    page(client, "/?limit=0", status=400)
    page(client, "/?offset=-1", status=400)
    page(client, "/?refresh=soon", status=400)


def test_pagination(client: FlaskClient, seeded: Seeded) -> None:
    newest_first = list(reversed(seeded.jobs.values()))
    doc = page(client, "/?limit=4")
    assert [r["data-job-id"] for r in doc.find_all("job-row")] == newest_first[:4]
    older = doc.find("older")["href"]
    assert doc.find_all("newer") == []
    doc = page(client, older)
    assert [r["data-job-id"] for r in doc.find_all("job-row")] == newest_first[4:]
    assert doc.find_all("older") == []
    assert doc.find("newer")["href"] == "/?limit=4"


def test_empty_forge(client: FlaskClient) -> None:
    doc = page(client, "/")
    assert "No runner is registered" in doc.find("runners-empty").text()
    assert "No jobs yet" in doc.find("jobs-empty").text()
    assert filter_counts(doc)["all"] == 0


def test_pages_refresh_themselves_and_fit_a_phone(client: FlaskClient, seeded: Seeded) -> None:
    response = client.get("/")
    doc = page(client, "/")
    metas = {m.attrs.get("name") or m.attrs.get("http-equiv"): m for m in doc.find_all(tag="meta")}
    assert metas["refresh"]["content"] == "5"
    assert metas["viewport"]["content"] == "width=device-width, initial-scale=1"
    # No script at all, and the policy forbids any.
    assert doc.find_all(tag="script") == []
    assert "default-src 'none'" in response.headers["Content-Security-Policy"]
    assert response.headers["Cache-Control"] == "no-store"
    stylesheet = doc.find(tag="link", rel="stylesheet")["href"]
    css = client.get(stylesheet)
    assert css.status_code == 200 and css.mimetype == "text/css"
    assert "@media (max-width: 760px)" in css.get_data(as_text=True)

    paused = page(client, "/?refresh=0&status=failed")
    assert "refresh" not in {m.attrs.get("http-equiv") for m in paused.find_all(tag="meta")}
    state = paused.find("refresh-state")
    assert "paused" in state.text()
    assert state.find(tag="a")["href"] == "/?status=failed"
    slower = page(client, "/?refresh=30")
    assert slower.find(tag="meta", http_equiv="refresh")["content"] == "30"

    # A running job's page refreshes; a finished one's no longer does.
    running = page(client, f"/jobs/{seeded.jobs['running']}/view")
    assert running.find(tag="meta", http_equiv="refresh")["content"] == "5"
    done = page(client, f"/jobs/{seeded.jobs['completed']}/view")
    assert done.find_all(tag="meta", http_equiv="refresh") == []
    assert "no longer refreshes" in done.find("job-detail").text()


# --------------------------------------------------------------------------- the job page


def test_job_page_of_a_completed_job(client: FlaskClient, seeded: Seeded) -> None:
    job_id = seeded.jobs["completed"]
    doc = page(client, f"/jobs/{job_id}/view")
    detail = doc.find("job-detail")
    assert detail["data-job-id"] == job_id
    assert detail.find("job-id").text() == job_id
    assert detail.find("job-status").text() == "completed"
    assert detail.find("job-type").text() == "text.stats"
    assert detail.find("job-attempts").text().startswith("1")

    request_text = doc.find("job-request").raw_text()
    assert f'"id": "{job_id}"' in request_text
    assert '"text": "hello world"' in request_text
    assert '\n  "payload": {' in request_text  # pretty, indented JSON
    result_text = doc.find("job-result").raw_text()
    assert '"success": true' in result_text and '"words": 2' in result_text
    assert doc.find_all("job-error") == []

    events = [row["data-type"] for row in doc.find_all("event-row")]
    assert events == [
        "job.created",
        "job.queued",
        "job.started",
        "job.progress",
        "job.completed",
    ]
    predicates = [row["data-predicate"] for row in doc.find_all("assertion-row")]
    assert sorted(predicates) == ["result", "status", "status", "status"]
    statuses = [
        row.find("assertion-object").text()
        for row in doc.find_all("assertion-row")
        if row["data-predicate"] == "status"
    ]
    assert statuses == ["completed", "running", "queued"]
    json_link = [a for a in detail.find_all(tag="a") if a.text() == "JSON"]
    assert json_link[0]["href"] == f"/jobs/{job_id}"


def test_job_page_of_a_failed_job_shows_the_error_envelope(
    client: FlaskClient, seeded: Seeded
) -> None:
    doc = page(client, f"/jobs/{seeded.jobs['failed']}/view")
    assert doc.find("job-status").text() == "failed"
    summary = doc.find("job-error-summary").text()
    assert "VALIDATION_ERROR · INVALID_PAYLOAD" in summary
    assert "payload.data.text: Not a valid string" in summary
    # A failed attempt has a JobResult (success false) that carries the error envelope.
    result_text = doc.find("job-result").raw_text()
    assert '"success": false' in result_text
    assert '"code": "INVALID_PAYLOAD"' in result_text
    assert doc.find_all("job-error") == []  # not shown twice
    assert "job.failed" in [row["data-type"] for row in doc.find_all("event-row")]


def test_job_page_of_a_waiting_job(client: FlaskClient, seeded: Seeded) -> None:
    doc = page(client, f"/jobs/{seeded.jobs['queued']}/view")
    assert doc.find("job-status").text() == "queued"
    assert "No result yet" in doc.find("job-no-result").text()
    assert '"data.checksum"' in doc.find("job-request").raw_text()
    doc = page(client, f"/jobs/{seeded.jobs['retrying']}/view")
    assert doc.find("job-status").text() == "retrying"
    assert '"code": "UPSTREAM_DOWN"' in doc.find("job-error").raw_text()


def test_job_page_shows_outside_assertions_about_the_job(
    client: FlaskClient, seeded: Seeded
) -> None:
    job_id = seeded.jobs["queued"]
    assertion = {
        "id": new_id(),
        "subject": job_id,
        "predicate": "reviewed-by",
        "object": {"who": "<b>ops</b>", "authorization": "Bearer SECRET-in-assertion"},
        "confidence": 0.9,
        "source": "auditor",
        "timestamp": utc_now(),
    }
    assert client.post("/assert", json=assertion).status_code == 201
    response = client.get(f"/jobs/{job_id}/view")
    text = response.get_data(as_text=True)
    assert "SECRET-in-assertion" not in text and "<b>ops</b>" not in text
    doc = page(client, f"/jobs/{job_id}/view")
    (row,) = doc.find_all("assertion-row", data_predicate="reviewed-by")
    assert "auditor" in row.text() and "0.9" in row.text()
    assert '"who": "<b>ops</b>"' in row.find("assertion-object").raw_text()
    assert '"authorization": "[REDACTED]"' in row.find("assertion-object").raw_text()


def test_unknown_job_is_a_friendly_404(client: FlaskClient, seeded: Seeded) -> None:
    missing = str(uuid.uuid4())
    doc = page(client, f"/jobs/{missing}/view", status=404)
    problem = doc.find("not-found")
    assert "No such job" in problem.text()
    assert missing in problem.text()
    assert problem.find(tag="a")["href"] == "/"
    page(client, "/jobs/not-a-uuid/view", status=404)
    # The JSON API keeps its envelopes.
    api = client.get(f"/jobs/{missing}")
    assert api.status_code == 404 and api.mimetype == "application/json"
    assert api.get_json()["error"]["code"] == "JOB_NOT_FOUND"


# --------------------------------------------------------------------------- safety


HOSTILE_TEXT = "<script>alert('pwned')</script>"
HOSTILE_TYPE = '"><img src=x onerror=alert(1)>'


def test_nothing_from_a_job_can_inject_html(client: FlaskClient, forge: Forge) -> None:
    runner = register(client, "evil", [HOSTILE_TYPE], tags=["<svg onload=alert(1)>"])
    hostile = job_request(HOSTILE_TYPE, data={"text": HOSTILE_TEXT, "<b>key</b>": "</pre><h1>"})
    job_id = submit(client, hostile)
    start(forge, job_id, runner)
    message = "bad input: <iframe src=javascript:alert(1)></iframe>"
    error = make_envelope(
        "VALIDATION_ERROR", "X<script>", message, service="<evil>", retryable=False
    )
    response = client.post(
        f"/jobs/{job_id}/result",
        json={
            "jobId": job_id,
            "runnerId": runner,
            "executionTimeMs": 1,
            "success": False,
            "error": error,
        },
    )
    assert response.status_code == 200, response.get_json()

    for path in ("/", f"/jobs/{job_id}/view", "/?status=failed"):
        text = client.get(path).get_data(as_text=True)
        for raw in ("<script", "<img", "<iframe", "<svg", "<b>key", "</pre><h1>"):
            assert raw not in text, (path, raw)
    index = page(client, "/")
    row = index.find("job-row", data_job_id=job_id)
    assert row.find("job-type").text() == HOSTILE_TYPE
    assert message in row.find("job-outcome").text()
    detail = page(client, f"/jobs/{job_id}/view")
    assert HOSTILE_TEXT in detail.find("job-request").raw_text().replace("\\", "")
    assert message in detail.find("job-error-summary").text()


def test_secrets_are_redacted_everywhere(client: FlaskClient, seeded: Seeded) -> None:
    pages = ["/", "/?status=completed", "/?status=running"]
    pages += [f"/jobs/{job_id}/view" for job_id in seeded.jobs.values()]
    for path in pages:
        text = client.get(path).get_data(as_text=True)
        for secret in SECRETS:
            assert secret not in text, (path, secret)
    doc = page(client, f"/jobs/{seeded.jobs['completed']}/view")
    request_text = doc.find("job-request").raw_text()
    assert '"api_token": "[REDACTED]"' in request_text
    assert '"password": "[REDACTED]"' in request_text
    assert '"text": "hello world"' in request_text  # the rest is intact
    assert '"client_secret": "[REDACTED]"' in doc.find("job-result").raw_text()
    events = page(client, f"/jobs/{seeded.jobs['running']}/view").find("job-events").text()
    assert "[REDACTED]" in events and "step 40" in events
    # The JSON API redacts the same values as the pages (one function for both).
    completed = seeded.jobs["completed"]
    api = client.get(f"/jobs/{completed}").get_json()
    assert api["request"]["payload"]["data"]["api_token"] == "[REDACTED]"
    assert api["request"]["payload"]["data"]["text"] == "hello world"
    assert json.loads(request_text) == api["request"]
    assert api["result"]["data"]["client_secret"] == "[REDACTED]"
    listing = client.get("/jobs?limit=100").get_data(as_text=True)
    events = client.get(f"/jobs/{seeded.jobs['running']}/events").get_data(as_text=True)
    for secret in SECRETS:
        assert secret not in listing and secret not in events, secret


def test_a_job_no_runner_could_take_shows_why_it_failed(client: FlaskClient, forge: Forge) -> None:
    job_id = submit(client, job_request("nobody.serves.this"))
    later = Clock(time.time() + float(forge.settings.unmatched_job_expiry_s) + 1)
    assert forge.jobs.expire_unmatched(later) == 1
    row = page(client, "/?status=failed").find("job-row", data_job_id=job_id)
    outcome = row.find("job-outcome").text()
    assert "RESOURCE_NOT_FOUND" in outcome and "NO_RUNNER_FOR_TYPE" in outcome
    detail = page(client, f"/jobs/{job_id}/view").find("job-error-summary").text()
    assert "nobody.serves.this" in detail and "NO_RUNNER_FOR_TYPE" in detail


def test_a_job_whose_type_no_runner_lists_waits_for_one(
    client: FlaskClient, forge: Forge, seeded: Seeded
) -> None:
    """Listed and shown as waiting for a runner of its type, with the time left before the
    forge fails it; a queued job some runner lists is not."""
    job_id = submit(client, job_request("nobody.serves.this"))
    expiry = float(forge.settings.unmatched_job_expiry_s)
    assert expiry > 0
    row = page(client, "/").find("job-row", data_job_id=job_id)
    waiting = row.find("job-waiting").text()
    assert "waiting for a runner of type nobody.serves.this" in waiting
    assert "fails in" in waiting
    served = page(client, "/").find("job-row", data_job_id=seeded.jobs["queued"])
    assert served.find_all("job-waiting") == []  # beta lists data.checksum

    detail = page(client, f"/jobs/{job_id}/view").find("job-detail")
    text = detail.find("job-waiting").text()
    assert "Waiting for a runner of type nobody.serves.this" in text
    assert "NO_RUNNER_FOR_TYPE" in text
    assert page(client, f"/jobs/{seeded.jobs['queued']}/view").find_all("job-waiting") == []

    # Once a runner lists the type, the job no longer waits for one.
    register(client, "gamma", ["nobody.serves.this"])
    assert page(client, "/").find("job-row", data_job_id=job_id).find_all("job-waiting") == []


def test_late_progress_is_listed_when_it_happened_and_marked_with_its_attempt(
    client: FlaskClient, forge: Forge, seeded: Seeded
) -> None:
    """Progress delivered after the job completed (a runner's outbox catching up) is listed
    before job.completed, by its own timestamp, and marked as of its ended attempt."""
    alpha = seeded.runners["alpha"]
    job_id = submit(client, job_request("text.stats", data={"text": "late"}))
    start(forge, job_id, alpha)
    happened = utc_now()  # the runner's ctx.progress, before the job ended
    time.sleep(0.01)
    deliver(client, job_id, alpha, success=True, data={"words": 1})
    event = {
        "id": new_id(),
        "type": "job.progress",
        "jobId": job_id,
        "timestamp": happened,
        "data": {"percent": 50, "message": "halfway"},
        "metadata": {"service": "alpha", "version": "1.2.3"},
    }
    assert client.post(f"/jobs/{job_id}/events", json=event).status_code == 202

    listed = client.get(f"/jobs/{job_id}/events").get_json()["items"]
    types = [e["type"] for e in listed]
    assert types == ["job.created", "job.queued", "job.started", "job.progress", "job.completed"]
    stamps = [e["timestamp"] for e in listed]
    assert stamps == sorted(stamps)
    assert listed[3]["data"] == {"percent": 50, "message": "halfway", "attempt": 1}

    doc = page(client, f"/jobs/{job_id}/view")
    rows = doc.find_all("event-row")
    assert [r["data-type"] for r in rows] == types
    assert "of attempt 1, arrived after it ended" in rows[3].find("event-attempt").text()
    # Progress of a running attempt is not marked.
    running = page(client, f"/jobs/{seeded.jobs['running']}/view")
    assert running.find_all("event-attempt") == []
