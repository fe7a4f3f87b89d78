"""``POST /execute`` without Flask's machinery (``execute_lane``): the same answers, byte for
byte, as Flask's route gives the same request, the same metrics, the app's context for the
capability's code; and Flask whenever the request or the app is anything but plain."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask, Response, request_started
from flask.testing import FlaskClient
from werkzeug.datastructures import Headers
from werkzeug.test import EnvironBuilder, run_wsgi_app

from runnerkit import Runner
from runnerkit.runner.execute_lane import ExecuteLane
from runnerkit.runner.job_answers import Answer
from runnerkit.service.metric_families import metrics
from runnerkit.service.metrics import labelled
from runnerkit.service.signing import sign
from runnerkit.testing import JobForgeStub
from tests.helpers import (
    CORRELATION_ID,
    TEST_CAPABILITIES,
    Echo,
    assert_failure,
    flask_dispatches,
    request_body,
)
from tests.integration.flask_host_app import CAPABILITIES, GREETING, PREFIX, make_host_app
from tests.support.waiting import wait_until

SECRET = "s3cret-for-the-lane"
#: Values that differ between two requests of the same kind (a new jobId, the clock).
_VOLATILE = re.compile(rb'"(jobId|executionTimeMs|timestamp|id)":("[^"]*"|[-+.0-9eE]+)')

Served = tuple[str, list[tuple[str, str]], bytes]
Request = tuple[bytes, dict[str, str]]


def _json(body: dict[str, Any], **headers: str) -> Request:
    return json.dumps(body).encode(), {"Content-Type": "application/json", **headers}


def _serve(wsgi: Any, path: str, data: bytes, headers: dict[str, str]) -> Served:
    """``wsgi``'s answer to ``POST path`` as a WSGI server gets it: status, headers, body."""
    sent = Headers({"X-Correlation-Id": CORRELATION_ID, **headers})
    environ = EnvironBuilder(path=path, method="POST", data=data, headers=sent).get_environ()
    body, status, answer_headers = run_wsgi_app(wsgi, environ, buffered=True)
    return status, list(answer_headers.items()), b"".join(body)


def _lane_and_flask(
    app: Flask, make: Callable[[], Request], path: str = "/execute"
) -> tuple[Served, Served]:
    """One request served through the app (the lane, asserted) and one like it served by
    Flask's own WSGI entry behind the lane."""
    lane = app.wsgi_app
    assert isinstance(lane, ExecuteLane)
    dispatched = flask_dispatches(app)
    via_lane = _serve(app, path, *make())
    assert dispatched == [], "the lane handed the request to Flask"
    via_flask = _serve(lane.flask_wsgi, path, *make())
    assert dispatched == [path]
    return via_lane, via_flask


def _assert_alike(via_lane: Served, via_flask: Served) -> None:
    """The same status line, header names in the same order with the same values, and the
    same body but for what differs between two requests (jobId, clock)."""
    (lane_status, lane_headers, lane_body), (flask_status, flask_headers, flask_body) = (
        via_lane,
        via_flask,
    )
    assert lane_status == flask_status
    assert [k for k, _ in lane_headers] == [k for k, _ in flask_headers]
    assert dict(lane_headers)["Content-Length"] == str(len(lane_body))
    unlike = {"Content-Length"}
    assert [(k, v) for k, v in lane_headers if k not in unlike] == [
        (k, v) for k, v in flask_headers if k not in unlike
    ]
    assert _VOLATILE.sub(rb'"\1":_', lane_body) == _VOLATILE.sub(rb'"\1":_', flask_body)


# --------------------------------------------------------------------------- the same answers


