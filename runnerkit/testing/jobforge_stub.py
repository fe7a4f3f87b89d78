"""A stand-in for JobForge's runner endpoints: a real HTTP server on loopback that records calls.

Start it on a port chosen in advance (``free_port()``) to have JobForge "down at start, up
later", stop it to make it go away, restart it on the same port with its memory wiped to
simulate a JobForge that lost its runner registry.

Routes:

- ``POST /runners/register`` → 201 ``{runnerId, registeredAt, heartbeatIntervalMs}`` (a new
  uuid4 each time), or ``fail_register_with`` as an ErrorEnvelope answer;
- ``POST /runners/heartbeat`` → 200 ``{"ok": true}`` for a registered ``runnerId``, 404 with an
  ErrorEnvelope otherwise (or ``fail_heartbeat_with``);
- ``DELETE /runners/<id>`` → 204, and the id is forgotten;
- ``POST /jobs/<id>/result`` → 200 ``{"ok": true}``;
- ``POST /jobs/<id>/events`` (a runner's ``job.progress``) → 202 ``{"ok": true}``;
- anything else → 404 with an ErrorEnvelope.

Error answers have the body ``{"success": false, "error": <ErrorEnvelope>}``, like runnerkit's.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, TypeVar

from requests.structures import CaseInsensitiveDict

from runnerkit.contracts import utc_now
from runnerkit.errors import STATUS_BY_CATEGORY, make_envelope

SERVICE = "jobforge-stub"

T = TypeVar("T")

_CATEGORY_BY_STATUS: dict[int, str] = {
    **{status: category for category, status in reversed(STATUS_BY_CATEGORY.items())},
    400: "VALIDATION_ERROR",
    404: "RESOURCE_NOT_FOUND",
    500: "INTERNAL_ERROR",
    503: "SERVICE_UNAVAILABLE",
}


@dataclass(frozen=True)
class Recorded:
    """One request the stub received, and what it answered."""

    method: str
    path: str
    headers: Mapping[str, str]  # case-insensitive
    body: Any
    raw: bytes
    time: float  # time.monotonic() when it arrived
    status: int = 0
    response: Any = None

    def __getitem__(self, key: str) -> Any:
        """A field of the JSON body: ``stub.registrations()[0]["name"]``."""
        if not isinstance(self.body, Mapping):
            raise KeyError(key)
        return self.body[key]

    def get(self, key: str, default: Any = None) -> Any:
        """A field of the JSON body, or ``default`` (also when the body is not an object)."""
        return self.body.get(key, default) if isinstance(self.body, Mapping) else default


class _Server(ThreadingHTTPServer):
    allow_reuse_address = True
    daemon_threads = True
    stub: JobForgeStub


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.0"  # one request per connection: nothing lingers after stop()

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.server.stub._handle(self)

    do_POST = do_PUT = do_PATCH = do_DELETE = do_GET


class JobForgeStub:
    """JobForge's runner API on ``host:port``, recording every request (thread-safe).

    ``heartbeat_interval_ms`` goes into registration answers; ``fail_register_with`` /
    ``fail_heartbeat_with`` (an HTTP status, or ``None``) make those calls fail with an
    ErrorEnvelope of the matching category (503 → retryable SERVICE_UNAVAILABLE, 400 →
    VALIDATION_ERROR …); ``response_delay_s`` delays every answer. All can be changed while
    the stub runs.
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        host: str = "127.0.0.1",
        heartbeat_interval_ms: float = 1000,
        fail_register_with: int | None = None,
        fail_heartbeat_with: int | None = None,
        response_delay_s: float = 0.0,
    ) -> None:
        self.host = host
        self.port = port or 0
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.fail_register_with = fail_register_with
        self.fail_heartbeat_with = fail_heartbeat_with
        self.response_delay_s = response_delay_s
        self._lock = threading.Lock()
        self._calls: list[Recorded] = []
        self._runners: dict[str, dict[str, Any]] = {}
        self._results: dict[str, Any] = {}
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------------------

    @property
    def url(self) -> str:
        """Base URL (valid before start() when a port was given)."""
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> JobForgeStub:
        """Listen (on the given port, else a free one) and serve in a background thread."""
        if self._server is not None:
            raise RuntimeError("the stub is already running")
        server = _Server((self.host, self.port), _Handler)
        server.stub = self
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"jobforge-stub-{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the listening socket (the port is free again)."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)

    def restart(self, forget: bool = True) -> None:
        """Stop and start again on the same port; ``forget`` wipes JobForge's memory.

        The memory is the registered runners and received results; the request log is kept
        (use :meth:`clear` for that).
        """
        self.stop()
        if forget:
            with self._lock:
                self._runners.clear()
                self._results.clear()
        self.start()

    def share_database(self, other: JobForgeStub) -> JobForgeStub:
        """Keep runners and results in ``other``'s memory from now on, as forges sharing one
        database do: a runner registered with either is known to both (for failover tests).
        The request logs stay each stub's own."""
        self._lock = other._lock
        self._runners = other._runners
        self._results = other._results
        return self

    def __enter__(self) -> JobForgeStub:
        if self._server is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- what happened ------------------------------------------------------------------

    def calls(
        self, method: str | None = None, path: str | None = None, since: float | None = None
    ) -> list[Recorded]:
        """Recorded requests, oldest first; ``path`` is a prefix, ``since`` a monotonic time."""
        with self._lock:
            calls = list(self._calls)
        return [
            c
            for c in calls
            if (method is None or c.method == method.upper())
            and (path is None or c.path.startswith(path))
            and (since is None or c.time >= since)
        ]

    def registrations(self) -> list[Recorded]:
        """Every ``POST /runners/register``, whatever it was answered."""
        return self.calls("POST", "/runners/register")

    def heartbeats(self) -> list[Recorded]:
        """Every ``POST /runners/heartbeat``, whatever it was answered."""
        return self.calls("POST", "/runners/heartbeat")

    def deletes(self) -> list[Recorded]:
        """Every ``DELETE /runners/<id>``."""
        return self.calls("DELETE", "/runners/")

    def results(self) -> list[Recorded]:
        """Every ``POST /jobs/<id>/result``."""
        return [c for c in self.calls("POST", "/jobs/") if c.path.endswith("/result")]

    @property
    def runner_ids(self) -> list[str]:
        """Runner ids registered and not deleted (since the last forgetting restart)."""
        with self._lock:
            return list(self._runners)

    def clear(self) -> None:
        """Forget the request log."""
        with self._lock:
            self._calls.clear()

    def wait_for(
        self, predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.05
    ) -> T:
        """Poll ``predicate()`` until it is truthy and return its value.

        Raises AssertionError, listing the requests received, after ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() >= deadline:
                seen = "\n".join(f"  {c.method} {c.path} -> {c.status}" for c in self.calls())
                raise AssertionError(
                    f"condition not met within {timeout}s; the JobForge stub saw:\n"
                    f"{seen or '  nothing'}"
                )
            time.sleep(interval)

    # -- serving ------------------------------------------------------------------------

    def _handle(self, handler: _Handler) -> None:
        arrived = time.monotonic()
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length) if length > 0 else b""
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = None
        path = handler.path.split("?", 1)[0]
        if self.response_delay_s:
            time.sleep(self.response_delay_s)
        status, response = self._route(handler.command, path, body)
        with self._lock:
            self._calls.append(
                Recorded(
                    method=handler.command,
                    path=path,
                    headers=CaseInsensitiveDict(handler.headers.items()),
                    body=body,
                    raw=raw,
                    time=arrived,
                    status=status,
                    response=response,
                )
            )
        payload = b"" if response is None else json.dumps(response).encode("utf-8")
        try:
            handler.send_response(status)
            if response is not None:
                handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(payload)))
            handler.end_headers()
            handler.wfile.write(payload)
        except OSError:  # the client gave up; nothing to answer
            pass

    def _route(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        parts = [p for p in path.split("/") if p]
        operation = f"{method} {path}"
        if method == "POST" and parts == ["runners", "register"]:
            if self.fail_register_with is not None:
                return self._error(self.fail_register_with, "registration refused", operation)
            runner_id = str(uuid.uuid4())
            with self._lock:
                self._runners[runner_id] = body if isinstance(body, dict) else {}
            return 201, {
                "runnerId": runner_id,
                "registeredAt": utc_now(),
                "heartbeatIntervalMs": self.heartbeat_interval_ms,
            }
        if method == "POST" and parts == ["runners", "heartbeat"]:
            if self.fail_heartbeat_with is not None:
                return self._error(self.fail_heartbeat_with, "heartbeat refused", operation)
            sender = body.get("runnerId") if isinstance(body, dict) else None
            with self._lock:
                known = sender in self._runners
            if not known:
                return self._error(
                    404, f"Unknown runner {sender!r}", operation, code="RUNNER_NOT_FOUND"
                )
            return 200, {"ok": True}
        if method == "DELETE" and len(parts) == 2 and parts[0] == "runners":
            with self._lock:
                self._runners.pop(parts[1], None)
            return 204, None
        if method == "POST" and len(parts) == 3 and parts[0] == "jobs" and parts[2] == "result":
            with self._lock:
                self._results[parts[1]] = body
            return 200, {"ok": True}
        if method == "POST" and len(parts) == 3 and parts[0] == "jobs" and parts[2] == "events":
            return 202, {"ok": True}
        return self._error(404, f"No route {operation}", operation, code="ROUTE_NOT_FOUND")

    def _error(
        self, status: int, message: str, operation: str, code: str | None = None
    ) -> tuple[int, Any]:
        category = _CATEGORY_BY_STATUS.get(status, "INTERNAL_ERROR")
        envelope = make_envelope(
            category,
            code or category,
            message,
            service=SERVICE,
            retryable=category in ("SERVICE_UNAVAILABLE", "RATE_LIMITED", "TIMEOUT"),
            operation=operation,
        )
        return status, {"success": False, "error": envelope}
