"""``POST /jobs`` without Flask's machinery (``submit_lane``): the same answers as through Flask,
and Flask whenever the request or the app is anything but plain."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
from flask import Flask, Response
from flask.testing import FlaskClient
from werkzeug.test import EnvironBuilder, run_wsgi_app

from runnerkit.errors import Conflict
from runnerkit.forge import Forge, get_forge
from runnerkit.forge.trust import SESSION_COOKIE, session_value
from runnerkit.service.metric_families import metrics
from runnerkit.service.metrics import labelled
from tests.forge.helpers import forge_app, job_request

#: A header that keeps the request out of the lane (check_request still accepts it).
SAME_ORIGIN = {"Origin": "http://localhost"}


def _answer(response: Any) -> tuple[str, list[tuple[str, str]], bytes]:
    return response.status, list(response.headers.items()), response.data


def test_plain_submission_skips_flask_and_answers_as_flask_would(
    client: FlaskClient, through_flask: list[str]
) -> None:
    lane_new = client.post("/jobs", json=job_request())
    body = job_request()
    flask_new = client.post("/jobs", json=body, headers=SAME_ORIGIN)
    lane_again = client.post("/jobs", json=body)
    flask_again = client.post("/jobs", json=body, headers=SAME_ORIGIN)
    assert through_flask == ["/jobs", "/jobs"]  # the two with an Origin
    assert lane_new.status == flask_new.status == "202 ACCEPTED"
    assert [k for k, _ in lane_new.headers.items()] == [k for k, _ in flask_new.headers.items()]
    assert lane_new.headers["Location"] == f"/jobs/{lane_new.json['id']}"  # type: ignore[index]
    assert _answer(lane_again) == _answer(flask_again)
    assert lane_again.status == "200 OK"


@pytest.mark.parametrize(
    ("path", "headers", "data"),
    [
        ("/jobs?x=1", {}, None),
        ("/jobs", {"Content-Type": "text/plain"}, b"{}"),
        ("/jobs", {"Sec-Fetch-Site": "cross-site"}, None),
        ("/jobs", {}, b'{"id": 1}'),
        ("/jobs", {}, b"[]"),
    ],
)
def test_anything_unusual_goes_through_flask(
    client: FlaskClient,
    through_flask: list[str],
    path: str,
    headers: dict[str, str],
    data: bytes | None,
) -> None:
    kwargs: dict[str, Any] = {"headers": headers}
    if data is None:
        kwargs["json"] = job_request()
    else:
        kwargs["data"] = data
        kwargs["headers"] = {"Content-Type": "application/json", **headers}
    response = client.post(path, **kwargs)
    assert through_flask == ["/jobs"]
    assert response.status_code in (202, 400, 403, 415)


def test_a_refused_body_is_worded_by_flask_from_the_same_bytes(client: FlaskClient) -> None:
    answer = client.post("/jobs", data=b'{"id": "x"', content_type="application/json")
    assert answer.status_code == 400
    assert answer.json["error"]["code"] == "INVALID_JSON"  # type: ignore[index]


class _Broken(io.RawIOBase):
    """A request input whose read fails, as gunicorn's does on a reset connection."""

    def read(self, *_args: Any) -> bytes:
        raise OSError("connection reset")


@pytest.mark.parametrize(
    ("stream", "code"),
    [(_Broken(), "BODY_UNREADABLE"), (io.BytesIO(b'{"id": '), "BODY_TRUNCATED")],
)
def test_a_body_the_server_cannot_read_whole_is_a_400(app: Flask, stream: Any, code: str) -> None:
    environ = EnvironBuilder(
        path="/jobs",
        method="POST",
        data=b" " * 40,
        content_type="application/json",
        environ_base={"REMOTE_ADDR": "127.0.0.1"},
    ).get_environ()
    environ["wsgi.input"] = stream
    body, status, _headers = run_wsgi_app(app, environ, buffered=True)
    assert status.startswith("400 ")
    assert json.loads(b"".join(body))["error"]["code"] == code


def test_a_store_error_meets_the_apps_handlers_without_a_second_submit(
    client: FlaskClient, forge: Forge, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []

    def refuse(request: dict[str, Any], notify: str | None = None) -> tuple[int, str]:
        calls.append(request["id"])
        raise Conflict("no", code="JOB_ID_CONFLICT") if len(calls) == 1 else RuntimeError("x")

    monkeypatch.setattr(forge.jobs, "submit", refuse)
    conflict = client.post("/jobs", json=job_request())
    assert conflict.status_code == 409
    assert conflict.json["error"]["code"] == "JOB_ID_CONFLICT"  # type: ignore[index]
    broken = client.post("/jobs", json=job_request())
    assert broken.status_code == 500
    assert broken.json["error"]["code"] == "INTERNAL_ERROR"  # type: ignore[index]
    assert len(calls) == 2


def test_the_lane_counts_its_requests(client: FlaskClient) -> None:
    series = labelled(metrics().http_requests, "POST", "202", "/jobs")
    before = series.value
    assert client.post("/jobs", json=job_request()).status_code == 202
    assert series.value == before + 1


def test_a_hook_of_the_host_turns_the_lane_off(forge_config: dict[str, Any]) -> None:
    app = forge_app(forge_config)
    try:

        @app.before_request
        def teapot() -> Response:
            return Response("short and stout", status=418)

        answer = app.test_client().post("/jobs", json=job_request())
        assert answer.status_code == 418
    finally:
        get_forge(app).close()


def test_the_token_is_required_on_the_lane_too(store_config: dict[str, str]) -> None:
    app = forge_app({**store_config, "DISPATCHER": False, "TOKEN": "s3cret-token-value"})
    try:
        client = app.test_client()
        assert client.post("/jobs", json=job_request()).status_code == 401
        bad = {"Authorization": "Bearer wrong"}
        assert client.post("/jobs", json=job_request(), headers=bad).status_code == 401
        good = {"Authorization": "Bearer s3cret-token-value"}
        assert client.post("/jobs", json=job_request(), headers=good).status_code == 202
        client.set_cookie(SESSION_COOKIE, session_value("s3cret-token-value"))
        assert client.post("/jobs", json=job_request()).status_code == 202  # through Flask
    finally:
        get_forge(app).close()


def test_without_a_token_only_loopback_peers_submit(client: FlaskClient) -> None:
    remote = {"REMOTE_ADDR": "192.0.2.7"}
    answer = client.post("/jobs", json=job_request(), environ_base=remote)
    assert answer.status_code == 403
    assert answer.json["error"]["code"] == "FORGE_LOOPBACK_ONLY"  # type: ignore[index]
