"""Captured signed requests sent again to a real runner (gunicorn, 2 workers, signing on).

The event id (``x-webhook-event-id``) is not covered by the signature, so a copy of a
captured request may carry a new one, an empty one or none: it is still the same request and
must not run the job again. The runner is the end-to-end app, whose capabilities append a line
to an execution log each time they start, so "ran once" is counted, not inferred.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests

from runnerkit.service.signing import sign
from tests.security.stack import QUICK, Stack, failure_envelope
from tests.support import GunicornProcess

pytestmark = pytest.mark.integration

SECRET = "replay-test-secret"
OLD_SECRET = "replay-test-previous-secret"
E2E_APP = "tests.e2e.apps.e2e_app:app"

#: How a copy of a captured request changes its (unsigned) event id.
COPIES: dict[str, Callable[[dict[str, str]], dict[str, str]]] = {
    "same": lambda h: dict(h),
    "new-event-id": lambda h: {**h, "x-webhook-event-id": str(uuid.uuid4())},
    "empty-event-id": lambda h: {**h, "x-webhook-event-id": ""},
    "no-event-id": lambda h: {k: v for k, v in h.items() if k != "x-webhook-event-id"},
}


def starts(log: Path, job_id: str) -> int:
    """How often a capability started ``job_id`` (the app's own execution log)."""
    if not log.exists():
        return 0
    records = [json.loads(line) for line in log.read_text().splitlines() if line]
    return sum(1 for r in records if r["job"] == job_id and r["event"] == "start")


def execution_request(capability: str, payload: dict[str, Any]) -> bytes:
    body = {
        "jobId": str(uuid.uuid4()),
        "moduleId": "replay",
        "capabilityId": capability,
        "payload": payload,
        "timeoutMs": 5000,
    }
    return json.dumps(body).encode()


def send(proc: GunicornProcess, raw: bytes, headers: dict[str, str]) -> requests.Response:
    return requests.post(
        proc.url + "/execute",
        data=raw,
        headers={**headers, "Content-Type": "application/json"},
        timeout=QUICK,
    )


@pytest.fixture
def signed_runner(stack: Stack, tmp_path: Path) -> tuple[GunicornProcess, Path]:
    log = tmp_path / "executions.jsonl"
    proc = stack.runner(
        E2E_APP,
        workers=2,
        env={
            "RUNNERKIT_SIGNING_SECRET": SECRET,
            "RUNNERKIT_SIGNING_SECRET_PREVIOUS": OLD_SECRET,
            "E2E_EXEC_LOG": str(log),
        },
        all_workers=True,
    )
    return proc, log


def test_copies_of_a_failed_request_never_run_it_again(
    signed_runner: tuple[GunicornProcess, Path],
) -> None:
    # A retryable failure is not replayed from the ledger (a new attempt may run), so only
    # the signed content tells a copy of these bytes from JobForge's next attempt.
    proc, log = signed_runner
    raw = execution_request("flaky", {"fail_times": 1_000})
    job_id = json.loads(raw)["jobId"]
    headers = sign(raw, SECRET)
    first = send(proc, raw, headers)
    assert first.status_code == 500, first.text
    assert failure_envelope(first)["category"] == "RUNTIME_ERROR"
    for name, copy in COPIES.items():
        for _ in range(2):  # the copies reach both workers, whichever takes them
            again = send(proc, raw, copy(headers))
            assert again.status_code == 401, (name, again.text)
            assert failure_envelope(again)["code"] == "EVENT_REPLAYED", name
    # The same content signed with the previous secret (a rotation) is the same request.
    rotated = send(
        proc, raw, sign(raw, OLD_SECRET, timestamp_ms=int(headers["x-webhook-timestamp"]))
    )
    assert rotated.status_code == 401, rotated.text
    assert failure_envelope(rotated)["code"] == "EVENT_REPLAYED"
    assert starts(log, job_id) == 1
    # JobForge's own retry is signed anew (a new timestamp): it is a new attempt and runs.
    time.sleep(0.002)
    retried = send(proc, raw, sign(raw, SECRET))
    assert retried.status_code == 500, retried.text
    assert starts(log, job_id) == 2


def test_copies_of_a_finished_request_are_answered_from_the_ledger(
    signed_runner: tuple[GunicornProcess, Path],
) -> None:
    proc, log = signed_runner
    raw = execution_request("alpha", {"tag": "once"})
    job_id = json.loads(raw)["jobId"]
    headers = sign(raw, SECRET)
    first = send(proc, raw, headers)
    assert first.status_code == 200, first.text
    for name, copy in COPIES.items():
        for _ in range(2):
            again = send(proc, raw, copy(headers))
            assert again.status_code == 200, (name, again.text)
            assert again.headers.get("Idempotent-Replayed") == "true", name
            assert again.json() == first.json(), name
    assert starts(log, job_id) == 1


def test_a_previous_secret_without_a_current_one_does_not_serve(stack: Stack) -> None:
    with pytest.raises(RuntimeError, match="exited") as failed:
        stack.runner(
            E2E_APP,
            workers=1,
            env={
                "RUNNERKIT_SIGNING_SECRET": "",
                "RUNNERKIT_SIGNING_SECRET_PREVIOUS": OLD_SECRET,
                "RUNNERKIT_ENVIRONMENT": "development",
            },
        )
    assert "RUNNERKIT_SIGNING_SECRET_PREVIOUS is set but RUNNERKIT_SIGNING_SECRET is empty" in str(
        failed.value
    )
