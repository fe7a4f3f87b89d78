"""The forge's dashboard: server-rendered pages for people, next to the JSON API.

Routes (registered inside the API blueprint, so they live on every forge app):

- ``GET /`` — runners (status, capabilities, last heartbeat, the jobs the forge has running on
  each) and the latest jobs, newest first; ``?status=failed`` (or ``a,b``) filters them,
  ``?offset=&limit=`` pages through them;
- ``GET /jobs/<id>/view`` — one job: its request, its result or error envelope, its events and
  the TruthCore assertions whose subject is the job; an unknown id is an HTML 404 page;
- ``GET /ui/static/<file>`` — the stylesheet.

Every page refreshes itself with ``<meta http-equiv="refresh">`` (``?refresh=N`` seconds,
``?refresh=0`` pauses; a finished job's page stops refreshing). Pages are Jinja templates with
autoescaping and a Content-Security-Policy that allows no script at all; everything a job
carries (request, result, errors, events, assertions) goes through
:func:`runnerkit.redaction.redact` before it is rendered.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from flask import Blueprint, Response, current_app, render_template, request, url_for

from runnerkit._version import __version__
from runnerkit.contracts import JOB_STATUSES, parse_timestamp, utc_now
from runnerkit.errors.redaction import redact

from . import db, violations

if TYPE_CHECKING:
    from . import Forge

blueprint = Blueprint(
    "dashboard",
    __name__,
    template_folder="templates",
    static_folder="static",
    static_url_path="/ui/static",
)

#: Seconds between automatic refreshes unless ``?refresh=`` says otherwise.
DEFAULT_REFRESH_S = 5
#: Jobs per page unless ``?limit=`` says otherwise, and the most one page shows.
DEFAULT_JOB_LIMIT = 50
MAX_JOB_LIMIT = 200
#: Runners listed on the dashboard (the forge is meant for a handful).
MAX_RUNNERS = 200
#: Newest events and assertions shown on a job's page.
MAX_EVENTS = 300
MAX_ASSERTIONS = 200
#: Violations shown per runner, and from senders tied to no runner.
RECENT_VIOLATIONS = 10
#: Characters of a job's outcome shown in the job table.
SUMMARY_CHARS = 140

FINAL_STATUSES = frozenset({"completed", "failed", "cancelled"})

#: Response headers of every dashboard page: no script may run, nothing is cached.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; img-src 'self' data:; "
        "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


class BadQuery(ValueError):
    """A query-string value the dashboard cannot use (answered with an HTML 400 page)."""


# --------------------------------------------------------------------------- formatting


#: A UTF-16 surrogate in a Python str is always a lone one (JSON's "\\ud800"): no UTF-8 page
#: can carry it, so the dashboard shows U+FFFD in its place.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def pretty_json(value: Any) -> str:
    """Indented JSON of an already redacted value, for a ``<pre>`` block."""
    text = json.dumps(value, indent=2, ensure_ascii=False, default=str)
    return _LONE_SURROGATE.sub("\ufffd", text)


def compact_json(value: Any, limit: int | None = None) -> str:
    """One-line JSON, cut to ``limit`` characters with an ellipsis."""
    text = json.dumps(value, ensure_ascii=False, separators=(", ", ": "), default=str)
    text = _LONE_SURROGATE.sub("\ufffd", text)
    if limit is not None and len(text) > limit:
        text = text[: limit - 1].rstrip() + "…"
    return text


def format_duration(ms: float | None) -> str:
    """``850 ms``, ``12.4 s``, ``3 min 05 s``, ``2 h 04 min``; '' when unknown."""
    if ms is None or not math.isfinite(ms) or ms < 0:
        return ""
    if ms < 1000:
        return f"{ms:.0f} ms"
    seconds = ms / 1000.0
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def format_age(seconds: float | None) -> str:
    """``just now``, ``12 s ago``, ``4 min ago``, ``3 h ago``, ``2 d ago``."""
    if seconds is None:
        return ""
    if seconds < 0:
        return "in the future"
    if seconds < 2:
        return "just now"
    if seconds < 90:
        return f"{seconds:.0f} s ago"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min ago"
    if seconds < 36 * 3600:
        return f"{seconds / 3600:.0f} h ago"
    return f"{seconds / 86400:.0f} d ago"


def epoch_of(timestamp: Any) -> float | None:
    """Epoch seconds of a contract timestamp; None when absent or unreadable."""
    if not isinstance(timestamp, str) or not timestamp:
        return None
    try:
        return parse_timestamp(timestamp).timestamp()
    except ValueError:
        return None


@dataclass(frozen=True)
class When:
    """A moment as a page shows it: the contract timestamp, a readable UTC form, its age."""

    iso: str
    text: str
    age: str

    @classmethod
    def of(cls, timestamp: Any, now: float) -> When | None:
        ts = epoch_of(timestamp)
        if ts is None:
            return None
        text = datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        return cls(iso=str(timestamp), text=text, age=format_age(now - ts))


def safe_url(url: Any) -> str:
    """A URL without any ``user:password@`` part, for display."""
    text = str(url or "")
    try:
        parts = urlsplit(text)
    except ValueError:
        return ""
    if parts.username is None and parts.password is None:
        return text
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


# --------------------------------------------------------------------------- view models


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


def _forge() -> Forge:
    forge: Forge = current_app.extensions["forge"]
    return forge


def _running_counts(conn: db.Conn) -> dict[str, int]:
    """Jobs the forge itself records as running, per runner id."""
    rows = conn.execute(
        "SELECT runner_id, COUNT(*) AS n FROM jobs"
        " WHERE status = 'running' AND runner_id IS NOT NULL GROUP BY runner_id"
    ).fetchall()
    return {str(r["runner_id"]): int(r["n"]) for r in rows}


def _latest_progress(conn: db.Conn, job_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
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


def _runner_view(forge: Forge, row: db.Row, running: Mapping[str, int], now: float) -> RunnerView:
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


def _violation_views(items: Sequence[dict[str, Any]], now: float) -> list[dict[str, Any]]:
    return [{**item, "when": When.of(item["at"], now)} for item in items]


def _attach_violations(conn: db.Conn, runners: Sequence[RunnerView], now: float) -> None:
    """The newest few violations of each runner that has any."""
    for runner in runners:
        if runner.violations:
            recent = violations.of_runner(conn, runner.id, limit=RECENT_VIOLATIONS)
            runner.recent_violations = _violation_views(recent, now)


def _job_view(forge: Forge, row: db.Row, now: float) -> JobView:
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


def _attach_progress(conn: db.Conn, jobs: Sequence[JobView]) -> None:
    running = [j.id for j in jobs if j.status == "running"]
    for job_id, data in _latest_progress(conn, running).items():
        for job in jobs:
            if job.id == job_id:
                percent = data.get("percent")
                if isinstance(percent, int | float) and math.isfinite(percent):
                    job.progress = max(0.0, min(100.0, float(percent)))
                message = data.get("message")
                job.progress_message = str(message) if message is not None else ""


def _attach_waiting(forge: Forge, conn: db.Conn, jobs: Sequence[JobView], now: float) -> None:
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


# --------------------------------------------------------------------------- query string


def _refresh_arg() -> int:
    raw = request.args.get("refresh", "")
    if raw == "":
        return DEFAULT_REFRESH_S
    try:
        value = int(raw)
    except ValueError:
        raise BadQuery(f"refresh must be a whole number of seconds, not {raw!r}") from None
    if value == 0:
        return 0
    return max(2, min(value, 3600))


def _int_arg(name: str, default: int, minimum: int, maximum: int) -> int:
    raw = request.args.get(name, "")
    if raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadQuery(f"{name} must be a whole number, not {raw!r}") from None
    if not minimum <= value <= maximum:
        raise BadQuery(f"{name} must be between {minimum} and {maximum}, not {value}")
    return value


def _status_args() -> list[str]:
    wanted = [v.strip() for raw in request.args.getlist("status") for v in raw.split(",")]
    wanted = list(dict.fromkeys(v for v in wanted if v))
    unknown = [v for v in wanted if v not in JOB_STATUSES]
    if unknown:
        raise BadQuery(
            f"Unknown job status {', '.join(unknown)!s}; use one of {', '.join(JOB_STATUSES)}"
        )
    return wanted


def _page_url(endpoint: str, **changes: Any) -> str:
    """The current page's URL with some query arguments changed (None drops one)."""
    args: dict[str, Any] = {k: ",".join(request.args.getlist(k)) for k in request.args}
    args.update(changes)
    if args.get("refresh") in (None, "", str(DEFAULT_REFRESH_S)):
        args.pop("refresh", None)
    kept = {k: v for k, v in args.items() if v not in (None, "")}
    return url_for(endpoint, **(request.view_args or {}), **kept)


