"""Real components for the forge tests: the forge served over HTTP, fake runners, documents.

``ForgeServer`` serves ``create_app`` with werkzeug's threaded server on a free loopback port.
``FakeRunner`` is a small real HTTP runner (``http.server`` in a thread) that answers
``POST /execute`` as a test scripts it and records every call (time, body, headers, how many
ran at once per capability). Every wait here is bounded.
"""

from __future__ import annotations

import contextlib
import json
import select
import socket
import struct
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import requests
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.serving import make_server
from werkzeug.test import TestResponse

from runnerkit.contracts import CONTRACT_VERSION, utc_now, validate
from runnerkit.errors import make_envelope
from runnerkit.forge import Forge, ForgeSettings, create_app, get_forge
from runnerkit.forge.db.factory import open_database
from runnerkit.forge.db.interface import Database
from tests.support.waiting import wait_until

# --------------------------------------------------------------------------- documents


def store(config: Mapping[str, Any]) -> Database:
    """The store a forge with these settings uses (its SQLite file or PostgreSQL schema)."""
    return open_database(ForgeSettings.load(config, environ={}))


def new_id() -> str:
    return str(uuid.uuid4())


def job_request(
    job_type: str = "text.stats",
    *,
    data: Mapping[str, Any] | None = None,
    priority: int | None = None,
    timeout_ms: float | None = None,
    retry_policy: Mapping[str, Any] | None = None,
    job_id: str | None = None,
    **metadata: Any,
) -> dict[str, Any]:
    """A contract-valid JobRequest; extra keywords go into ``metadata``."""
    body: dict[str, Any] = {
        "id": job_id or new_id(),
        "type": job_type,
        "payload": {"type": job_type, "data": dict(data or {"text": "hello"})},
        "metadata": {"source": "tests", "createdAt": utc_now(), **metadata},
    }
    if priority is not None:
        body["priority"] = priority
    if timeout_ms is not None:
        body["timeoutMs"] = timeout_ms
    if retry_policy is not None:
        body["retryPolicy"] = dict(retry_policy)
    return body


def sync_request(job_type: str = "type.a", **kwargs: Any) -> dict[str, Any]:
    """A job the dispatcher sends synchronously (timeoutMs below ASYNC_THRESHOLD_MS)."""
    kwargs.setdefault("timeout_ms", 5_000)
    return job_request(job_type, **kwargs)


def capability(
    cap_id: str, job_types: list[str], max_concurrency: int = 1, timeout_ms: float = 30000
) -> dict[str, Any]:
    return {
        "id": cap_id,
        "name": cap_id,
        "version": "1.0.0",
        "description": f"test capability {cap_id}",
        "inputSchema": {"type": "object"},
        "outputSchema": {"type": "object"},
        "supportedJobTypes": list(job_types),
        "maxConcurrency": max_concurrency,
        "timeoutMs": timeout_ms,
    }


def registration(
    name: str,
    health_url: str,
    capabilities: list[dict[str, Any]],
    *,
    contract_version: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "name": name,
        "version": "1.2.3",
        "contractVersion": dict(contract_version or CONTRACT_VERSION),
        "capabilities": capabilities,
        "healthCheckEndpoint": health_url,
        "tags": ["test"],
    }


def heartbeat(runner_id: str, status: str = "healthy") -> dict[str, Any]:
    return {"runnerId": runner_id, "timestamp": utc_now(), "status": status, "activeJobs": 0}


def envelope(category: str, code: str, *, retryable: bool, **extra: Any) -> dict[str, Any]:
    return make_envelope(
        category, code, f"{code} (scripted)", service="fake", retryable=retryable, **extra
    )


# --------------------------------------------------------------------------- contract checks


def valid(contract: str, body: Any) -> Any:
    """Assert ``body`` is a valid ``contract`` document (and return it)."""
    errors = validate(contract, body)
    assert errors == {}, f"not a valid {contract}: {errors}\n{json.dumps(body, indent=1)}"
    return body


def valid_page(item_contract: str, body: Any) -> Any:
    valid_keys = {"items", "total", "limit", "offset", "hasMore"}
    assert isinstance(body, dict) and set(body) == valid_keys, body
    assert isinstance(body["items"], list)
    assert isinstance(body["total"], int) and body["total"] >= 0
    assert body["hasMore"] is (body["offset"] + len(body["items"]) < body["total"])
    for item in body["items"]:
        valid(item_contract, item)
    return body


