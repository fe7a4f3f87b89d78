"""Who may call the forge: every route of the app, the loopback rule, cross-site requests.

The route tables are built from the app's own ``url_map``, so a route added later is tested
here without anyone listing it: anonymous with a TOKEN set it must answer 401 (a dashboard page
sends the browser to ``/login``), and from a non-loopback peer without a TOKEN 403
``FORGE_LOOPBACK_ONLY``. Only ``/health``, ``/login``, ``/logout`` and the stylesheets are
open. The
cross-site and login checks run against a real forge under gunicorn.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from flask import Flask

from runnerkit.forge import create_app, get_forge
from runnerkit.forge.trust import session_value
from tests.forge.helpers import job_request, valid_page
from tests.security.stack import QUICK, Stack, failure_envelope
from tests.support import GunicornProcess, free_port

TOKEN = "trust-token-81d0c55e-keep-out"
AUTH = {"Authorization": f"Bearer {TOKEN}"}

#: What anyone may reach (a new route is closed unless it is added here and to trust.py);
#: ``/logout`` only clears the caller's own cookie.
OPEN_RULES = {
    "/health",
    "/login",
    "/logout",
    "/static/<path:filename>",
    "/ui/static/<path:filename>",
}
#: Pages for browsers: without credentials they answer 303 to the login page.
PAGE_RULES = {"/", "/jobs/<job_id>/view"}


def _routes(app: Flask) -> list[tuple[str, str, str]]:
    """(method, path, rule) of every route, path parameters filled in with a made-up id."""
    routes = []
    for rule in app.url_map.iter_rules():
        if rule.rule in OPEN_RULES:
            continue
        path = rule.rule
        for name in rule.arguments:
            path = path.replace(f"<{name}>", "0f9e4a5c-63a9-4a5e-9a56-2b1d93c6e7a1")
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            routes.append((method, path, rule.rule))
    return routes


@pytest.fixture
def token_app(tmp_path: Path) -> Iterator[Flask]:
    app = create_app(
        {"DB_PATH": str(tmp_path / "forge.sqlite3"), "DISPATCHER": False, "TOKEN": TOKEN}
    )
    yield app
    get_forge(app).close()


@pytest.fixture
def open_app(tmp_path: Path) -> Iterator[Flask]:
    app = create_app({"DB_PATH": str(tmp_path / "forge.sqlite3"), "DISPATCHER": False})
    yield app
    get_forge(app).close()


def test_every_route_but_health_needs_the_token(token_app: Flask) -> None:
    client = token_app.test_client()
    routes = _routes(token_app)
    assert len(routes) >= 18, routes  # the table really covers the app
    for method, path, rule in routes:
        response = client.open(path, method=method, json={})
        if rule in PAGE_RULES and method == "GET":
            assert response.status_code == 303, (method, path, response.status_code)
            assert response.headers["Location"].startswith("/login?next=")
            continue
        assert response.status_code == 401, (method, path, response.status_code)
        body = response.get_json()
        assert body["success"] is False and body["error"]["category"] == "AUTHENTICATION_ERROR"
        assert TOKEN not in response.get_data(as_text=True)
    assert client.get("/health").status_code in (200, 503)
    # With the token the same routes answer past the check (whatever they answer then).
    for method, path, _rule in routes:
        response = client.open(path, method=method, json={}, headers=AUTH)
        assert response.status_code not in (401, 303), (method, path, response.get_json())


def test_without_a_token_only_loopback_peers_are_served(open_app: Flask) -> None:
    client = open_app.test_client()
    for peer in ("10.0.0.5", "192.168.1.20", "2001:db8::7", "::ffff:10.0.0.5"):
        remote = {"REMOTE_ADDR": peer}
        for method, path, _rule in _routes(open_app):
            response = client.open(path, method=method, json={}, environ_base=remote)
            assert response.status_code == 403, (peer, method, path, response.status_code)
            error = response.get_json()["error"]
            assert error["category"] == "AUTHORIZATION_ERROR"
            assert error["code"] == "FORGE_LOOPBACK_ONLY"
            assert "RUNNERKIT_FORGE_TOKEN" in error["message"]
        # /health stays open (container health checks).
        health = client.get("/health", environ_base=remote)
        assert health.status_code in (200, 503)
    for peer in ("127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1"):
        assert client.get("/jobs", environ_base={"REMOTE_ADDR": peer}).status_code == 200, peer


def test_a_token_opens_the_forge_to_other_addresses(token_app: Flask) -> None:
    client = token_app.test_client()
    remote = {"REMOTE_ADDR": "10.0.0.5"}
    assert client.get("/jobs", environ_base=remote, headers=AUTH).status_code == 200
    assert client.get("/jobs", environ_base=remote).status_code == 401


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "::"])
def test_the_cli_refuses_to_bind_beyond_loopback_without_a_token(host: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNNERKIT_FORGE_")}
    env["RUNNERKIT_FORGE_DB_PATH"] = str(tmp_path / "forge.sqlite3")
    done = subprocess.run(
        [sys.executable, "-m", "runnerkit", "forge", "--host", host, "--port", str(free_port())],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "RUNNERKIT_FORGE_TOKEN" in lines[0], done.stderr
    assert not (tmp_path / "forge.sqlite3").exists()  # nothing started


# --------------------------------------------------------------------------- a real forge


@pytest.fixture(scope="module")
def forge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GunicornProcess]:
    stack = Stack(tmp_path_factory.mktemp("trust"))
    try:
        yield stack.forge(Path(stack.base_dir) / "forge.sqlite3", settings={"TOKEN": TOKEN})
    finally:
        stack.stop()


def _queued_job(forge: GunicornProcess) -> str:
    response = requests.post(
        f"{forge.url}/jobs", json=job_request("nobody.takes.this"), headers=AUTH, timeout=QUICK
    )
    assert response.status_code == 202, response.text
    job_id: str = response.json()["id"]
    return job_id


def _status(forge: GunicornProcess, job_id: str) -> str:
    response = requests.get(f"{forge.url}/jobs/{job_id}", headers=AUTH, timeout=QUICK)
    status: str = response.json()["status"]
    return status


@pytest.mark.parametrize(
    ("headers", "status", "code"),
    [
        pytest.param(
            {"Origin": "http://evil.example", "Content-Type": "application/x-www-form-urlencoded"},
            403,
            "CROSS_SITE_REQUEST",
            id="foreign-origin-form",
        ),
        pytest.param(
            {"Origin": "http://evil.example", "Content-Type": "application/json"},
            403,
            "CROSS_SITE_REQUEST",
            id="foreign-origin-json",
        ),
        pytest.param({"Origin": "null"}, 403, "CROSS_SITE_REQUEST", id="opaque-origin"),
        pytest.param(
            {"Sec-Fetch-Site": "cross-site", "Content-Type": "application/json"},
            403,
            "CROSS_SITE_REQUEST",
            id="sec-fetch-cross-site",
        ),
        pytest.param(
            {"Content-Type": "text/plain"}, 415, "UNSUPPORTED_MEDIA_TYPE", id="form-type-text"
        ),
        pytest.param(
            {"Content-Type": "multipart/form-data; boundary=x"},
            415,
            "UNSUPPORTED_MEDIA_TYPE",
            id="form-type-multipart",
        ),
    ],
)
def test_cross_site_cancels_are_refused_even_with_the_token(
    forge: GunicornProcess, headers: dict[str, str], status: int, code: str
) -> None:
    job_id = _queued_job(forge)
    # A browser's session cookie, or even the token, does not make a cross-site request good.
    cookie = {"Cookie": f"forge_session={session_value(TOKEN)}"}
    for credentials in (cookie, AUTH):
        response = requests.post(
            f"{forge.url}/jobs/{job_id}/cancel",
            data=b"",
            headers={**credentials, **headers},
            timeout=QUICK,
        )
        assert response.status_code == status, response.text
        assert failure_envelope(response)["code"] == code
    assert _status(forge, job_id) == "queued"


def test_same_origin_and_non_browser_cancels_work(forge: GunicornProcess) -> None:
    job_id = _queued_job(forge)
    same = {"Origin": forge.url, "Sec-Fetch-Site": "same-origin"}
    cookie = {"Cookie": f"forge_session={session_value(TOKEN)}"}
    response = requests.post(
        f"{forge.url}/jobs/{job_id}/cancel", json={}, headers={**cookie, **same}, timeout=QUICK
    )
    assert response.status_code == 200, response.text
    assert _status(forge, job_id) == "cancelled"
    other = _queued_job(forge)
    plain = requests.post(f"{forge.url}/jobs/{other}/cancel", headers=AUTH, timeout=QUICK)
    assert plain.status_code == 200, plain.text


def test_the_dashboard_login_session(forge: GunicornProcess) -> None:
    browser = requests.Session()
    first = browser.get(f"{forge.url}/", allow_redirects=False, timeout=QUICK)
    assert first.status_code == 303 and first.headers["Location"].startswith("/login")
    login_page = browser.get(f"{forge.url}/login?next=/", timeout=QUICK)
    assert login_page.status_code == 200 and 'type="password"' in login_page.text
    wrong = browser.post(
        f"{forge.url}/login", data={"token": "guess", "next": "/"}, allow_redirects=False
    )
    assert wrong.status_code == 401 and "forge_session" not in browser.cookies
    foreign = browser.post(
        f"{forge.url}/login",
        data={"token": TOKEN, "next": "/"},
        headers={"Origin": "http://evil.example"},
        allow_redirects=False,
    )
    assert foreign.status_code == 403 and "forge_session" not in browser.cookies
    good = browser.post(
        f"{forge.url}/login",
        data={"token": TOKEN, "next": "/"},
        headers={"Origin": forge.url},
        allow_redirects=False,
    )
    assert good.status_code == 303 and good.headers["Location"] == "/"
    cookie = good.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert TOKEN not in cookie  # an HMAC under the token, not the token
    page = browser.get(f"{forge.url}/", timeout=QUICK)
    assert page.status_code == 200 and 'data-testid="forge-health"' in page.text
    # The session reads the JSON API too (same site only, as every cookie here).
    assert browser.get(f"{forge.url}/jobs", timeout=QUICK).status_code == 200
    out = browser.post(f"{forge.url}/logout", headers={"Origin": forge.url}, allow_redirects=False)
    assert out.status_code == 303
    assert browser.get(f"{forge.url}/jobs", timeout=QUICK).status_code == 401


def test_a_bearer_header_also_opens_the_pages(forge: GunicornProcess) -> None:
    page = requests.get(f"{forge.url}/", headers=AUTH, timeout=QUICK)
    assert page.status_code == 200
    jobs = valid_page("JobResponse", requests.get(f"{forge.url}/jobs", headers=AUTH).json())
    assert jobs["limit"] == 50


@pytest.mark.parametrize("target", ["//evil.example/", "/\\evil.example", "https://evil.example/"])
def test_the_login_only_sends_browsers_to_the_forges_own_pages(
    token_app: Flask, target: str
) -> None:
    response = token_app.test_client().post(
        "/login", data={"token": TOKEN, "next": target}, headers={"Origin": "http://localhost"}
    )
    assert response.status_code == 303
    assert response.headers["Location"] == "/"