@pytest.mark.parametrize(
    ("make", "status"),
    [
        pytest.param(lambda: _json(request_body("echo", {"message": "hi"})), 200, id="success"),
        pytest.param(lambda: _json(request_body("no-such-capability")), 404, id="unknown"),
        pytest.param(lambda: _json(request_body("echo", {"message": 5})), 400, id="payload"),
        pytest.param(lambda: _json(request_body(timeoutMs=0)), 400, id="contract"),
        pytest.param(lambda: (b'{"jobId": ', {"Content-Type": "application/json"}), 400, id="json"),
        pytest.param(lambda: (b"{}", {"Content-Type": "text/plain"}), 415, id="content-type"),
        pytest.param(
            lambda: _json(request_body("raiser", {"kind": "rate_limited"})), 429, id="retry-after"
        ),
    ],
)
def test_the_lane_answers_as_flasks_route_does(
    app: Flask, make: Callable[[], Request], status: int
) -> None:
    via_lane, via_flask = _lane_and_flask(app, make)
    assert via_lane[0].startswith(f"{status} ")
    _assert_alike(via_lane, via_flask)


def test_a_replay_is_the_same_bytes_either_way(app: Flask) -> None:
    body = request_body("echo", {"message": "once"})
    runs = Echo.calls
    first = _serve(app, "/execute", *_json(body))
    via_lane, via_flask = _lane_and_flask(app, lambda: _json(body))
    assert Echo.calls == runs + 1
    assert ("Idempotent-Replayed", "true") in via_lane[1]
    assert via_lane == via_flask
    assert via_lane[2] == first[2]


@pytest.mark.parametrize("app_config", [{"RUNNERKIT_SIGNING_SECRET": SECRET}])
@pytest.mark.parametrize(("secret", "status"), [(SECRET, 200), ("a-wrong-guess", 401)])
def test_signed_requests_are_verified_on_the_lane(app: Flask, secret: str, status: int) -> None:
    def signed() -> Request:
        raw, headers = _json(request_body("echo", {"message": "signed"}))
        return raw, {**headers, **sign(raw, secret)}

    via_lane, via_flask = _lane_and_flask(app, signed)
    assert via_lane[0].startswith(f"{status} ")
    _assert_alike(via_lane, via_flask)
    unsigned = _serve(app, "/execute", *_json(request_body()))
    assert unsigned[0].startswith("401 ")


def test_an_asynchronous_request_is_accepted_on_the_lane(
    runner: Runner, tmp_path: Path, jobforge_stub: JobForgeStub
) -> None:
    app = runner.create_app(
        {"RUNNERKIT_JOBFORGE_URL": jobforge_stub.url, "RUNNERKIT_STATE_DIR": str(tmp_path)}
    )
    try:
        assert runner.lifecycle is not None
        lifecycle = runner.lifecycle
        # Registered first, so both answers carry the runnerId JobForge assigned.
        wait_until(lifecycle.current_identity, 10, "the registration")
        via_lane, via_flask = _lane_and_flask(
            app, lambda: _json(request_body("echo"), Prefer="respond-async")
        )
    finally:
        runner.close()
    assert via_lane[0] == "202 ACCEPTED"
    _assert_alike(via_lane, via_flask)


def test_a_body_over_the_limit_is_flasks_413(app: Flask, through_flask: list[str]) -> None:
    raw, headers = _json(request_body("echo", {"message": "x" * 1_100_000}))
    status, answer_headers, body = _serve(app, "/execute", raw, headers)
    assert status == "413 REQUEST ENTITY TOO LARGE"
    assert ("Connection", "close") in answer_headers
    assert json.loads(body)["error"]["code"] == "PAYLOAD_TOO_LARGE"
    assert through_flask == ["/execute"]


class _Broken(io.RawIOBase):
    """A request input whose first read fails, as gunicorn's does on a reset connection (and
    then finds nothing more)."""

    def __init__(self) -> None:
        self.failed = False

    def read(self, *_args: Any) -> bytes:
        if self.failed:
            return b""
        self.failed = True
        raise OSError("connection reset")


