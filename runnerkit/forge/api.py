"""The forge's HTTP API: JobForge's runner and job endpoints, TruthCore, health, a dashboard.

Thin on purpose: each route parses and validates its input against the contract, calls the
registry / job store / truth store, and serialises the answer. Every error leaves as
``{"success": false, "error": <ErrorEnvelope>}`` with ``service`` set to SERVICE_NAME.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from flask import Blueprint, Response, current_app, g, jsonify, request
from marshmallow import ValidationError
from werkzeug.exceptions import MethodNotAllowed

from runnerkit._version import __version__
from runnerkit.contracts import (
    JOB_STATUSES,
    RUNNER_STATUSES,
    JobEventSchema,
    RunnerExecutionResponseSchema,
    RunnerHeartbeatSchema,
    RunnerRegistrationRequestSchema,
    TruthAssertionSchema,
    TruthQuerySchema,
    http_status_for,
    load_job_request,
    utc_now,
)
from runnerkit.errors import (
    NotFound,
    RunnerError,
    Unavailable,
    ValidationFailed,
    details_from_validation_error,
    make_envelope,
)
from runnerkit.service.http import read_body
from runnerkit.service.jsonbody import check_json_limits, parse_json_object

from . import dashboard, db, trust, violations
from .jobs import monotonic_of
from .openapi import openapi_document
from .submit_lane import SUBMIT_ERROR

if TYPE_CHECKING:
    from . import Forge

blueprint = Blueprint("forge", __name__)
log = logging.getLogger("runnerkit.forge.api")

#: How each request body contract is loaded: its schema's ``load``, or for JobRequest (every
#: ``POST /jobs``) the checked shortcut in front of it.
_LOADERS: dict[str, Callable[[Any], Any]] = {
    "JobRequest": load_job_request,
    "RunnerRegistrationRequest": RunnerRegistrationRequestSchema().load,
    "RunnerHeartbeat": RunnerHeartbeatSchema().load,
    "RunnerExecutionResponse": RunnerExecutionResponseSchema().load,
    "JobEvent": JobEventSchema().load,
    "TruthAssertion": TruthAssertionSchema().load,
    "TruthQuery": TruthQuerySchema().load,
}


def _forge() -> Forge:
    forge: Forge = current_app.extensions["forge"]
    return forge


def _json(status: int, body: Any, headers: dict[str, str] | None = None) -> Response:
    response = jsonify(body)
    response.status_code = status
    if headers:
        response.headers.update(headers)
    return response


def _body(contract: str) -> dict[str, Any]:
    """The request body, parsed strictly and loaded with the contract's schema."""
    body = read_body()
    raw = parse_json_object(body, request.headers.get("Content-Type"))
    settings = _forge().settings
    check_json_limits(raw, settings.max_json_depth, settings.max_json_keys, body)
    try:
        loaded: dict[str, Any] = _LOADERS[contract](raw)
    except ValidationError as exc:
        g.forge_body = raw  # for the referee: who sent it (see referee.Referee.watch)
        raise ValidationFailed(
            f"The request body does not match {contract}",
            details=details_from_validation_error(exc, data=raw),
        ) from None
    return loaded


def _int_arg(name: str, default: int, *, minimum: int, maximum: int | None = None) -> int:
    value = request.args.get(name)
    if value is None or value == "":
        return default
    try:
        number = int(value)
    except ValueError:
        number = minimum - 1
    if number < minimum or (maximum is not None and number > maximum):
        bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
        raise ValidationFailed(
            f"Query parameter {name} must be an integer {bound}",
            code="INVALID_QUERY",
            details=[{"message": f"Expected an integer {bound}", "path": [name], "value": value}],
        )
    return number


def _page() -> tuple[int, int]:
    limit = _int_arg("limit", 50, minimum=1, maximum=int(_forge().settings.max_page_size))
    return limit, _int_arg("offset", 0, minimum=0, maximum=db.MAX_INTEGER)


def _enum_args(name: str, allowed: tuple[str, ...]) -> list[str]:
    """``?status=a,b&status=c`` → ``[a, b, c]``, each checked against ``allowed``."""
    values = [v.strip() for raw in request.args.getlist(name) for v in raw.split(",") if v.strip()]
    bad = [v for v in values if v not in allowed]
    if bad:
        raise ValidationFailed(
            f"Unknown {name} {', '.join(bad)}",
            code="INVALID_QUERY",
            details=[
                {"message": f"Expected one of {', '.join(allowed)}", "path": [name], "value": v}
                for v in bad
            ],
        )
    return values


def handle_store_unavailable(error: Exception) -> Response:
    """The database is down or unreachable: a retryable 503, not a 500 with a traceback."""
    log.warning(
        "%s %s: the database is unavailable (%s: %s)",
        request.method,
        request.path,
        type(error).__name__,
        str(error).strip().splitlines()[0] if str(error).strip() else "",
    )
    return handle_runner_error(
        Unavailable(
            "The forge's database is unavailable; retry later",
            code="STORE_UNAVAILABLE",
            retry_after=1.0,
        )
    )


