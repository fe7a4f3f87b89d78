"""Who may call the forge, and from where.

The forge is closed by default, and a route added later is closed unless it is listed here:

- **Loopback only without a TOKEN.** With ``RUNNERKIT_FORGE_TOKEN`` empty, a peer that is not
  a loopback address gets 403 AUTHORIZATION_ERROR ``FORGE_LOOPBACK_ONLY`` on every route but
  ``/health`` (``gunicorn runnerkit.forge:app -b 0.0.0.0:…`` included). The peer is
  ``REMOTE_ADDR``: behind a reverse proxy on the same host every request is loopback, so a
  forge served that way needs a TOKEN.
- **The TOKEN on every route but /health.** With a TOKEN set, a request needs
  ``Authorization: Bearer <TOKEN>`` or the dashboard's session cookie; the dashboard's pages
  send a browser without either to ``/login`` (a password field for the TOKEN). The session
  cookie is an HMAC of a fixed label under the TOKEN (HttpOnly, SameSite=Strict): changing
  the TOKEN ends every session, and nothing is stored.
- **A runner's own credential.** Registration answers ``runnerToken`` beside the contract's
  fields (peers drop unknown keys); the forge keeps only its SHA-256. Heartbeats,
  deregistration, results and events must carry ``Authorization: Bearer <runnerToken>`` of
  the runner concerned (the heartbeat's runnerId, the job's runner); ``DELETE /runners/<id>``
  also takes the TOKEN. A credential of another runner is 403, none or an unknown one 401.
  TRUST_RUNNER_IDS accepts the TOKEN (or nothing, loopback only) instead, for runners that
  cannot keep a credential.
- **No cross-site requests.** A POST/PUT/PATCH/DELETE whose ``Origin`` is not the forge's own
  host, or that says ``Sec-Fetch-Site: cross-site``, is 403; the JSON routes refuse the
  content types a form can send without a preflight (415), even when they read no body.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import ipaddress
import secrets
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode, urlsplit

from flask import Blueprint, Flask, Response, current_app, g, redirect, render_template, request

from runnerkit.errors import RunnerError, Unauthenticated, UnsupportedMediaType

from . import db

if TYPE_CHECKING:
    from . import Forge

blueprint = Blueprint("forge_trust", __name__)

#: Endpoints anyone may call (health, and the stylesheet of the login page).
OPEN_ENDPOINTS = frozenset({"forge.health", "static", "forge.dashboard.static"})
#: Endpoints a runner calls with its own runnerToken; the route checks whose it is.
RUNNER_ENDPOINTS = frozenset(
    {"forge.heartbeat", "forge.deregister_runner", "forge.job_result", "forge.post_job_event"}
)
#: Endpoints that check the TOKEN themselves (the login form) or need no session (logout).
SESSION_ENDPOINTS = frozenset({"forge_trust.login", "forge_trust.logout"})
#: Pages for people: without credentials a browser is sent to the login page.
PAGE_ENDPOINTS = frozenset({"forge.dashboard.index", "forge.dashboard.job_page"})

#: Content types a cross-site form (or ``fetch`` without a preflight) may send.
FORM_TYPES = frozenset({"application/x-www-form-urlencoded", "multipart/form-data", "text/plain"})
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})

SESSION_COOKIE = "forge_session"
_SESSION_LABEL = b"runnerkit-forge-dashboard-session-v1"

#: Response headers of every page for people (the dashboard's pages and the login page): no
#: script may run, nothing is cached. Decided here, with who may see a page; the dashboard
#: imports them (a page's protection does not depend on the pages).
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; img-src 'self' data:; "
        "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


class Forbidden(RunnerError):
    """The caller is known (or its address is) but may not do this: 403."""

    category = "AUTHORIZATION_ERROR"
    code = "FORBIDDEN"


def _forge() -> Forge:
    forge: Forge = current_app.extensions["forge"]
    return forge


def token_hash(token: str) -> str:
    """What the forge stores of a runnerToken: its SHA-256, hex."""
    return hashlib.sha256(token.encode()).hexdigest()


def new_runner_token() -> tuple[str, str]:
    """A fresh runnerToken (32 random bytes, url-safe) and its hash."""
    token = secrets.token_urlsafe(32)
    return token, token_hash(token)


@functools.lru_cache(maxsize=1024)
def is_loopback(address: str | None) -> bool:
    """Whether a peer address is a loopback one (``::ffff:127.0.0.1`` included); the few
    peer addresses a forge sees are parsed once each."""
    if not address:
        return False
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def _bearer() -> str:
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    return given.strip() if scheme.lower() == "bearer" else ""


def _is_token(given: str, token: str) -> bool:
    return bool(given) and hmac.compare_digest(given.encode(), token.encode())


def session_value(token: str) -> str:
    """The dashboard's session cookie for ``token``: an HMAC of a fixed label under it."""
    return hmac.new(token.encode(), _SESSION_LABEL, hashlib.sha256).hexdigest()