@pytest.mark.parametrize(
    ("stream", "code"),
    [(_Broken(), "BODY_UNREADABLE"), (io.BytesIO(b'{"jobId": '), "BODY_TRUNCATED")],
)
def test_a_body_the_server_cannot_read_whole_is_flasks_400(
    app: Flask, through_flask: list[str], stream: Any, code: str
) -> None:
    environ = EnvironBuilder(
        path="/execute", method="POST", data=b" " * 40, content_type="application/json"
    ).get_environ()
    environ["wsgi.input"] = stream
    body, status, headers = run_wsgi_app(app, environ, buffered=True)
    assert status.startswith("400 ")
    assert headers["Connection"] == "close"
    assert json.loads(b"".join(body))["error"]["code"] == code
    assert through_flask == ["/execute"]


@pytest.mark.parametrize(
    "broken",
    [
        pytest.param(lambda: ZeroDivisionError("a bug"), id="raises"),
        pytest.param(lambda: Answer(200, {"data": object()}), id="unencodable"),
    ],
)
def test_an_executor_failure_is_the_apps_500_and_nothing_runs_twice(
    client: FlaskClient,
    runner: Runner,
    through_flask: list[str],
    monkeypatch: pytest.MonkeyPatch,
    broken: Callable[[], Any],
) -> None:
    calls: list[bytes] = []

    def execute(raw: bytes, *_args: Any) -> Answer:
        calls.append(raw)
        outcome = broken()
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    monkeypatch.setattr(runner.executor, "execute", execute)
    response = client.post("/execute", json=request_body())
    envelope = assert_failure(response, 500, "INTERNAL_ERROR", job_known=False)
    assert envelope["code"] == "INTERNAL_ERROR"
    assert b"Traceback" not in response.data
    assert len(calls) == 1
    assert through_flask == ["/execute"]  # the lane tried, Flask's handlers answered


# --------------------------------------------------------------------------- metrics, context


def test_the_lane_counts_its_requests_as_flask_does(client: FlaskClient) -> None:
    series = labelled(metrics().http_requests, "POST", "200", "/execute")
    durations = metrics().http_duration
    before, observed = series.value, sum(durations.series()[0][1])
    assert client.post("/execute", json=request_body()).status_code == 200  # the lane
    assert series.value == before + 1
    assert client.post("/execute?via=flask", json=request_body()).status_code == 200
    assert series.value == before + 2
    assert sum(durations.series()[0][1]) == observed + 2


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Flask]:
    yield make_host_app({"RUNNERKIT_JOBFORGE_URL": "", "RUNNERKIT_STATE_DIR": str(tmp_path)})


@pytest.mark.parametrize("capability", [c.id for c in CAPABILITIES])
def test_capability_code_reads_current_app_through_the_lane(host: Flask, capability: str) -> None:
    dispatched = flask_dispatches(host)
    series = labelled(metrics().http_requests, "POST", "200", f"{PREFIX}/execute")
    before = series.value
    body = request_body(capability, {"key": "GREETING"})
    answer = host.test_client().post(f"{PREFIX}/execute", json=body)
    assert answer.status_code == 200, answer.get_json()
    assert answer.get_json()["data"]["value"] == GREETING
    assert dispatched == []
    assert series.value == before + 1


def test_the_hosts_own_routes_are_flasks_as_before(host: Flask) -> None:
    dispatched = flask_dispatches(host)
    client = host.test_client()
    forbidden = client.get("/mine")
    assert forbidden.status_code == 403 and forbidden.mimetype == "text/html"
    assert client.post("/upload", data=b"x" * 300).get_json() == {"size": 300}
    assert client.post("/execute", json=request_body()).status_code == 404  # not runnerkit's
    assert dispatched == ["/mine", "/upload", "/execute"]
    via_lane, via_flask = _lane_and_flask(
        host,
        lambda: _json(request_body("config-inline", {"key": "GREETING"})),
        f"{PREFIX}/execute",
    )
    _assert_alike(via_lane, via_flask)


# --------------------------------------------------------------------------- Flask's path


def _teapot() -> Response:
    return Response("short and stout", status=418)


