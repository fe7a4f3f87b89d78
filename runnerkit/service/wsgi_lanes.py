"""What a WSGI lane in front of a Flask app needs whatever its route: whether Flask's own
settings and signals would do more than the lane, the status lines werkzeug writes, and a
failed body read handed back to Flask.

A lane (the forge's :mod:`~runnerkit.forge.submit_lane`, the runner's
:mod:`~runnerkit.runner.execute_lane`) is installed as ``app.wsgi_app`` and answers the
plainest requests of one route without Flask's request machinery, exactly as Flask would
answer them; everything else it hands to Flask unchanged.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

from flask import Flask, Request, Response, signals
from flask.sessions import SecureCookieSessionInterface
from werkzeug.wrappers import Response as WerkzeugResponse

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]

#: Signals a host may connect to; a lane sends none of the request's, so one with receivers
#: sends the request through Flask.
REQUEST_SIGNALS = (
    signals.request_started,
    signals.request_finished,
    signals.request_tearing_down,
    signals.got_request_exception,
    signals.appcontext_pushed,
    signals.appcontext_popped,
    signals.appcontext_tearing_down,
)


def flask_adds_nothing(app: Flask) -> bool:
    """Whether Flask would do nothing for a request of ``app`` beyond routing and its hooks:
    no Host to check (``SERVER_NAME``, ``TRUSTED_HOSTS``, host matching), no session to open
    or refresh (a secret key, another session interface), no request or response class of
    the host's, no app-context teardown, no receiver of a request signal.

    Cheap enough for every request: a host may change any of these after the lane is in.
    """
    config = app.config
    return (
        config["SERVER_NAME"] is None
        and config["TRUSTED_HOSTS"] is None
        and app.secret_key is None
        and type(app.session_interface) is SecureCookieSessionInterface
        and app.request_class is Request
        and app.response_class is Response
        and not app.url_map.host_matching
        and not app.teardown_appcontext_funcs
        and not any(signal.receivers for signal in REQUEST_SIGNALS)
    )


def is_flasks_own(wsgi_app: Any) -> bool:
    """Whether ``wsgi_app`` is Flask's own entry, not a middleware a host put in front of it
    (a lane outside one would skip it)."""
    return getattr(wsgi_app, "__func__", None) is Flask.wsgi_app


@functools.cache
def status_line(code: int) -> str:
    """The status line werkzeug writes for ``code`` ("202 ACCEPTED")."""
    return WerkzeugResponse(status=code).status


class Unreadable:
    """A request input whose read fails as the server's did, for Flask's ``read_body`` to
    word (the bytes that did arrive are gone)."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def read(self, *_args: Any) -> bytes:
        raise self.error