def _has_session(token: str) -> bool:
    cookie = request.cookies.get(SESSION_COOKIE, "")
    return bool(cookie) and hmac.compare_digest(cookie.encode(), session_value(token).encode())


def _missing(given: str) -> Unauthenticated:
    return Unauthenticated(
        "A valid bearer token is required (Authorization: Bearer <token>)",
        code="INVALID_TOKEN" if given or request.headers.get("Authorization") else "MISSING_TOKEN",
    )


def _same_origin() -> bool:
    """Whether a browser would call this request same-site (absent headers: not a browser)."""
    if request.headers.get("Sec-Fetch-Site", "").lower() == "cross-site":
        return False
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    return urlsplit(origin).netloc.lower() == request.host.lower()


def check_request() -> Response | None:
    """``before_request`` of the whole app: refuse what the caller may not do (see above)."""
    endpoint = request.endpoint
    if endpoint in OPEN_ENDPOINTS:
        return None
    token = str(_forge().settings.token)
    if not token and not is_loopback(request.remote_addr):
        raise Forbidden(
            "This forge has no RUNNERKIT_FORGE_TOKEN and serves loopback clients only; set "
            "RUNNERKIT_FORGE_TOKEN to serve other addresses",
            code="FORGE_LOOPBACK_ONLY",
        )
    unsafe = request.method in UNSAFE_METHODS
    if unsafe and not _same_origin():
        raise Forbidden(
            "Cross-site requests may not change the forge's state", code="CROSS_SITE_REQUEST"
        )
    runner_action = (request.view_args or {}).get("runner_id") in ("register", "heartbeat")
    if endpoint == "forge.deregister_runner" and runner_action:
        return None  # DELETE on a route of its own: the route answers 405
    if endpoint in RUNNER_ENDPOINTS:
        g.forge_runner = _authenticate_runner(operator_may=endpoint == "forge.deregister_runner")
    elif token and endpoint not in SESSION_ENDPOINTS:
        given = _bearer()
        if not (_is_token(given, token) or _has_session(token)):
            if endpoint in PAGE_ENDPOINTS and request.method in ("GET", "HEAD") and not given:
                target = request.full_path.rstrip("?")
                return redirect(f"/login?{urlencode({'next': target})}", 303)  # type: ignore[return-value]
            raise _missing(given)
    if unsafe and endpoint not in SESSION_ENDPOINTS and request.mimetype in FORM_TYPES:
        raise UnsupportedMediaType(
            f"Content-Type {request.mimetype} is not accepted here; send application/json",
            code="UNSUPPORTED_MEDIA_TYPE",
        )
    return None


