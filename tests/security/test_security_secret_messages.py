"""A value a schema rejects never reaches a message: only ``details[].value`` may carry it.

A real runner (``tests/security/echo_app.py``, gunicorn) registered with a real forge. Each
job makes the ``leak`` capability return a secret-looking string where its Output schema
wants an Integer, a choice, a pattern, a short string, an email, a URL, a date, a nested
object or a list of integers (or gives its input validator, whose message quotes the input,
one). Every job fails with an envelope whose messages (the envelope's and every detail's)
name the field but not the value, in the forge's job JSON, its events and its dashboard page;
under secret-named fields the value is redacted too, so the secret appears nowhere at all
(the job's request carries it under ``secret_value``, which the dashboard redacts).
"""

from __future__ import annotations

import functools
import json
import uuid
from pathlib import Path
from typing import Any

import requests

from tests.security.stack import QUICK, Stack
from tests.support.waiting import wait_until

SECRET = "s3cr3t-5b1e07aa-message"

#: Output field → the value that field is given (each rejected by its Output schema).
SECRET_FIELDS: dict[str, Any] = {
    "api_token": SECRET,
    "secret_strict": SECRET,
    "secret_choice": SECRET,
    "secret_pattern": SECRET,
    "secret_short": SECRET,
    "password_email": SECRET,
    "token_url": SECRET,
    "secret_date": SECRET,
    "secret_nested": {"n": SECRET},
    "token_list": [SECRET],
}


def job_request(payload: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": str(uuid.uuid4()),
        "type": "test.leak",
        "payload": {"type": "test.leak", "data": payload},
        "metadata": {"source": "tests", "createdAt": "2026-01-01T00:00:00.000Z"},
        "retryPolicy": {"maxRetries": 0},
        "timeoutMs": 5000,
    }


def without_values(document: Any) -> Any:
    """``document`` with every ErrorDetail's ``value`` taken out (the one place it may be)."""
    if isinstance(document, dict):
        out = {k: without_values(v) for k, v in document.items()}
        if isinstance(out.get("details"), list):
            out["details"] = [
                {k: v for k, v in d.items() if k != "value"} if isinstance(d, dict) else d
                for d in out["details"]
            ]
        return out
    if isinstance(document, list):
        return [without_values(v) for v in document]
    return document


def without_request(job: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in job.items() if k != "request"}


def messages(envelope: dict[str, Any]) -> list[str]:
    return [envelope["message"], *(d["message"] for d in envelope["details"])]


def test_rejected_values_stay_out_of_every_message(stack: Stack, tmp_path: Path) -> None:
    forge = stack.forge(tmp_path / "forge.sqlite3")
    stack.runner(
        "tests.security.echo_app:app",
        jobforge_url=forge.url,
        env={"RUNNERKIT_HEARTBEAT_INTERVAL_MS": "1000"},
    )
    jobs = {
        field: job_request({"field": field, "secret_value": value})
        for field, value in SECRET_FIELDS.items()
    }
    plain = {
        "output": job_request({"field": "count", "secret_value": SECRET}),
        "input": job_request({"field": "count", "secret_value": 1, "choice": SECRET}),
    }
    for request in [*jobs.values(), *plain.values()]:
        response = requests.post(f"{forge.url}/jobs", json=request, timeout=QUICK)
        assert response.status_code == 202, response.text

    def final(job_id: str) -> dict[str, Any] | None:
        body = requests.get(f"{forge.url}/jobs/{job_id}", timeout=QUICK).json()
        return body if body["status"] in ("completed", "failed") else None

    for field, request in jobs.items():
        job = wait_until(
            functools.partial(final, request["id"]), 30, f"the {field} job never finished"
        )
        assert job["status"] == "failed", job
        error = job["error"]
        assert (error["category"], error["code"]) == ("SCHEMA_MISMATCH", "OUTPUT_SCHEMA_MISMATCH")
        assert field in error["message"], error
        assert all(SECRET not in m for m in messages(error)), (field, error)
        # Secret-named fields: the value is redacted as well, so it is nowhere at all (but in
        # the job's own request, as submitted; the dashboard redacts that one too).
        assert SECRET not in json.dumps(without_request(job)), (field, job)
        events = requests.get(f"{forge.url}/jobs/{request['id']}/events", timeout=QUICK)
        assert SECRET not in events.text, (field, events.text)
        page = requests.get(f"{forge.url}/jobs/{request['id']}/view", timeout=QUICK)
        assert page.status_code == 200 and field in page.text
        assert SECRET not in page.text, field

    for side, request in plain.items():
        job = wait_until(
            functools.partial(final, request["id"]), 30, f"the {side} job never finished"
        )
        assert job["status"] == "failed", job
        error = job["error"]
        code = "OUTPUT_SCHEMA_MISMATCH" if side == "output" else "PAYLOAD_INVALID"
        assert error["code"] == code, error
        assert all(SECRET not in m for m in messages(error)), (side, error)
        assert SECRET not in json.dumps(without_values(without_request(job))), (side, job)
        # The value's own place: the detail's value (not secret-named, so not redacted).
        if side == "input":
            assert [d.get("value") for d in error["details"]] == [SECRET], error
