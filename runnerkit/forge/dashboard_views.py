"""What the dashboard shows, read from the database: the view models of a runner, a job and a
job's page, and the queries that fill them.

The routes of :mod:`.dashboard` read a snapshot and hand each row to a builder here
(:func:`runner_view`, :func:`job_view`), then add what takes another query for several
rows at once (progress, why a queued job waits, runners' violations). Everything a job
carries passes through the JobStore's redacted JobResponse or :func:`redact` first, and
is formatted by :mod:`.dashboard_format`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from runnerkit.errors.redaction import redact

from . import db, violations
from .dashboard_format import When, compact_json, epoch_of, format_duration, safe_url

if TYPE_CHECKING:
    from . import Forge

#: Violations shown per runner, and from senders tied to no runner.
RECENT_VIOLATIONS = 10
#: Characters of a job's outcome shown in the job table.
SUMMARY_CHARS = 140

FINAL_STATUSES = frozenset({"completed", "failed", "cancelled"})


@dataclass
class RunnerView:
    id: str
    name: str
    version: str
    status: str
    tags: list[str]
    endpoint: str
    capabilities: list[dict[str, Any]]
    registered: When | None
    heartbeat: When | None
    active_jobs: int
    reported_active: int | None
    #: Contract violations (:mod:`.referee`): how many, the newest few, a refused heartbeat.
    violations: int = 0
    recent_violations: list[dict[str, Any]] = field(default_factory=list)
    refusal: str = ""


@dataclass
class JobView:
    id: str
    type: str
    priority: Any
    status: str
    attempts: int
    runner: str
    duration: str
    duration_live: bool
    submitted: When | None
    updated: When | None
    summary: str
    summary_kind: str  # "data", "error" or ""
    progress: float | None = None
    progress_message: str = ""
    #: Queued, and no runner that is not offline lists its type: what it waits for.
    waiting_for: str = ""
    #: When the forge fails it with NO_RUNNER_FOR_TYPE (UNMATCHED_JOB_EXPIRY_S), if it does.
    waiting_expires: str = ""


@dataclass
class JobDetail:
    job: JobView
    request_json: str
    result_json: str | None
    error_json: str | None
    error: dict[str, Any] | None
    #: The result (of a failed attempt) already carries the error envelope.
    error_in_result: bool
    timeout: str
    max_attempts: int | None
    started: When | None
    created: When | None
    correlation_id: str
    events: list[dict[str, Any]] = field(default_factory=list)
    events_total: int = 0
    assertions: list[dict[str, Any]] = field(default_factory=list)
    assertions_total: int = 0
    #: What its runners' answers broke (:mod:`.referee`), newest first.
    violations: list[dict[str, Any]] = field(default_factory=list)


def running_counts(conn: db.Conn) -> dict[str, int]:
    """Jobs the forge itself records as running, per runner id."""
    rows = conn.execute(
        "SELECT runner_id, COUNT(*) AS n FROM jobs"
        " WHERE status = 'running' AND runner_id IS NOT NULL GROUP BY runner_id"
    ).fetchall()
    return {str(r["runner_id"]): int(r["n"]) for r in rows}


def latest_progress(conn: db.Conn, job_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The newest ``job.progress`` event data of each job in ``job_ids``."""
    if not job_ids:
        return {}
    marks = ", ".join("?" * len(job_ids))
    rows = conn.execute(
        "SELECT job_id, document FROM events WHERE seq IN ("
        f" SELECT MAX(seq) FROM events WHERE type = 'job.progress' AND job_id IN ({marks})"
        " GROUP BY job_id)",
        list(job_ids),
    ).fetchall()
    found: dict[str, dict[str, Any]] = {}
    for row in rows:
        data = (db.loads(row["document"]) or {}).get("data")
        if isinstance(data, dict):
            found[str(row["job_id"])] = data
    return found


