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

This module holds the routes, their query strings and the frame every page shares; what a
page shows is read and built in :mod:`.dashboard_views` and written for people by
:mod:`.dashboard_format`. The headers that keep a page safe (``SECURITY_HEADERS``) are
:mod:`.trust`'s, which also serves the login page.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from flask import Blueprint, Response, current_app, render_template, request, url_for

from runnerkit._version import __version__
from runnerkit.contracts import JOB_STATUSES, utc_now
from runnerkit.errors.redaction import redact

from . import db, violations
from .dashboard_format import When, compact_json, format_duration, pretty_json
from .dashboard_views import (
    FINAL_STATUSES,
    RECENT_VIOLATIONS,
    JobDetail,
    attach_progress,
    attach_violations,
    attach_waiting,
    job_view,
    runner_view,
    running_counts,
    violation_views,
)
from .trust import SECURITY_HEADERS

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


class BadQuery(ValueError):
    """A query-string value the dashboard cannot use (answered with an HTML 400 page)."""


def _forge() -> Forge:
    forge: Forge = current_app.extensions["forge"]
    return forge


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
        running = running_counts(conn)
        job_rows, jobs_total = db.list_jobs(conn, statuses=statuses, limit=limit, offset=offset)
        counts = db.count_jobs_by_status(conn)
        runners = [runner_view(forge, r, running, now) for r in runner_rows]
        jobs = [job_view(forge, r, now) for r in job_rows]
        attach_progress(conn, jobs)
        attach_waiting(forge, conn, jobs, now)
        attach_violations(conn, runners, now)
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
        unattributed=violation_views(unknown, now),
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
            view = job_view(forge, row, now)
            attach_progress(conn, [view])
            attach_waiting(forge, conn, [view], now)
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
        violations=violation_views(job_violations, now),
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