#: What the hooks that do not answer were called with.
_HEARD: list[Any] = []


@pytest.mark.parametrize(
    ("path", "extra"),
    [
        pytest.param("/execute?x=1", {}, id="query-string"),
        pytest.param(
            "/execute",
            {"headers": {"Transfer-Encoding": "chunked"}, "input_stream": None},
            id="chunked",
        ),
    ],
)
def test_an_unusual_request_goes_through_flask(
    client: FlaskClient, through_flask: list[str], path: str, extra: dict[str, Any]
) -> None:
    raw = json.dumps(request_body()).encode()
    if "input_stream" in extra:
        extra = {**extra, "input_stream": io.BytesIO(raw), "content_type": "application/json"}
        response = client.post(path, **extra)
    else:
        response = client.post(path, data=raw, content_type="application/json")
    assert response.status_code == 200, response.get_json()
    assert through_flask == ["/execute"]


def _on_the_blueprint(app: Flask) -> None:
    app.before_request_funcs.setdefault("runnerkit", []).append(_teapot)


@pytest.mark.parametrize(
    "add",
    [
        pytest.param(lambda app: app.before_request(_teapot), id="before_request"),
        pytest.param(lambda app: app.after_request(lambda r: _teapot()), id="after_request"),
        pytest.param(_on_the_blueprint, id="the-blueprints-before_request"),
        pytest.param(lambda app: app.teardown_request(_HEARD.append), id="teardown_request"),
        pytest.param(lambda app: app.teardown_appcontext(_HEARD.append), id="teardown_appcontext"),
        pytest.param(
            lambda app: app.url_value_preprocessor(lambda *a: _HEARD.append(a)),
            id="url_value_preprocessor",
        ),
    ],
)
def test_a_hook_added_after_the_app_was_made_turns_the_lane_off(
    app: Flask, through_flask: list[str], add: Callable[[Flask], Any]
) -> None:
    _HEARD.clear()
    add(app)
    answer = app.test_client().post("/execute", json=request_body())
    assert answer.status_code == 418 or _HEARD
    assert through_flask == ["/execute"]


def test_a_connected_signal_turns_the_lane_off(
    client: FlaskClient, through_flask: list[str]
) -> None:
    heard: list[str] = []

    def receiver(sender: Flask, **_extra: Any) -> None:
        heard.append(sender.name)

    request_started.connect(receiver)
    try:
        assert client.post("/execute", json=request_body()).status_code == 200
    finally:
        request_started.disconnect(receiver)
    assert heard == ["test-runner"]
    assert through_flask == ["/execute"]
    assert client.post("/execute", json=request_body()).status_code == 200
    assert through_flask == ["/execute"]  # the lane again


@pytest.mark.parametrize("what", ["hook", "middleware", "route"])
def test_a_host_app_set_up_before_init_app_keeps_flasks_path(tmp_path: Path, what: str) -> None:
    host = Flask("host-first")
    host.config.update({"RUNNERKIT_JOBFORGE_URL": "", "RUNNERKIT_STATE_DIR": str(tmp_path)})
    seen: list[str] = []
    if what == "hook":
        host.before_request(_teapot)
    elif what == "middleware":
        flask_wsgi = host.wsgi_app

        def middleware(environ: dict[str, Any], start_response: Any) -> Any:
            seen.append(environ["PATH_INFO"])
            return flask_wsgi(environ, start_response)

        host.wsgi_app = middleware  # type: ignore[method-assign]
    else:
        host.add_url_rule(f"{PREFIX}/execute", "mine", _teapot, methods=["POST"])
    Runner("host-first", capabilities=TEST_CAPABILITIES).init_app(host, url_prefix=PREFIX)
    answer = host.test_client().post(f"{PREFIX}/execute", json=request_body())
    if what == "middleware":
        assert answer.status_code == 200 and seen == [f"{PREFIX}/execute"]
    else:
        assert answer.status_code == 418  # the host's hook, or the route Flask matches first
