"""The runner's routes: ``POST /execute``, the health probes, ``/capabilities``, ``/openapi.json``
and ``/metrics``, as one Flask blueprint the :class:`~runnerkit.runner.app.Runner` registers.

The routes are thin: each hands the request to the runner's executor or health checks and
writes the JSON they return. Error pages come from :mod:`runnerkit.service.http`. The plainest
``POST /execute`` requests never reach :func:`execute`: :mod:`~runnerkit.runner.execute_lane`
answers them in front of Flask, as this route would.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Flask, Response, current_app, request
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound, RequestEntityTooLarge

from runnerkit.errors import PayloadTooLarge, ValidationFailed
from runnerkit.runner.openapi import openapi_document
from runnerkit.service.http import http_error, json_response, read_body, unhandled_error
from runnerkit.service.metrics_exposition import exposition

#: The environ key under which the execute lane (:mod:`~runnerkit.runner.execute_lane`) hands
#: the route an exception ``Executor.execute`` raised, for the route to raise once more.
EXECUTE_ERROR = "runnerkit.runner.execute_error"

blueprint = Blueprint("runnerkit", __name__)
# runnerkit's own routes answer every error as an envelope, in any app.
blueprint.register_error_handler(HTTPException, http_error)
blueprint.register_error_handler(Exception, unhandled_error)


def _runner() -> Any:
    return current_app.extensions["runnerkit"]


@blueprint.post("/execute")
def execute() -> Response:
    failed = request.environ.pop(EXECUTE_ERROR, None)
    if failed is not None:  # the execute lane's executor call failed: the app's handlers answer
        raise failed
    runner = _runner()
    if runner.unsigned_warning_due:  # served by something other than gunicorn
        runner.warn_unsigned()
    try:
        raw = read_body(runner.settings.client_idle_timeout_s, runner.settings.max_body_bytes)
    except RequestEntityTooLarge:
        app_limit = request.max_content_length
        limit = runner.settings.max_body_bytes
        if app_limit is not None and app_limit < limit:
            limit = app_limit
        error = PayloadTooLarge(f"The request body is larger than {limit} bytes")
        answer = runner.executor.reject(error, request.headers)
        answer.headers["Connection"] = "close"
    except ValidationFailed as unreadable:
        answer = runner.executor.reject(unreadable, request.headers)
        answer.headers["Connection"] = "close"
    else:
        answer = runner.executor.execute(raw, request.headers.get("Content-Type"), request.headers)
    # The executor has the body's JSON text already (the ledger stores the same text).
    return Response(
        answer.json(), status=answer.status, headers=answer.headers, mimetype="application/json"
    )


@blueprint.get("/health")
def health() -> Response:
    status, body = _runner().health()
    return json_response(status, body)


@blueprint.get("/health/live")
def live() -> Response:
    status, body = _runner().liveness()
    return json_response(status, body)


@blueprint.get("/health/ready")
def ready() -> Response:
    status, body = _runner().readiness()
    return json_response(status, body)


@blueprint.get("/openapi.json")
def openapi() -> Response:
    return json_response(200, openapi_document(_runner()))


@blueprint.get("/metrics")
def prometheus_metrics() -> Response:
    body, content_type = exposition()
    return Response(body, status=200, content_type=content_type)


@blueprint.get("/capabilities")
def capabilities() -> Response:
    return json_response(200, _runner().registration_document())


def register_routing_errors(app: Flask) -> None:
    """In a host's app: a 404 under runnerkit's ``url_prefix`` and a 405 on one of its
    routes as ErrorEnvelopes, every other routing error left to the host.

    Flask raises routing errors before any blueprint is chosen, so the blueprint's own
    handlers never see them; a ``before_request`` of the app does, ahead of the view.
    """
    app.before_request(routing_error)


def routing_error() -> Response | None:
    """The ``before_request`` hook of :func:`register_routing_errors` (module-level, so the
    execute lane can tell it from a host's own hook)."""
    error = request.routing_exception
    if error is None or not isinstance(error, (NotFound, MethodNotAllowed)):
        return None
    runner = _runner()
    path = request.path
    if isinstance(error, MethodNotAllowed):
        ours = any(
            rule.rule == path
            for rule in current_app.url_map.iter_rules()
            if rule.endpoint.startswith(f"{blueprint.name}.")
        )
    else:
        prefix = runner.url_prefix
        ours = bool(prefix) and (path == prefix or path.startswith(f"{prefix}/"))
    return http_error(error) if ours else None