def _page(
    template: str, status: int = 200, *, refresh: int, paused: bool = False, **context: Any
) -> Response:
    """Render a dashboard page: ``refresh`` seconds between reloads (0: none), ``paused``
    when the reader asked for none (the header then offers to resume)."""
    forge = _forge()
    health = forge.health()
    checks = "; ".join(
        f"{c['name']}: {c.get('message') or c['status']}" for c in health.get("checks", [])
    )
    body = render_template(
        template,
        service=str(forge.settings.service_name),
        version=__version__,
        health=health,
        health_note=checks,
        generated=When.of(utc_now(), time.time()),
        refresh=refresh,
        paused=paused,
        page_url=_page_url,
        **context,
    )
    response = Response(body, status=status, mimetype="text/html")
    response.headers.update(SECURITY_HEADERS)
    return response


def _problem(status: int, title: str, message: str) -> Response:
    return _page(
        "dashboard/problem.html",
        status=status,
        refresh=0,
        code=status,
        title=title,
        message=message,
    )


# --------------------------------------------------------------------------- routes


@blueprint.get("/")
def index() -> Response:
    """Runners and the latest jobs (filtered by ``?status=``), refreshing every few seconds."""
    try:
        refresh = _refresh_arg()
        statuses = _status_args()
        limit = _int_arg("limit", DEFAULT_JOB_LIMIT, 1, MAX_JOB_LIMIT)
        offset = _int_arg("offset", 0, 0, 10**9)
    except BadQuery as exc:
        return _problem(400, "That filter does not work", str(exc))
    forge = _forge()
    now = time.time()
    with forge.db.snapshot() as conn:
        runner_rows, runners_total = db.list_runners(conn, limit=MAX_RUNNERS, offset=0)
        running = _running_counts(conn)
        job_rows, jobs_total = db.list_jobs(conn, statuses=statuses, limit=limit, offset=offset)
        counts = db.count_jobs_by_status(conn)
        runners = [_runner_view(forge, r, running, now) for r in runner_rows]
        jobs = [_job_view(forge, r, now) for r in job_rows]
        _attach_progress(conn, jobs)
        _attach_waiting(forge, conn, jobs, now)
        _attach_violations(conn, runners, now)
        unknown, unknown_total = violations.unattributed(conn, limit=RECENT_VIOLATIONS)
    filters = [
        {
            "status": status,
            "count": counts.get(status, 0),
            "current": statuses == [status],
            "url": _page_url(".index", status=status, offset=None),
        }
        for status in JOB_STATUSES
    ]
    newer = max(0, offset - limit) if offset > 0 else None
    older = offset + limit if offset + len(jobs) < jobs_total else None
    return _page(
        "dashboard/index.html",
        refresh=refresh,
        paused=refresh == 0,
        runners=runners,
        runners_total=runners_total,
        runners_healthy=sum(1 for r in runners if r.status == "healthy"),
        unattributed=_violation_views(unknown, now),
        unattributed_total=unknown_total,
        jobs=jobs,
        jobs_total=jobs_total,
        all_jobs=sum(counts.values()),
        statuses=statuses,
        filters=filters,
        all_url=_page_url(".index", status=None, offset=None),
        first=offset + 1 if jobs else 0,
        last=offset + len(jobs),
        newer_url=None if newer is None else _page_url(".index", offset=newer or None),
        older_url=None if older is None else _page_url(".index", offset=older),
    )


