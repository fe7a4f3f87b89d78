"""HTTP for Flask apps served here: bodies read within limits, JSON answers, request metrics and
the error handlers, shared by the runner and the forge.

Every error the app can produce, from a 404 route to an unhandled exception, leaves as
the contract's ErrorEnvelope, never as an HTML page.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from typing import Any

from flask import Flask, Response, current_app, g, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from runnerkit.errors import ValidationFailed, make_envelope
from runnerkit.service.metric_families import metrics
from runnerkit.service.metrics import labelled

log = logging.getLogger("runnerkit.http")

#: The category and code each HTTP error becomes (Flask's and gunicorn's own alike).
HTTP_ERRORS: dict[int, tuple[str, str]] = {
    400: ("VALIDATION_ERROR", "BAD_REQUEST"),
    401: ("AUTHENTICATION_ERROR", "UNAUTHENTICATED"),
    403: ("AUTHORIZATION_ERROR", "FORBIDDEN"),
    404: ("RESOURCE_NOT_FOUND", "ROUTE_NOT_FOUND"),
    405: ("VALIDATION_ERROR", "METHOD_NOT_ALLOWED"),
    409: ("RESOURCE_CONFLICT", "CONFLICT"),
    413: ("VALIDATION_ERROR", "PAYLOAD_TOO_LARGE"),
    414: ("VALIDATION_ERROR", "URI_TOO_LONG"),
    415: ("VALIDATION_ERROR", "UNSUPPORTED_MEDIA_TYPE"),
    417: ("VALIDATION_ERROR", "EXPECTATION_FAILED"),
    429: ("RATE_LIMITED", "RATE_LIMITED"),
    431: ("VALIDATION_ERROR", "HEADERS_TOO_LARGE"),
    501: ("VALIDATION_ERROR", "NOT_IMPLEMENTED"),
    503: ("SERVICE_UNAVAILABLE", "SERVICE_UNAVAILABLE"),
}


#: runnerkit's own JSON text, whatever the host app's ``app.json`` provider does.
_ENCODER = json.JSONEncoder(separators=(",", ":"), default=str)


def json_response(
    status: int, body: dict[str, Any], headers: dict[str, str] | None = None
) -> Response:
    return Response(
        _ENCODER.encode(body), status=status, headers=headers, mimetype="application/json"
    )


#: Default seconds without progress after which a client's request is given up
#: (``RUNNERKIT_CLIENT_IDLE_TIMEOUT_S``; a body read answers 400 BODY_UNREADABLE).
CLIENT_IDLE_TIMEOUT_S = 10.0


def read_body(
    idle_timeout_s: float = CLIENT_IDLE_TIMEOUT_S, body_limit: int | None = None
) -> bytes:
    """The request body, or RequestEntityTooLarge when it exceeds the app's
    MAX_CONTENT_LENGTH or ``body_limit``, whichever is smaller.

    With a Content-Length an oversized body is refused up front. A chunked body has
    none, and werkzeug's limited stream then stops quietly at the limit: so read it from the
    server's own (already terminated) stream, one byte past the limit, and refuse it if that
    byte exists.
    """
    limit = request.max_content_length
    if body_limit is not None and (limit is None or limit > body_limit):
        # runnerkit's limit, for its own routes: the app's MAX_CONTENT_LENGTH (the host's,
        # for all its routes) only where it is stricter.
        limit = body_limit
    length = request.content_length
    if length is not None and limit is not None and length > limit:
        raise RequestEntityTooLarge()
    # A client that stops sending mid-body must not hold this thread for ever: under
    # gunicorn, reads from its socket give up after ``idle_timeout_s`` of silence. The
    # runnerkit worker class sets that timeout for the whole connection already.
    sock = request.environ.get("gunicorn.socket")
    previous = sock.gettimeout() if sock is not None else None
    if previous == idle_timeout_s:
        sock = None
    if sock is not None:
        sock.settimeout(idle_timeout_s)
    try:
        if length is not None and "stream" not in request.__dict__:
            # Nothing has read the body yet: read it straight from the server's stream (the
            # WSGI server stops at Content-Length), without werkzeug's stream wrappers.
            raw: bytes = request.environ["wsgi.input"].read(length)
        elif length is not None or limit is None:
            raw = request.get_data(cache=False)
        else:
            raw = request.environ["wsgi.input"].read(limit + 1)
    except RequestEntityTooLarge:
        raise
    except Exception as exc:  # noqa: BLE001 - the server's own parse errors (bad chunks, EOF)
        raise ValidationFailed(
            "The request body could not be read (malformed chunked encoding, a closed "
            f"connection, {idle_timeout_s:g} s without a byte, or past its total deadline)",
            code="BODY_UNREADABLE",
            details=[{"message": f"{type(exc).__name__}: {exc}"[:200], "path": []}],
        ) from None
    finally:
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.settimeout(previous)
    if length is not None and len(raw) < length:
        # The client closed its side early; gunicorn hands over what arrived.
        raise ValidationFailed(
            f"The request body is {len(raw)} bytes, shorter than its Content-Length {length}",
            code="BODY_TRUNCATED",
        )
    if length is None and limit is not None and len(raw) > limit:
        raise RequestEntityTooLarge()
    return raw


#: Method label values; any other method a client invents is counted as "other", so callers
#: cannot grow /metrics without bound.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def register_request_metrics(app: Flask) -> None:
    """Count every request by method, status and route template (not raw path: bounded).

    The hooks are module-level, the same functions in every app, so a WSGI lane in front of
    the app can tell them from a host's own.
    """
    app.before_request(start_request_timer)
    app.after_request(record_request)


def start_request_timer() -> None:
    """The ``before_request`` hook of :func:`register_request_metrics`: the clock starts."""
    g.runnerkit_started = time.perf_counter()


def record_request(response: Response) -> Response:
    """The ``after_request`` hook of :func:`register_request_metrics`: the request counted."""
    started = g.pop("runnerkit_started", None)
    rule = request.url_rule.rule if request.url_rule is not None else "<unmatched>"
    count_request(request.method, response.status_code, rule, started)
    return response


def count_request(method: str, status: int, rule: str, started: float | None) -> None:
    """One request in the HTTP metrics: by method, status and route template, and its
    duration since ``started`` (``time.perf_counter``). The after-request hook of
    :func:`register_request_metrics` and routes served without Flask count alike."""
    current = metrics()
    labelled(
        current.http_requests, method if method in _METHODS else "other", str(status), rule
    ).inc()
    if started is not None:
        current.http_duration.observe(time.perf_counter() - started)


def read_input(environ: dict[str, Any], length: int, idle_timeout_s: float) -> bytes:
    """``length`` bytes of a WSGI request's body, read as :func:`read_body` reads them (under
    ``idle_timeout_s`` on gunicorn's socket) but without Flask; the server's errors
    propagate as they are."""
    sock = environ.get("gunicorn.socket")
    previous = sock.gettimeout() if sock is not None else None
    if previous == idle_timeout_s:
        sock = None  # the runnerkit worker class set it for the whole connection
    if sock is not None:
        sock.settimeout(idle_timeout_s)
    try:
        raw: bytes = environ["wsgi.input"].read(length)
    finally:
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.settimeout(previous)
    return raw


def register_error_handlers(app: Flask) -> None:
    """Make every HTTP error and unhandled exception of ``app`` a JSON ErrorEnvelope (an
    app runnerkit made; in a host's app only runnerkit's routes answer so)."""
    app.register_error_handler(HTTPException, http_error)
    app.register_error_handler(Exception, unhandled_error)


def _service() -> str:
    runner = current_app.extensions.get("runnerkit")
    return runner.name if runner is not None else current_app.name


def http_error(exc: HTTPException) -> Response:
    status = exc.code or 500
    category, code = HTTP_ERRORS.get(status, ("INTERNAL_ERROR", f"HTTP_{status}"))
    message = exc.description or exc.name
    if status == 404:
        message = f"No route {request.method} {request.path}"
    elif status == 405:
        message = f"{request.method} is not allowed on {request.path}"
    envelope = make_envelope(
        category,
        code,
        message,
        service=_service(),
        retryable=status in (429, 503),
        operation=f"{request.method} {request.path}",
    )
    headers = {k: v for k, v in exc.get_headers() if k.lower() not in ("content-type",)}
    return json_response(status, {"success": False, "error": envelope}, headers)


def unhandled_error(exc: Exception) -> Response:
    if isinstance(exc, HTTPException):
        return http_error(exc)
    log.error(
        "unhandled %s on %s %s", type(exc).__name__, request.method, request.path, exc_info=exc
    )
    envelope = make_envelope(
        "INTERNAL_ERROR",
        "INTERNAL_ERROR",
        "The server failed to handle the request",
        service=_service(),
        retryable=True,
        operation=f"{request.method} {request.path}",
    )
    return json_response(500, {"success": False, "error": envelope})
