"""The instance's state failing under a running gunicorn runner (2 workers, real SQLite).

- A ledger that cannot be written (every write made to fail with SQLite triggers, as a full
  disk would fail them) answers a retryable 503 ``STATE_UNAVAILABLE`` and turns readiness
  unhealthy; nothing stays taken, and once writes work again readiness recovers by itself
  and the same jobIds run (they used to get 409 for ever, with new jobs refused).
- ``ledger.sqlite3*`` deleted while the instance runs, and a worker recycled: redelivered
  finished jobs are replayed or refused with 503 ``LEDGER_REPLACED``, never run again;
  readiness turns unhealthy and an error names the file.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from runnerkit.runner.journal import FOLD_RETRY_S
from runnerkit.service.signing import sign
from tests.instance.instance_support import (
    Instance,
    InstanceFactory,
    Reply,
    call,
    job_request,
    pin_connections,
)
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

SECRET = "instance-storage-secret"
REPLAYED = "idempotent-replayed"
TABLES = ("jobs", "signed_requests", "outbox", "probe")


def text_job(job_id: str | None = None) -> dict[str, Any]:
    return job_request("text-stats", {"text": "one two three"}, job_id=job_id)


def signed(instance: Instance, body: dict[str, Any]) -> Reply:
    """POST /execute, signed as JobForge signs, on a connection of its own."""
    raw = json.dumps(body).encode()
    conn = http.client.HTTPConnection(instance.proc.host, instance.proc.port, timeout=30)
    try:
        headers = {"Content-Type": "application/json", "Connection": "close", **sign(raw, SECRET)}
        conn.request("POST", "/execute", body=raw, headers=headers)
        response = conn.getresponse()
        data = response.read()
        return Reply(
            response.status,
            {k.lower(): v for k, v in response.getheaders()},
            json.loads(data) if data else None,
        )
    finally:
        conn.close()


def make_writes_fail(ledger: Path) -> None:
    """Every write to the runner's tables fails from now on, as on a full disk."""
    with contextlib.closing(sqlite3.connect(ledger, timeout=10.0)) as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        for table in tables & set(TABLES):
            for event in ("INSERT", "UPDATE", "DELETE"):
                conn.execute(
                    f"CREATE TRIGGER IF NOT EXISTS full_{table}_{event} BEFORE {event} ON {table}"
                    " BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END"
                )
        conn.commit()


def let_writes_work(ledger: Path) -> None:
    with contextlib.closing(sqlite3.connect(ledger, timeout=10.0)) as conn:
        for table in TABLES:
            for event in ("INSERT", "UPDATE", "DELETE"):
                conn.execute(f"DROP TRIGGER IF EXISTS full_{table}_{event}")
        conn.commit()


def readiness(instance: Instance) -> tuple[int, dict[str, Any]]:
    reply = call(instance.proc, "GET", "/health/ready")
    checks = {c["name"]: c for c in reply.body["checks"]}
    return reply.status, checks.get("state", {})


