"""``POST <prefix>/execute`` served straight from WSGI when nothing about the request is unusual.

Every job reaches a runner through ``POST /execute``, and Flask's machinery around the route
(a request context, URL matching, before and after hooks, a ``Response`` object and its WSGI
conversion) is about a fifth of a runner request's CPU: more than the budget of DESIGN §8
(bare Flask + 200 µs) leaves for all of runnerkit's promises. :class:`ExecuteLane` sits in
front of the Flask app (``app.wsgi_app``) and takes the plainest requests itself: the same
body limits and read, the same ``Executor.execute`` (signature, parsing, validation, ledger,
slot, run: every answer the executor words, its refusals included) in the app's application
context (capability code relies on ``current_app``; no request context is promised to it),
the same request metrics and the same response, byte for byte (status line, headers in the
same order, body).

Anything else goes to Flask, which answers it exactly as before: another route or method, a
query string, a body without a plain Content-Length or over a limit (413), one the server
could not read whole (Flask words the 400 from the same failure, handed back), and any
request of an app a host has given hooks, routes, signals or settings the lane does not
replicate. An exception the executor lets out (it turns every failure of a job into an
answer, so this is a bug) is handed to the route to raise
(:data:`~runnerkit.runner.blueprint.EXECUTE_ERROR`): it meets the app's error handlers, and
the job, which may have run, is not run again.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, cast

from flask import Flask
from werkzeug.datastructures import EnvironHeaders
from werkzeug.exceptions import HTTPException

from runnerkit.runner.blueprint import EXECUTE_ERROR, blueprint, execute, routing_error
from runnerkit.runner.job_answers import Answer, SendEarly
from runnerkit.service.http import count_request, read_input, record_request, start_request_timer
from runnerkit.service.wsgi_lanes import (
    StartResponse,
    Unreadable,
    WSGIApp,
    flask_adds_nothing,
    is_flasks_own,
    status_line,
)

if TYPE_CHECKING:
    from runnerkit.runner.app import Runner

_BLUEPRINT = blueprint.name
_ENDPOINT = f"{_BLUEPRINT}.execute"
#: The request hooks runnerkit registers itself: the lane does what they do (the request
#: metrics; a routing error cannot happen on the route it takes).
_OWN_HOOKS = frozenset({start_request_timer, record_request, routing_error})


class ExecuteLane:
    """The runner app's WSGI entry: plain ``POST <prefix>/execute`` here, the rest to Flask."""

    def __init__(self, app: Flask, runner: Runner, flask_wsgi: WSGIApp) -> None:
        self.app = app
        self.runner = runner
        self.flask_wsgi = flask_wsgi
        #: The route's rule as Flask reports it (``/runner/execute``): the path the lane
        #: takes and the ``rule`` label of its requests in the metrics.
        self.rule = next(app.url_map.iter_rules(_ENDPOINT)).rule
        # The app-wide hooks as runnerkit left them (a host's own hook, added before or
        # after, sends requests through Flask).
        self.before = list(app.before_request_funcs.get(None, ()))
        self.after = list(app.after_request_funcs.get(None, ()))
        #: How many views the app had when the URL map was last asked who takes the rule.
        self._views = -1
        self._routed = False

    def hooks_are_runnerkits(self) -> bool:
        """Whether every app-wide hook in the app now is one runnerkit registered."""
        return all(hook in _OWN_HOOKS for hook in (*self.before, *self.after))

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if (
            environ.get("PATH_INFO") == self.rule
            and environ.get("REQUEST_METHOD") == "POST"
            and self._plain_app()
        ):
            answer = self._execute(environ, start_response)
            if answer is not None:
                return answer
        return self.flask_wsgi(environ, start_response)

    def _plain_app(self) -> bool:
        """Whether Flask would do no more for ``POST <prefix>/execute`` than the lane does:
        runnerkit's hooks only (the app's and the blueprint's, the two Flask runs for the
        route), its view and its Runner, and nothing of Flask's own settings."""
        app = self.app
        before, after = app.before_request_funcs, app.after_request_funcs
        teardown, preprocessors = app.teardown_request_funcs, app.url_value_preprocessors
        return (
            before.get(None) == self.before
            and after.get(None) == self.after
            and not before.get(_BLUEPRINT)
            and not after.get(_BLUEPRINT)
            and not teardown.get(None)
            and not teardown.get(_BLUEPRINT)
            and not preprocessors.get(None)
            and not preprocessors.get(_BLUEPRINT)
            and app.view_functions.get(_ENDPOINT) is execute
            and app.extensions.get("runnerkit") is self.runner
            and self._routed_here()
            and flask_adds_nothing(app)
        )

    def _routed_here(self) -> bool:
        """Whether Flask's URL map sends ``POST <rule>`` to runnerkit's view (a host's route
        of the same path, added first, would take it): asked again only when the app's views
        change."""
        views = len(self.app.view_functions)
        if views != self._views:
            url_map = self.app.url_map
            adapter = url_map.bind("localhost", subdomain=url_map.default_subdomain or "")
            try:
                endpoint, _values = adapter.match(self.rule, "POST")
            except HTTPException:  # not found, not allowed, a redirect
                endpoint = None
            self._routed = endpoint == _ENDPOINT
            self._views = views
        return self._routed

    def _execute(
        self, environ: dict[str, Any], start_response: StartResponse
    ) -> list[bytes] | None:
        """The answer to a plain execution request, or None to let Flask answer it."""
        started = time.perf_counter()
        runner = self.runner
        settings = runner.settings
        length_text = environ.get("CONTENT_LENGTH", "")
        if (
            environ.get("QUERY_STRING")
            or "HTTP_TRANSFER_ENCODING" in environ
            or not length_text.isascii()
            or not length_text.isdigit()
        ):
            return None
        length = int(length_text)
        app_limit = self.app.config["MAX_CONTENT_LENGTH"]
        if length > settings.max_body_bytes or (app_limit is not None and length > app_limit):
            return None  # 413 with Connection: close, worded by the route
        if runner.unsigned_warning_due:  # served by something other than gunicorn
            runner.warn_unsigned()
        try:
            raw = read_input(environ, length, settings.client_idle_timeout_s)
        except Exception as exc:  # noqa: BLE001 - Flask's read_body words any of them
            environ["wsgi.input"] = Unreadable(exc)
            return None
        if len(raw) < length:  # the client closed early: the route's 400 BODY_TRUNCATED
            environ["wsgi.input"] = io.BytesIO(raw)
            return None
        # What Flask's request.headers is too: read with .get, case-insensitive, nothing
        # copied (werkzeug does not declare it a Mapping).
        headers = cast("Mapping[str, str]", EnvironHeaders(environ))
        early = self._early(start_response, started)
        try:
            with self.app.app_context():
                answer = runner.executor.execute(raw, environ.get("CONTENT_TYPE"), headers, early)
            if answer.sent:
                return []  # sent at the job's deadline, on the connection it closes
            data = answer.json().encode()
        except Exception as exc:  # noqa: BLE001 - the route raises it, to the app's handlers
            environ[EXECUTE_ERROR] = exc
            return None
        start_response(status_line(answer.status), self._headers(answer, data))
        count_request("POST", answer.status, self.rule, started)
        return [data]

    @staticmethod
    def _headers(answer: Answer, data: bytes) -> list[tuple[str, str]]:
        return [
            *answer.headers.items(),
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(data))),
        ]

    def _early(self, start_response: StartResponse, started: float) -> SendEarly | None:
        """How a job's ``TIMEOUT`` is sent at its deadline while its code runs on in the
        request's thread, or None where that cannot be done (the job then runs on a job
        thread of its own, as through Flask).

        gunicorn writes through WSGI's ``write`` callable at once, from any thread; its
        response (``start_response.__self__``) is told to close the connection after this
        answer, since the request's thread stays with the job's code until it returns.
        """
        response = getattr(start_response, "__self__", None)
        close = getattr(response, "force_close", None)
        if close is None or type(response).__module__ != "gunicorn.http.wsgi":
            return None

        def send(answer: Answer) -> None:  # on the deadline watcher's thread
            data = answer.json().encode()
            close()
            write = start_response(status_line(answer.status), self._headers(answer, data))
            write(data)
            count_request("POST", answer.status, self.rule, started)

        return send


def install(app: Flask, runner: Runner) -> None:
    """Put the lane in front of ``app`` once runnerkit's routes and hooks are in it.

    Not in front of a middleware the host already wrapped Flask in (the lane would skip it),
    nor in an app the host gave request hooks of its own before ``init_app``: the lane could
    never take a request of such an app.
    """
    lane = ExecuteLane(app, runner, app.wsgi_app)
    if is_flasks_own(app.wsgi_app) and lane.hooks_are_runnerkits():
        app.wsgi_app = lane  # type: ignore[method-assign]