def handle_runner_error(error: RunnerError) -> Response:
    """Any RunnerError raised by a route → its status and an ErrorEnvelope body."""
    envelope = make_envelope(
        error.category,
        error.code,
        error.message,
        service=str(_forge().settings.service_name),
        severity=error.severity,
        details=error.details,
        retryable=error.retryable,
        retry_after=error.retry_after,
        operation=f"{request.method} {request.path}",
    )
    headers: dict[str, str] = {}
    if error.status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="jobforge"'
        if request.endpoint == "forge.heartbeat":  # the runner's row says why
            _forge().referee.unauthenticated(error)
    if error.retry_after is not None:
        headers["Retry-After"] = str(max(1, round(error.retry_after)))
    return _json(error.status, {"success": False, "error": envelope}, headers)


# --------------------------------------------------------------------------- runners


@blueprint.post("/runners/register")
def register_runner() -> Response:
    """201 RunnerRegistrationResponse, plus ``runnerToken``: the runner's own credential for
    its later calls (contract peers drop unknown keys)."""
    forge = _forge()
    with forge.referee.watch("RunnerRegistrationRequest"):
        answer = forge.runners.register(_body("RunnerRegistrationRequest"))
    return _json(201, answer)


@blueprint.post("/runners/heartbeat")
def heartbeat() -> Response:
    with _forge().referee.watch("RunnerHeartbeat"):
        body = _body("RunnerHeartbeat")
    trust.require_runner(body["runnerId"])
    return _json(200, _forge().runners.heartbeat(body))


#: Paths under /runners/ that are routes of their own (POST only), not runner ids.
_RUNNER_ACTIONS = ("register", "heartbeat")


def _not_an_action(runner_id: str) -> None:
    """``GET``/``DELETE /runners/register`` is a 405 for that route, not an unknown runner."""
    if runner_id in _RUNNER_ACTIONS:
        raise MethodNotAllowed(valid_methods=["POST"])


@blueprint.delete("/runners/<runner_id>")
def deregister_runner(runner_id: str) -> Response:
    _not_an_action(runner_id)
    trust.require_runner(runner_id)
    _forge().runners.deregister(runner_id)
    return Response(status=204)


@blueprint.get("/runners")
def list_runners() -> Response:
    statuses = _enum_args("status", RUNNER_STATUSES)
    if len(statuses) > 1:
        raise ValidationFailed("Filter by one runner status at a time", code="INVALID_QUERY")
    limit, offset = _page()
    page = _forge().runners.list(
        status=statuses[0] if statuses else None, limit=limit, offset=offset
    )
    return _json(200, page)


@blueprint.get("/runners/<runner_id>")
def get_runner(runner_id: str) -> Response:
    _not_an_action(runner_id)
    return _json(200, _forge().runners.get(runner_id))


@blueprint.get("/violations")
def list_violations() -> Response:
    """What runners sent that broke a contract, newest first (see :mod:`.referee`): a
    runner's (``?runnerId=``, ``total`` its count), a job's answers' (``?jobId=``), or by
    default those the forge could tie to no runner (``total`` how many there have been)."""
    runner_id, job_id = request.args.get("runnerId"), request.args.get("jobId")
    with _forge().db.snapshot() as conn:
        if runner_id:
            row = db.get_runner(conn, runner_id)
            if row is None:
                raise NotFound(f"No runner {runner_id} is registered", code="RUNNER_NOT_FOUND")
            items, total = violations.of_runner(conn, runner_id), int(row["violations"])
        elif job_id:
            items = violations.of_job(conn, job_id)
            total = len(items)
        else:
            items, total = violations.unattributed(conn)
    return _json(200, {"items": items, "total": total})


# --------------------------------------------------------------------------- jobs


@blueprint.post("/jobs")
def submit_job() -> Response:
    forge = _forge()
    request_body = _body("JobRequest")
    failed = request.environ.pop(SUBMIT_ERROR, None)
    if failed is not None:  # the submission lane's store call failed: the app's handlers answer
        raise failed
    status, job = forge.submit(request_body)  # the JobResponse as JSON text
    return Response(
        job + "\n",
        status=status,
        mimetype="application/json",
        headers={"Location": f"/jobs/{request_body['id']}"},
    )


@blueprint.get("/jobs")
def list_jobs() -> Response:
    statuses = _enum_args("status", JOB_STATUSES)
    job_type = request.args.get("type") or None
    limit, offset = _page()
    page = _forge().jobs.list(statuses=statuses, job_type=job_type, limit=limit, offset=offset)
    return _json(200, page)