def test_an_unwritable_ledger_answers_503_and_the_runner_recovers(
    make_instance: InstanceFactory,
) -> None:
    instance = make_instance(workers=2, env={"RUNNERKIT_SIGNING_SECRET": SECRET})
    instance.wait_registered()
    # Every worker opens the ledger (and the outbox table exists) before the disk "fills".
    for _ in range(4):
        assert signed(instance, text_job()).status == 200
    ledger = instance.state_dir / "ledger.sqlite3"
    make_writes_fail(ledger)

    # A worker's answers go to its journal, folded into the ledger a few ms later: until its
    # first fold fails, a worker may answer the jobs that arrive in those milliseconds (how many
    # depends on the machine's speed; their answers wait in the journal and count below); from
    # then on it takes none, so the refusals settle well before the 40th job.
    sent: list[tuple[dict[str, Any], Any]] = []
    while len(sent) < 40 and not (
        len(sent) >= 8 and all(reply.status == 503 for _, reply in sent[-8:])
    ):
        body = text_job()
        sent.append((body, signed(instance, body)))
    accepted = [body for body, reply in sent if reply.status == 200]
    refused = [body for body, reply in sent if reply.status != 200]
    assert all(reply.status == 503 for _, reply in sent[-8:]), instance.explain(
        f"{len(accepted)} of {len(sent)} accepted, the last 8 not all refused"
    )
    assert len(sent) < 40, instance.explain(f"{len(accepted)} of {len(sent)} accepted")
    for body, reply in sent:
        if reply.status == 200:
            continue
        assert reply.status == 503, instance.explain(f"answered {reply}")
        error = reply.body["error"]
        assert (error["category"], error["code"], error["retryable"]) == (
            "SERVICE_UNAVAILABLE",
            "STATE_UNAVAILABLE",
            True,
        ), reply.body
        assert reply.body["jobId"] == body["jobId"]
        assert reply.headers.get("retry-after") == "1"
    assert not any(instance.held_slots().values()), instance.held_slots()
    # Every worker's readiness says so (the marker file), and so does /health.
    for _ in range(6):
        status, state = readiness(instance)
        assert status == 503 and state.get("status") == "unhealthy", (status, state)
    assert call(instance.proc, "GET", "/health").status == 503
    assert "STATE_UNAVAILABLE" in instance.proc.log_text()

    let_writes_work(ledger)
    # The housekeeping probe notices without any traffic.
    wait_until(
        lambda: all(readiness(instance)[0] == 200 for _ in range(4)),
        10,
        lambda: instance.explain("readiness did not recover"),
    )
    # The refused jobs were given back whole: they run now, none is "already running".
    for body in refused:
        reply = signed(instance, body)
        assert reply.status == 200, instance.explain(f"{body['jobId']} answered {reply}")
        assert reply.body["success"] is True
        assert REPLAYED not in reply.headers, reply
    # The answers given while the ledger could not be written reach it at their worker's next
    # fold (tried again every FOLD_RETRY_S, whatever the traffic): until then the job is still
    # that worker's, and a redelivery is told so (a retryable 409, as a forge retries it);
    # from then on it is replayed.
    for body in accepted:
        replies: list[Any] = []

        def answered(job: dict[str, Any] = body, seen: list[Any] = replies) -> bool:
            seen.append(signed(instance, job))
            error = seen[-1].body.get("error") or {}
            return not (error.get("code") == "JOB_ALREADY_RUNNING" and error.get("retryable"))

        wait_until(answered, 5 + 2 * FOLD_RETRY_S, lambda seen=replies: f"{seen[-1]}")
        reply = replies[-1]
        assert reply.status == 200 and REPLAYED in reply.headers, instance.explain(f"{reply}")
    assert not any(instance.held_slots().values()), instance.held_slots()
    assert "Traceback" not in instance.proc.log_text()


def test_a_deleted_ledger_refuses_jobs_instead_of_running_finished_ones_again(
    make_instance: InstanceFactory, tmp_path: Path
) -> None:
    instance = make_instance(workers=2)
    instance.wait_registered()
    finished = [text_job() for _ in range(6)]
    for body in finished:
        reply = call(instance.proc, "POST", "/execute", body)
        assert reply.status == 200 and REPLAYED not in reply.headers, reply

    for path in instance.state_dir.glob("ledger.sqlite3*"):
        path.unlink()
    # Recycle one worker, as max_requests or a crash would: its successor starts afresh.
    old_workers = set(instance.proc.worker_pids())
    victim = min(old_workers)
    os.kill(victim, signal.SIGTERM)
    wait_until(
        lambda: (
            len(set(instance.proc.worker_pids()) - old_workers) == 1
            and len(instance.proc.worker_pids()) == 2
        ),
        20,
        lambda: instance.explain("the recycled worker was not replaced"),
    )
    instance.proc.wait_workers_serving(timeout=20)
    (successor,) = set(instance.proc.worker_pids()) - old_workers

    pinned = dict(pin_connections(instance.proc, [2, 2]))
    assert successor in pinned, pinned
    answers: list[tuple[int, Reply]] = []
    for worker, connections in pinned.items():
        for body in finished:
            conn = connections[len(answers) % len(connections)]
            answers.append((worker, conn.execute(body)))
        for conn in connections:
            conn.close()
    for worker, reply in answers:
        replayed = reply.status == 200 and reply.headers.get(REPLAYED) == "true"
        refused = reply.status == 503 and reply.body["error"]["code"] == "LEDGER_REPLACED"
        assert replayed or refused, instance.explain(f"worker {worker} answered {reply}")
        if refused:
            assert reply.body["error"]["retryable"] is True
    # The successor has no ledger to trust: it refuses rather than run them again.
    assert all(r.status == 503 for w, r in answers if w == successor), answers
    for body in finished:
        runs = [r for r in instance.job_log(body["jobId"]) if r["outcome"] == "success"]
        assert len(runs) == 1, instance.explain(f"{body['jobId']} ran {len(runs)} times")
    # No fresh, empty ledger was made for the running instance.
    assert not (instance.state_dir / "ledger.sqlite3").exists()
    wait_until(
        lambda: all(readiness(instance)[0] == 503 for _ in range(4)),
        10,
        lambda: instance.explain("readiness stayed healthy"),
    )
    _, state = readiness(instance)
    assert "deleted" in state["message"], state
    log = instance.proc.log_text()
    assert "ledger replaced" in log and str(instance.state_dir / "ledger.sqlite3") in log
    # New jobs too: nothing is run against a ledger nobody else can see.
    fresh = call(instance.proc, "POST", "/execute", text_job())
    assert fresh.status == 503 and fresh.body["error"]["code"] == "LEDGER_REPLACED", fresh