@blueprint.get("/jobs/<job_id>/view")
def job_page(job_id: str) -> Response:
    """One job: request, result or error, events, TruthCore assertions about it."""
    try:
        refresh = _refresh_arg()
    except BadQuery as exc:
        return _problem(400, "That refresh interval does not work", str(exc))
    forge = _forge()
    now = time.time()
    with forge.db.snapshot() as conn:
        row = db.get_job(conn, job_id)
        if row is not None:
            view = _job_view(forge, row, now)
            _attach_progress(conn, [view])
            _attach_waiting(forge, conn, [view], now)
            document = forge.jobs.response(row)
            count = conn.execute("SELECT COUNT(*) FROM events WHERE job_id = ?", (job_id,))
            event_total = int(count.fetchone()[0])
            event_rows, _ = db.list_events(
                conn, job_id, limit=MAX_EVENTS, offset=max(0, event_total - MAX_EVENTS)
            )
            assertion_rows, assertions_total = db.query_assertions(
                conn, now=now, subject=job_id, limit=MAX_ASSERTIONS
            )
            job_violations = violations.of_job(conn, job_id)
    if row is None:  # the page is made outside the snapshot (it reads the health too)
        return _problem(
            404,
            "No such job",
            f"The forge has no job with the id {job_id}. It may never have been "
            "submitted here, or the id is mistyped.",
        )
    job_request = redact(document["request"])
    result = document.get("result")
    error = document.get("error")
    retry = job_request.get("retryPolicy") or {}
    max_retries = retry.get("maxRetries")
    timeout_ms = job_request.get("timeoutMs")
    detail = JobDetail(
        job=view,
        request_json=pretty_json(job_request),
        result_json=None if result is None else pretty_json(redact(result)),
        error_json=None if error is None else pretty_json(redact(error)),
        error=None if error is None else redact(error),
        error_in_result=result is not None and error is not None and result.get("error") == error,
        timeout=format_duration(float(timeout_ms)) if isinstance(timeout_ms, int | float) else "",
        max_attempts=int(max_retries) + 1 if isinstance(max_retries, int) else None,
        started=When.of(row["first_started_at"], now),
        created=When.of((job_request.get("metadata") or {}).get("createdAt"), now),
        correlation_id=str((job_request.get("metadata") or {}).get("correlationId") or ""),
        events_total=event_total,
        assertions_total=assertions_total,
        violations=_violation_views(job_violations, now),
    )
    for event_row in event_rows:
        event = redact(db.loads(event_row["document"]))
        data = event.get("data")
        attempt = data.get("attempt") if isinstance(data, dict) else None
        detail.events.append(
            {
                "type": str(event.get("type", "")),
                # Progress that arrived after its attempt ended (see JobStore.add_progress).
                "late_attempt": attempt
                if event.get("type") == "job.progress" and isinstance(attempt, int)
                else None,
                "when": When.of(event.get("timestamp"), now),
                "data": compact_json(data) if data not in (None, {}) else "",
                "source": str((event.get("metadata") or {}).get("service", "")),
            }
        )
    for assertion_row in assertion_rows:
        assertion = redact(db.loads(assertion_row["document"]))
        obj = assertion.get("object")
        structured = isinstance(obj, dict | list)
        detail.assertions.append(
            {
                "predicate": str(assertion.get("predicate", "")),
                "object": pretty_json(obj)
                if structured
                else (obj if isinstance(obj, str) else compact_json(obj)),
                "structured": structured,
                "preview": compact_json(obj, 80),
                "confidence": assertion.get("confidence"),
                "source": str(assertion.get("source", "")),
                "when": When.of(assertion.get("timestamp"), now),
                "metadata": compact_json(assertion.get("metadata"))
                if assertion.get("metadata")
                else "",
            }
        )
    finished = view.status in FINAL_STATUSES
    return _page(
        "dashboard/job.html",
        refresh=0 if finished else refresh,
        paused=refresh == 0 and not finished,
        finished=finished,
        detail=detail,
        job=view,
        api_url=url_for("forge.get_job", job_id=job_id),
    )