@blueprint.get("/jobs/<job_id>")
def get_job(job_id: str) -> Response:
    return _json(200, _forge().jobs.get(job_id))


@blueprint.post("/jobs/<job_id>/cancel")
def cancel_job(job_id: str) -> Response:
    return _json(200, _forge().jobs.cancel(job_id))


@blueprint.post("/jobs/<job_id>/result")
def job_result(job_id: str) -> Response:
    forge = _forge()
    with forge.referee.watch("RunnerExecutionResponse", job_id):
        body = _body("RunnerExecutionResponse")
        trust.require_runner(forge.jobs.runner_of(job_id))  # the body's runnerId proves nothing
        what, job = forge.jobs.deliver_result(job_id, body)
    if what == "recorded":
        forge.wake_dispatcher()
    return _json(200, job, {"X-Result-Outcome": what})


@blueprint.post("/jobs/<job_id>/events")
def post_job_event(job_id: str) -> Response:
    with _forge().referee.watch("JobEvent", job_id):
        event = _body("JobEvent")
        trust.require_runner(_forge().jobs.runner_of(job_id))
        recorded = _forge().jobs.add_progress(job_id, event)
    return _json(202, {"id": event["id"], "jobId": job_id, "recorded": recorded})


@blueprint.get("/jobs/<job_id>/events")
def list_job_events(job_id: str) -> Response:
    limit, offset = _page()
    return _json(200, _forge().jobs.events(job_id, limit=limit, offset=offset))


# --------------------------------------------------------------------------- TruthCore


@blueprint.post("/assert")
def add_assertion() -> Response:
    status, assertion = _forge().truth.add(_body("TruthAssertion"))
    return _json(status, assertion)


@blueprint.post("/query")
def query_assertions() -> Response:
    return _json(200, _forge().truth.query(_body("TruthQuery")))


# --------------------------------------------------------------------------- health


@blueprint.get("/openapi.json")
def openapi() -> Response:
    return _json(200, openapi_document(_forge().settings.service_name))


@blueprint.get("/health")
def health() -> Response:
    body = _forge().health()
    return _json(http_status_for(body["status"]), body)


# --------------------------------------------------------------------------- dashboard

# The pages for people (``GET /``, ``GET /jobs/<id>/view``) live in :mod:`.dashboard`.
blueprint.register_blueprint(dashboard.blueprint)


def health_document(forge: Forge) -> dict[str, Any]:
    """The HealthCheck contract: ``database`` (a query works) and ``dispatcher`` (the lock
    holder ticked within DISPATCHER_STALE_MS)."""
    checks: list[dict[str, Any]] = []
    started = time.perf_counter()
    heartbeat: Any = None
    try:
        forge.db.ping()
        with forge.db.connection() as conn:
            heartbeat = db.get_meta(conn, "dispatcher")
        checks.append(
            {
                "name": "database",
                "status": "healthy",
                "responseTimeMs": round((time.perf_counter() - started) * 1000.0, 3),
            }
        )
    except Exception as exc:  # noqa: BLE001 - any database failure makes the check unhealthy
        checks.append(
            {
                "name": "database",
                "status": "unhealthy",
                "responseTimeMs": round((time.perf_counter() - started) * 1000.0, 3),
                "message": f"The database query failed ({type(exc).__name__})",
            }
        )
    stale_s = float(forge.settings.dispatcher_stale_ms) / 1000.0
    dispatcher: dict[str, Any] = {"name": "dispatcher", "responseTimeMs": 0}
    if isinstance(heartbeat, dict) and isinstance(heartbeat.get("ts"), int | float):
        age = _dispatcher_age(heartbeat)
        fresh = age <= stale_s
        dispatcher["status"] = "healthy" if fresh else "unhealthy"
        yields = ", its sibling workers take new connections" if heartbeat.get("yields") else ""
        dispatcher["message"] = f"last tick {age:.1f} s ago (pid {heartbeat.get('pid')}{yields})"
    else:
        dispatcher["status"] = "unhealthy"
        dispatcher["message"] = "no dispatcher has ticked yet"
    checks.append(dispatcher)
    status = "unhealthy" if any(c["status"] == "unhealthy" for c in checks) else "healthy"
    return {
        "service": str(forge.settings.service_name),
        "status": status,
        "timestamp": utc_now(),
        "version": __version__,
        "uptime": round(max(0.0, time.monotonic() - forge.started), 3),
        "checks": checks,
    }


def _dispatcher_age(heartbeat: dict[str, Any]) -> float:
    """Seconds since the dispatcher's last recorded tick.

    On the monotonic clock when the record has a reading from it taken on this machine
    since it started (:func:`~.jobs.monotonic_of`); otherwise by the wall clock, which a
    clock step moves.
    """
    mono = monotonic_of(heartbeat)
    if mono is not None:
        return time.monotonic() - mono
    return max(0.0, time.time() - float(heartbeat["ts"]))
