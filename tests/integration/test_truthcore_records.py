"""With TRUTHCORE_URL set, every finished job is recorded in TruthCore by the runner itself."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
import requests

from runnerkit.testing import ContractValidator, documents

pytestmark = pytest.mark.integration


def test_a_finished_job_becomes_status_and_result_assertions(
    forge_server: str, start_gunicorn: Callable[..., Any]
) -> None:
    runner = start_gunicorn(
        standalone=False,
        env={"RUNNERKIT_JOBFORGE_URL": forge_server, "RUNNERKIT_TRUTHCORE_URL": forge_server},
        ready_path="/health/ready",
    )
    job_id = str(uuid.uuid4())
    body = documents.execution_request("checksum", {"data": "abc"}, jobId=job_id)
    answer = requests.post(runner.url + "/execute", json=body, timeout=10)
    assert answer.status_code == 200, answer.text

    query = {**documents.truth_query(), "pattern": {"subject": job_id}}
    query["filters"] = {"minConfidence": 0, "sources": ["example-runner"]}
    deadline = time.monotonic() + 10
    while True:  # delivered from the outbox by the instance's leader, within a tick or two
        found = requests.post(forge_server + "/query", json=query, timeout=5).json()
        if len(found["assertions"]) >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert ContractValidator().validate("TruthQueryResult", found).valid
    by_predicate = {a["predicate"]: a for a in found["assertions"]}
    assert by_predicate["status"]["object"] == "completed"
    assert by_predicate["result"]["object"] == answer.json()["data"]
    assert all(a["subject"] == job_id for a in found["assertions"])