def runner_view(forge: Forge, row: db.Row, running: Mapping[str, int], now: float) -> RunnerView:
    meta = redact(forge.runners.metadata(row))
    capabilities = []
    for cap in meta.get("capabilities") or []:
        if not isinstance(cap, dict):
            continue
        capabilities.append(
            {
                "name": str(cap.get("name") or cap.get("id") or "?"),
                "version": str(cap.get("version") or ""),
                "job_types": [str(t) for t in cap.get("supportedJobTypes") or []],
                "max_concurrency": cap.get("maxConcurrency"),
            }
        )
    reported = row["reported_active"]
    return RunnerView(
        id=str(meta["id"]),
        name=str(meta["name"]),
        version=str(meta["version"]),
        status=str(meta["status"]),
        tags=[str(t) for t in meta.get("tags") or []],
        endpoint=safe_url(meta.get("healthCheckEndpoint")),
        capabilities=capabilities,
        registered=When.of(meta.get("registeredAt"), now),
        heartbeat=When.of(meta.get("lastHeartbeatAt"), now),
        active_jobs=running.get(str(meta["id"]), 0),
        reported_active=None if reported is None else int(reported),
        violations=int(row["violations"]),
        refusal=violations.current_refusal(row) or "",
    )


def violation_views(items: Sequence[dict[str, Any]], now: float) -> list[dict[str, Any]]:
    return [{**item, "when": When.of(item["at"], now)} for item in items]


def attach_violations(conn: db.Conn, runners: Sequence[RunnerView], now: float) -> None:
    """The newest few violations of each runner that has any."""
    for runner in runners:
        if runner.violations:
            recent = violations.of_runner(conn, runner.id, limit=RECENT_VIOLATIONS)
            runner.recent_violations = violation_views(recent, now)


def job_view(forge: Forge, row: db.Row, now: float) -> JobView:
    document = forge.jobs.response(row)
    job_request = document["request"]
    result = document.get("result") or {}
    error = document.get("error") or result.get("error")
    status = str(document["status"])
    metadata = result.get("metadata") or {}

    duration_ms: float | None = None
    live = False
    if isinstance(metadata.get("durationMs"), int | float):
        duration_ms = float(metadata["durationMs"])
    elif status not in FINAL_STATUSES:
        started = epoch_of(row["first_started_at"])
        if started is not None:
            duration_ms = max(0.0, now - started) * 1000.0
            live = True

    summary, kind = "", ""
    if isinstance(error, dict) and status != "completed":
        code = " ".join(str(error.get(k)) for k in ("category", "code") if error.get(k))
        message = str(error.get("message") or "")
        summary, kind = (f"{code}: {message}" if code and message else code or message), "error"
        if len(summary) > SUMMARY_CHARS:
            summary = summary[: SUMMARY_CHARS - 1].rstrip() + "…"
    elif status == "completed" and "data" in result:
        summary, kind = compact_json(redact(result["data"]), SUMMARY_CHARS), "data"

    return JobView(
        id=str(document["id"]),
        type=str(job_request.get("type", row["type"])),
        priority=job_request.get("priority", row["priority"]),
        status=status,
        attempts=int(row["attempts"]),
        runner=str(row["runner_name"] or ""),
        duration=format_duration(duration_ms),
        duration_live=live,
        submitted=When.of((job_request.get("metadata") or {}).get("createdAt"), now),
        updated=When.of(document.get("updatedAt"), now),
        summary=summary,
        summary_kind=kind,
    )


def attach_progress(conn: db.Conn, jobs: Sequence[JobView]) -> None:
    running = [j.id for j in jobs if j.status == "running"]
    for job_id, data in latest_progress(conn, running).items():
        for job in jobs:
            if job.id == job_id:
                percent = data.get("percent")
                if isinstance(percent, int | float) and math.isfinite(percent):
                    job.progress = max(0.0, min(100.0, float(percent)))
                message = data.get("message")
                job.progress_message = str(message) if message is not None else ""


def attach_waiting(forge: Forge, conn: db.Conn, jobs: Sequence[JobView], now: float) -> None:
    """Mark queued jobs whose type no runner (other than offline ones) lists, so a person
    sees why nothing happens, and when the forge gives up on them."""
    queued = [j for j in jobs if j.status == "queued"]
    if not queued:
        return
    taken = db.taken_types(conn)
    expiry = float(forge.settings.unmatched_job_expiry_s)
    for job in queued:
        if job.type in taken:
            continue
        job.waiting_for = job.type
        row = db.get_job(conn, job.id)
        if expiry > 0 and row is not None and isinstance(row["submitted"], int | float):
            left = max(0.0, float(row["submitted"]) + expiry - now)
            job.waiting_expires = format_duration(left * 1000.0)