def error_of(response: Any, status: int, category: str) -> dict[str, Any]:
    """Assert an error answer: the status, ``{"success": false, "error": <envelope>}``."""
    body = response.get_json() if hasattr(response, "get_json") else response.json()
    assert response.status_code == status, (response.status_code, body)
    assert body["success"] is False
    error: dict[str, Any] = valid("ErrorEnvelope", body["error"])
    assert error["category"] == category, error
    assert error["service"] == "jobforge"
    return error


def wait_for(
    predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02, what: str = ""
) -> Any:
    """:func:`tests.support.waiting.wait_until` with the forge tests' keyword style."""
    return wait_until(predicate, timeout, f"waiting for {what or predicate}", interval)


# --------------------------------------------------------------------------- the forge


class RunnerClient(FlaskClient):
    """A test client that calls the runner endpoints as the runner concerned, the way a
    runner does: with the ``runnerToken`` the forge gave at registration.

    Registrations through this client are remembered; a heartbeat (by its ``runnerId``), a
    deregistration (by the id in its path), a result (by its ``runnerId``) or a progress
    event (by the job's runner) sent without an ``Authorization`` header gets that runner's.
    A test that sends its own header (or none to a runner nobody registered here) is left
    alone, so refusals are still tested as they are.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: runner id → runnerToken of every registration made through this client.
        self.tokens: dict[str, str] = {}

    def open(self, *args: Any, **kwargs: Any) -> TestResponse:
        path = args[0] if args and isinstance(args[0], str) else ""
        method = str(kwargs.get("method", "GET")).upper()
        headers = dict(kwargs.get("headers") or {})
        if path and "Authorization" not in headers:
            runner = self._runner_for(method, path.split("?", 1)[0], kwargs.get("json"))
            if runner in self.tokens:
                headers["Authorization"] = f"Bearer {self.tokens[runner]}"
                kwargs["headers"] = headers
        response: TestResponse = super().open(*args, **kwargs)
        if path == "/runners/register" and response.status_code == 201:
            body = response.get_json()
            self.tokens[body["runnerId"]] = body["runnerToken"]
        return response

    def _runner_for(self, method: str, path: str, body: Any) -> str | None:
        parts = path.strip("/").split("/")
        given = body.get("runnerId") if isinstance(body, dict) else None
        if method == "POST" and path == "/runners/heartbeat":
            return given if isinstance(given, str) else None
        if method == "DELETE" and len(parts) == 2 and parts[0] == "runners":
            return parts[1]
        if method == "POST" and len(parts) == 3 and parts[0] == "jobs":
            if parts[2] == "result":
                return given if isinstance(given, str) else None
            if parts[2] == "events":
                forge: Forge = self.application.extensions["forge"]
                with forge.db.connection() as conn:
                    row = conn.execute(
                        "SELECT runner_id FROM jobs WHERE id = ?", (parts[1],)
                    ).fetchone()
                return None if row is None else row[0]
        return None


def forge_app(config: Mapping[str, Any]) -> Flask:
    """``create_app(config)`` whose test client is a :class:`RunnerClient`."""
    app = create_app(config)
    app.test_client_class = RunnerClient
    return app


class ForgeHTTP:
    """The forge's job API over real HTTP at ``url``, every answer checked (a base class)."""

    url: str
    session: requests.Session

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", 10)
        return self.session.get(self.url + path, **kwargs)

    def post(self, path: str, body: Any = None, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", 10)
        return self.session.post(self.url + path, json=body, **kwargs)

    def submit(self, request: Mapping[str, Any]) -> dict[str, Any]:
        response = self.post("/jobs", request)
        assert response.status_code == 202, response.text
        return valid("JobResponse", response.json())

    def job(self, job_id: str) -> dict[str, Any]:
        response = self.get(f"/jobs/{job_id}")
        assert response.status_code == 200, response.text
        return valid("JobResponse", response.json())

    def events(self, job_id: str) -> list[dict[str, Any]]:
        response = self.get(f"/jobs/{job_id}/events", params={"limit": 500})
        assert response.status_code == 200, response.text
        items: list[dict[str, Any]] = valid_page("JobEvent", response.json())["items"]
        return items

    def wait_status(self, job_id: str, *statuses: str, timeout: float = 10.0) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            job = self.job(job_id)
            return job if job["status"] in statuses else None

        job: dict[str, Any] = wait_for(reached, timeout, what=f"job {job_id} in {statuses}")
        return job


class ForgeServer(ForgeHTTP):
    """``create_app(config)`` served over real HTTP on 127.0.0.1 (a thread per request)."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.app = forge_app(config)
        self.forge: Forge = get_forge(self.app)
        self._server = make_server("127.0.0.1", 0, self.app, threaded=True)
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        self.session = requests.Session()
        self._stopped = False

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self.forge.close(timeout=5)
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
        self.session.close()


# --------------------------------------------------------------------------- fake runners


@dataclass
class Reply:
    """How a fake runner answers one /execute call.

    ``body=None`` means a successful RunnerExecutionResponse echoing the payload (bytes are
    sent as they are, as text/html). ``delay``
    seconds pass (or ``hold`` is set) before answering. ``async_result``: answer 202, then
    POST this RunnerExecutionResponse (``None``: a success) to the forge after
    ``async_delay`` seconds.
    """

    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    hold: threading.Event | None = None
    async_result: bool = False
    async_body: Any = None
    async_delay: float = 0.1


@dataclass
class Call:
    """One /execute call a fake runner received."""

    time: float
    body: dict[str, Any]
    headers: dict[str, str]
    index: int
    raw: bytes = b""


Script = Callable[["FakeRunner", Call], Reply]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    fake: FakeRunner


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.0"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._send(200, {"status": "healthy"})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        if self.path != "/execute":
            self._send(404, {"error": "no route"})
            return
        headers = {k.lower(): v for k, v in self.headers.items()}
        status, body, answer_headers = self.server.fake._execute(raw, headers)
        self._send(status, body, answer_headers)

    def _send(self, status: int, body: Any, headers: Mapping[str, str] | None = None) -> None:
        raw = isinstance(body, bytes)  # sent as it is, as an HTML page (a proxy's, say)
        data = b"" if body is None else body if raw else json.dumps(body).encode()
        self.send_response(status)
        if body is not None:
            self.send_header("Content-Type", "text/html" if raw else "application/json")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class _KeepAliveHandler(_Handler):
    """HTTP/1.1 with keep-alive; the fake's ``drop_reused`` closes each connection around
    its second request, as a runner's idle timeout or a dying worker would:

    - ``"idle"``: at once after the first answer (the client may still send on it);
    - ``"unread"``: as the second request arrives, unread (so the peer is reset);
    - ``"read"``: after reading the second request, unanswered (a worker that died).
    """

    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        self.served = 0
        with self.server.fake._lock:
            self.server.fake.connections += 1

    def handle_one_request(self) -> None:
        fake = self.server.fake
        if self.served and fake.drop_reused == "unread":
            select.select([self.connection], [], [], 10)  # the next request arrives
            self._drop(reset=True)
            return
        super().handle_one_request()
        if self.served == 1 and fake.drop_reused == "idle" and not self.close_connection:
            self._drop(reset=False)

    def do_POST(self) -> None:
        self.served += 1
        if self.served > 1 and self.server.fake.drop_reused == "read":
            length = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(length)
            self._drop(reset=False)
            return
        super().do_POST()

    def _drop(self, *, reset: bool) -> None:
        """Close the connection now, with a FIN or (``reset``) an RST."""
        if reset:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        else:
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
        self.wfile.flush()
        self.rfile.close()
        self.wfile.close()
        self.connection.close()
        self.close_connection = True
        with self.server.fake._lock:
            self.server.fake.dropped += 1


class FakeRunner:
    """A runner over real HTTP whose /execute answers follow ``script``.

    ``keep_alive``: HTTP/1.1 connections kept open between requests; ``drop_reused`` (see
    :class:`_KeepAliveHandler`) closes each connection as its second request arrives.
    """

    def __init__(
        self,
        name: str,
        capabilities: list[dict[str, Any]],
        script: Script | None = None,
        *,
        keep_alive: bool = False,
        drop_reused: str = "",
    ) -> None:
        self.name = name
        self.capabilities = capabilities
        self.script: Script = script or (lambda fake, call: Reply())
        self.runner_id = ""
        self.runner_token = ""
        self.forge_url = ""
        self.forge_token = ""
        self.calls: list[Call] = []
        self.request_errors: list[Any] = []
        self._running: dict[str, int] = {}
        self.max_running: dict[str, int] = {}
        self._lock = threading.Lock()
        self.drop_reused = drop_reused
        self.connections = 0  # connections accepted (counted with keep_alive only)
        self.dropped = 0  # connections closed by drop_reused
        handler = _KeepAliveHandler if keep_alive or drop_reused else _Handler
        self._server = _Server(("127.0.0.1", 0), handler)
        self._server.fake = self
        self.port = self._server.server_address[1]
        self.health_url = f"http://127.0.0.1:{self.port}/health"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        self._beating = threading.Event()
        self._beat_thread: threading.Thread | None = None
        self.threads: list[threading.Thread] = []
        self._holds: list[threading.Event] = []
        self._stopped = False

    # -- talking to the forge -----------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.forge_token}"} if self.forge_token else {}

    def register(self, forge_url: str, token: str = "") -> str:
        self.forge_url, self.forge_token = forge_url, token
        response = requests.post(
            f"{forge_url}/runners/register",
            json=registration(self.name, self.health_url, self.capabilities),
            headers=self._headers(),
            timeout=10,
        )
        assert response.status_code == 201, response.text
        self.runner_id = valid("RunnerRegistrationResponse", response.json())["runnerId"]
        self.runner_token = response.json()["runnerToken"]
        return self.runner_id

    def _runner_headers(self) -> dict[str, str]:
        """Its own credential, for the calls that speak for this runner."""
        return {"Authorization": f"Bearer {self.runner_token}"}

    def heartbeat(self) -> requests.Response:
        return requests.post(
            f"{self.forge_url}/runners/heartbeat",
            json=heartbeat(self.runner_id),
            headers=self._runner_headers(),
            timeout=10,
        )

    def start_heartbeats(self, interval: float) -> None:
        self._beating.set()

        def beat() -> None:
            while self._beating.is_set():
                with contextlib.suppress(requests.RequestException):
                    self.heartbeat()
                time.sleep(interval)

        self._beat_thread = threading.Thread(target=beat, daemon=True)
        self._beat_thread.start()

    def stop_heartbeats(self) -> None:
        self._beating.clear()
        if self._beat_thread is not None:
            self._beat_thread.join(5)

    def post_result(self, body: Mapping[str, Any]) -> requests.Response:
        return requests.post(
            f"{self.forge_url}/jobs/{body['jobId']}/result",
            json=dict(body),
            headers=self._runner_headers(),
            timeout=10,
        )

    # -- answering /execute -------------------------------------------------------------

    def success(self, call: Call, data: Any = None) -> dict[str, Any]:
        return {
            "jobId": call.body["jobId"],
            "success": True,
            "data": {"echo": call.body["payload"]} if data is None else data,
            "executionTimeMs": 1,
            "runnerId": self.runner_id or new_id(),
        }

    def failure(self, call: Call, error: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "jobId": call.body["jobId"],
            "success": False,
            "error": dict(error),
            "executionTimeMs": 1,
            "runnerId": self.runner_id or new_id(),
        }

    def _execute(self, raw: bytes, headers: dict[str, str]) -> tuple[int, Any, dict[str, str]]:
        body = json.loads(raw)
        errors = validate("RunnerExecutionRequest", body)
        if errors:
            self.request_errors.append(errors)
        cap = body.get("capabilityId", "")
        with self._lock:
            call = Call(time.monotonic(), body, headers, len(self.calls), raw)
            self.calls.append(call)
            self._running[cap] = self._running.get(cap, 0) + 1
            self.max_running[cap] = max(self.max_running.get(cap, 0), self._running[cap])
        try:
            reply = self.script(self, call)
            if reply.hold is not None:
                with self._lock:
                    self._holds.append(reply.hold)
                reply.hold.wait(10)
            elif reply.delay:
                time.sleep(reply.delay)
        finally:
            with self._lock:
                self._running[cap] -= 1
        if reply.async_result:
            result = reply.async_body if reply.async_body is not None else self.success(call)

            def deliver() -> None:
                time.sleep(reply.async_delay)
                self.post_result(result)

            thread = threading.Thread(target=deliver, daemon=True)
            thread.start()
            self.threads.append(thread)
            return 202, {"jobId": body["jobId"], "accepted": True}, {}
        answer = self.success(call) if reply.body is None and reply.status < 300 else reply.body
        return reply.status, answer, reply.headers

    def calls_for(self, job_id: str) -> list[Call]:
        with self._lock:
            return [c for c in self.calls if c.body.get("jobId") == job_id]

    def stop(self) -> None:
        """Stop serving (the port refuses connections) and release every held answer."""
        if self._stopped:
            return
        self._stopped = True
        with self._lock:
            holds = list(self._holds)
        for hold in holds:
            hold.set()
        self.stop_heartbeats()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
        for thread in self.threads:
            thread.join(5)


#: The ``make_forge`` and ``make_runner`` fixtures' types.
MakeForge = Callable[..., ForgeServer]
MakeRunner = Callable[..., FakeRunner]
