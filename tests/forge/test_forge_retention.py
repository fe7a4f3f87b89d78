"""Finished jobs are deleted once HISTORY_RETENTION_HOURS have passed; nothing else is.

A real forge app on a real SQLite file; time is moved by handing ``JobStore.prune`` a later
clock, or by ageing a row's ``updated_at`` for the dispatcher's own pass.
"""

from __future__ import annotations

import sqlite3
import time
from typing import Any

import pytest
from flask.testing import FlaskClient

from runnerkit.forge import Forge, get_forge
from runnerkit.forge.db.jobs import PRUNE_QUERY
from runnerkit.forge.jobs import Clock
from runnerkit.testing import documents
from tests.forge.helpers import forge_app, job_request

HOUR = 3600.0


@pytest.fixture
def forge_config(store_config: dict[str, str]) -> dict[str, Any]:
    return {
        **store_config,
        "DISPATCHER": False,
        "HEARTBEAT_INTERVAL_MS": 60_000,
        "HISTORY_RETENTION_HOURS": 1,
    }


def _submit(client: FlaskClient, *, cancel: bool) -> str:
    body = job_request()
    assert client.post("/jobs", json=body).status_code == 202
    if cancel:
        assert client.post(f"/jobs/{body['id']}/cancel").status_code == 200
    return str(body["id"])


def _in_hours(hours: float) -> Clock:
    return Clock(time.time() + hours * HOUR)


def _statuses_about(client: FlaskClient, job_id: str) -> list[str]:
    query = {**documents.truth_query(), "pattern": {"subject": job_id, "predicate": "status"}}
    query["filters"] = {"minConfidence": 0}
    found = client.post("/query", json=query)
    assert found.status_code == 200, found.get_data(as_text=True)
    return sorted(a["object"] for a in found.get_json()["assertions"])


def test_a_finished_job_goes_with_its_events_once_its_retention_has_passed(
    client: FlaskClient, forge: Forge
) -> None:
    finished = _submit(client, cancel=True)
    waiting = _submit(client, cancel=False)

    assert forge.jobs.prune(_in_hours(0.5)) == 0, "deleted before its hour was up"
    assert client.get(f"/jobs/{finished}").status_code == 200

    assert forge.jobs.prune(_in_hours(2)) == 1

    gone = client.get(f"/jobs/{finished}")
    assert gone.status_code == 404
    assert gone.get_json()["error"]["code"] == "JOB_NOT_FOUND"
    assert client.get(f"/jobs/{finished}/events").status_code == 404
    assert client.get(f"/jobs/{waiting}").get_json()["status"] == "queued"
    assert len(client.get(f"/jobs/{waiting}/events").get_json()["items"]) == 2
    # TruthCore's record of what happened is kept.
    assert _statuses_about(client, finished) == ["cancelled", "queued"]
    listed = client.get("/jobs").get_json()
    assert [j["id"] for j in listed["items"]] == [waiting]
    assert listed["total"] == 1


def test_a_cancelled_job_still_holding_its_slot_stays(client: FlaskClient, forge: Forge) -> None:
    """Its runner has not answered: the slot is freed by that answer, not by the prune."""
    held = _submit(client, cancel=True)
    with forge.db.tx() as conn:
        conn.execute(
            "UPDATE jobs SET slot_runner = 'r1', slot_capability = 'c1' WHERE id = ?", (held,)
        )

    assert forge.jobs.prune(_in_hours(2)) == 0
    assert client.get(f"/jobs/{held}").status_code == 200


def test_one_pass_deletes_a_batch_oldest_first(client: FlaskClient, forge: Forge) -> None:
    jobs = [_submit(client, cancel=True) for _ in range(5)]

    assert forge.jobs.prune(_in_hours(2), limit=2) == 2

    kept = [j for j in jobs if client.get(f"/jobs/{j}").status_code == 200]
    assert kept == jobs[2:]


def test_retention_zero_keeps_every_job(store_config: dict[str, str]) -> None:
    app = forge_app({**store_config, "DISPATCHER": False, "HISTORY_RETENTION_HOURS": 0})
    try:
        finished = _submit(app.test_client(), cancel=True)

        assert get_forge(app).jobs.prune(_in_hours(24 * 365)) == 0
        assert app.test_client().get(f"/jobs/{finished}").status_code == 200
    finally:
        get_forge(app).close()


def test_the_dispatchers_housekeeping_prunes(client: FlaskClient, forge: Forge) -> None:
    old = _submit(client, cancel=True)
    recent = _submit(client, cancel=True)
    with forge.db.tx() as conn:
        conn.execute(
            "UPDATE jobs SET updated_at = ? WHERE id = ?", (Clock(time.time() - 2 * HOUR).z, old)
        )

    forge.dispatcher.tick()

    assert client.get(f"/jobs/{old}").status_code == 404
    assert client.get(f"/jobs/{recent}").status_code == 200


@pytest.mark.parametrize("forge_backend", ["sqlite"])  # PostgreSQL plans by its statistics
def test_the_prune_reads_the_finished_jobs_index(forge: Forge, db_path: str) -> None:
    """Not a scan of every job each minute, however large the history."""
    forge.jobs.prune(_in_hours(2))  # the schema exists
    with sqlite3.connect(db_path) as conn:
        plan = " ".join(
            row[-1]
            for row in conn.execute(
                "EXPLAIN QUERY PLAN " + PRUNE_QUERY, ("2100-01-01T00:00:00.000Z", 10)
            )
        )
    assert "USING INDEX jobs_finished" in plan, plan
    assert "TEMP B-TREE" not in plan, plan