def admits_plainly(environ: dict[str, Any], token: str) -> bool:
    """True when :func:`check_request` would let this JSON request to an operator's route
    (``POST /jobs``) through, judged from its WSGI environ alone; False means only "ask
    :func:`check_request`", which words the refusal (or accepts a session cookie).

    The same rules, in their plainest case: the TOKEN as a bearer header (without a TOKEN, a
    loopback peer), and no sign of another site (no ``Origin`` at all, no ``Sec-Fetch-Site:
    cross-site``). The caller has checked the content type is JSON, so not a form's.
    """
    if "HTTP_ORIGIN" in environ:
        return False
    if environ.get("HTTP_SEC_FETCH_SITE", "").lower() == "cross-site":
        return False
    if not token:
        return is_loopback(environ.get("REMOTE_ADDR"))
    scheme, _, given = environ.get("HTTP_AUTHORIZATION", "").partition(" ")
    return scheme.lower() == "bearer" and _is_token(given.strip(), token)


#: ``g.forge_runner`` when the caller may speak for any runner (the TOKEN where allowed).
ANY_RUNNER = "*"


def _authenticate_runner(*, operator_may: bool) -> str:
    """The runner id whose runnerToken the request carries, or :data:`ANY_RUNNER`.

    The TOKEN counts as any runner where ``operator_may`` (deregistration) or with
    TRUST_RUNNER_IDS, which without a TOKEN accepts no credential at all (loopback only).
    401 for a missing or unknown credential.
    """
    settings = _forge().settings
    token = str(settings.token)
    given = _bearer()
    is_operator = bool(token) and _is_token(given, token)
    if is_operator and (operator_may or settings.trust_runner_ids):
        return ANY_RUNNER
    if not token and settings.trust_runner_ids and not given:
        return ANY_RUNNER
    if not given:
        raise _missing(given)
    with _forge().db.connection() as conn:
        holder = db.runner_by_token_hash(conn, token_hash(given))
    if holder is None:
        if is_operator:
            raise Forbidden(
                "This call needs the runner's own runnerToken (from its registration), "
                "not the forge's TOKEN",
                code="RUNNER_TOKEN_REQUIRED",
            )
        raise _missing(given)
    return str(holder["id"])


def require_runner(runner_id: str | None) -> None:
    """The request's runner credential must be ``runner_id``'s: 403 otherwise.

    ``runner_id`` None (a job never sent to a runner): no runner may speak for it.
    """
    holder = g.get("forge_runner")
    if holder == ANY_RUNNER:
        return
    if holder is None or runner_id is None or not hmac.compare_digest(holder, runner_id):
        raise Forbidden(
            "This runner's credential does not speak for that runner or job",
            code="NOT_YOUR_RUNNER",
        )


# --------------------------------------------------------------------------- the dashboard


@blueprint.route("/login", methods=["GET", "POST"])
def login() -> Response:
    """The dashboard's login: the TOKEN as a password, answered with a session cookie."""
    forge = _forge()
    token = str(forge.settings.token)
    target = request.values.get("next", "/")
    if not target.startswith("/") or target.startswith("//") or "\\" in target:
        target = "/"  # only a path of this forge ("/\\host" is another host to browsers)
    if not token:
        return redirect(target, 303)  # type: ignore[return-value]
    status, failed = 200, False
    if request.method == "POST":
        if _is_token(request.form.get("token", ""), token):
            response = redirect(target, 303)
            response.set_cookie(
                SESSION_COOKIE,
                session_value(token),
                httponly=True,
                samesite="Strict",
                secure=request.is_secure,
                path="/",
            )
            return response  # type: ignore[return-value]
        status, failed = 401, True
    body = render_template(
        "dashboard/login.html", service=str(forge.settings.service_name), next=target, failed=failed
    )
    page = Response(body, status=status, mimetype="text/html")
    page.headers.update(SECURITY_HEADERS)
    return page


@blueprint.post("/logout")
def logout() -> Response:
    response = redirect("/login", 303)
    response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="Strict")
    return response  # type: ignore[return-value]


def init_app(app: Flask) -> None:
    """Check every request before its route runs, and serve ``/login`` and ``/logout``."""
    app.before_request(check_request)
    app.register_blueprint(blueprint)
