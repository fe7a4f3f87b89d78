"""``POST /jobs`` served straight from WSGI when nothing about the request is unusual.

Every job enters the forge through ``POST /jobs``, and Flask's machinery around the route (a
request context, URL matching, before and after hooks, a ``Response`` object and its WSGI
conversion) cost the forge about as much CPU as the route itself. :class:`SubmitLane` sits in
front of the Flask app (``app.wsgi_app``) and takes the plainest submissions itself: the
same trust rules (:func:`.trust.admits_plainly`), the same body limits, parse and JobRequest
load, the same ``JobStore.submit``, the same request metrics and the same response, byte for
byte (status line, headers in the same order, body).

Anything else goes to Flask, which answers it exactly as before: another route or method, a
request without a Content-Length or over the body limit, a caller the plain trust rules do
not admit at once (a session cookie, an ``Origin`` header, a refusal), a body that does not
parse or load (Flask's route then words the error from the same bytes, put back), an app a
host has given hooks, signals or settings the lane does not replicate. An error from the
store itself is handed to the route to raise (:data:`SUBMIT_ERROR`), so it meets the app's
error handlers and hooks without the job being submitted twice.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from flask import Flask

from runnerkit.contracts import load_job_request
from runnerkit.service.http import CLIENT_IDLE_TIMEOUT_S, count_request, read_input
from runnerkit.service.jsonbody import check_json_limits, is_json_content_type, parse_json_object
from runnerkit.service.wsgi_lanes import (
    StartResponse,
    Unreadable,
    WSGIApp,
    flask_adds_nothing,
    status_line,
)

from . import trust

if TYPE_CHECKING:
    from . import Forge

#: The environ key under which the lane hands the route an error ``JobStore.submit`` raised.
SUBMIT_ERROR = "runnerkit.forge.submit_error"

_ENDPOINT = "forge.submit_job"
_RULE = "/jobs"


class SubmitLane:
    """The forge's WSGI app: plain ``POST /jobs`` requests here, everything else to Flask."""

    def __init__(self, app: Flask, forge: Forge, flask_wsgi: WSGIApp) -> None:
        self.app = app
        self.forge = forge
        self.flask_wsgi = flask_wsgi
        # The app's hooks as create_app left them: the lane does what they do (the trust
        # check, the request metrics) and nothing else, so any other hook sends requests
        # through Flask.
        self.before = {k: list(v) for k, v in app.before_request_funcs.items()}
        self.after = {k: list(v) for k, v in app.after_request_funcs.items()}
        self.view = app.view_functions[_ENDPOINT]

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if (
            environ.get("PATH_INFO") == _RULE
            and environ.get("REQUEST_METHOD") == "POST"
            and self._plain_app()
        ):
            answer = self._submit(environ, start_response)
            if answer is not None:
                return answer
        return self.flask_wsgi(environ, start_response)

    def _plain_app(self) -> bool:
        """Whether Flask would do no more for ``POST /jobs`` than the lane does."""
        app = self.app
        return (
            app.before_request_funcs == self.before
            and app.after_request_funcs == self.after
            and not app.teardown_request_funcs
            and not app.url_value_preprocessors
            and app.view_functions.get(_ENDPOINT) is self.view
            and flask_adds_nothing(app)
        )

    def _submit(self, environ: dict[str, Any], start_response: StartResponse) -> list[bytes] | None:
        """The answer to a plain submission, or None to let Flask answer it."""
        started = time.perf_counter()
        settings = self.forge.settings
        content_type = environ.get("CONTENT_TYPE")
        length_text = environ.get("CONTENT_LENGTH", "")
        limit = self.app.config["MAX_CONTENT_LENGTH"]
        if (
            environ.get("QUERY_STRING")
            or "HTTP_TRANSFER_ENCODING" in environ
            or not length_text.isascii()
            or not length_text.isdigit()
            or not is_json_content_type(content_type)
            or not trust.admits_plainly(environ, str(settings.token))
        ):
            return None
        length = int(length_text)
        if limit is not None and length > limit:
            return None
        try:
            raw = read_input(environ, length, CLIENT_IDLE_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - Flask's read_body words any of them
            environ["wsgi.input"] = Unreadable(exc)
            return None
        try:
            if len(raw) < length:
                raise ValueError("truncated")
            body = parse_json_object(raw, content_type)
            check_json_limits(body, settings.max_json_depth, settings.max_json_keys, raw)
            request = load_job_request(body)
        except Exception:  # noqa: BLE001 - Flask's route refuses the same bytes in words
            environ["wsgi.input"] = io.BytesIO(raw)
            return None
        try:
            status, job = self.forge.submit(request)
        except Exception as exc:  # noqa: BLE001 - the route raises it, to the app's handlers
            environ["wsgi.input"] = io.BytesIO(raw)
            environ[SUBMIT_ERROR] = exc
            return None
        data = (job + "\n").encode()
        start_response(
            status_line(status),
            [
                ("Location", f"/jobs/{request['id']}"),
                ("Content-Type", "application/json"),
                ("Content-Length", str(len(data))),
            ],
        )
        count_request("POST", status, _RULE, started)
        return [data]


def install(app: Flask, forge: Forge) -> None:
    """Put the lane in front of ``app`` (call once the app is put together)."""
    app.wsgi_app = SubmitLane(app, forge, app.wsgi_app)  # type: ignore[method-assign]
