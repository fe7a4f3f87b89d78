"""Fixtures for the end-to-end tests: a real forge and real runners, each under gunicorn.

A :class:`Stack` is one forge (``runnerkit.forge:app`` on a SQLite file in a temporary folder,
or on a PostgreSQL schema of its own: every test here runs on both, ``e2e_backend``)
plus runner instances serving ``tests/e2e/apps/e2e_app.py`` (2 workers each, the product's
``deploy/gunicorn.conf.py``), every one on its own loopback port and state directory, all
reporting to that forge. Everything is observed over HTTP, from the forge's answers (each
checked against the wire contracts) and from the capabilities' own execution log.

Every wait is bounded; every process a stack started (forge, runners, the runners' sentinels)
is stopped when its fixture ends, pass or fail, and a failing test's report gets the end of
each of its servers' logs.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import sqlite3
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psutil
import pytest
import requests
from marshmallow import Schema, ValidationError

from runnerkit.contracts import (
    ErrorEnvelopeSchema,
    JobEventSchema,
    JobResponseSchema,
    RunnerMetadataSchema,
    paginated_schema,
    utc_now,
)
from tests.support import GunicornProcess, free_port
from tests.support.postgres import TestDatabase
from tests.support.waiting import wait_until

T = TypeVar("T")

RUNNER_APP = "tests.e2e.apps.e2e_app:app"
GUNICORN_CONF = "deploy/gunicorn.conf.py"
#: Heartbeat interval the forge hands out; a runner is offline after 3 of them are missed.
HEARTBEAT_MS = 1000
OFFLINE_AFTER_MISSED = 3
#: Jobs with timeoutMs above this are dispatched with ``Prefer: respond-async``.
ASYNC_THRESHOLD_MS = 5000
#: timeoutMs of a job dispatched synchronously / asynchronously.
SYNC_TIMEOUT_MS = 5000
ASYNC_TIMEOUT_MS = 15000
FINAL = ("completed", "failed", "cancelled")
#: (connect, read) timeout of every request a test makes.
QUICK = (2.0, 10.0)
#: Longest wait for a server to listen / be ready / register (a loaded machine is slow).
START_TIMEOUT = 60.0

#: Environment a forge or runner must not inherit from whoever runs the tests.
CLEAN_ENV: dict[str, str | None] = {
    "JOBFORGE_URL": None,
    "TRUTHCORE_URL": None,
    "RUNNER_TOKEN": None,
    "RUNNERKIT_TRUTHCORE_URL": None,
    "RUNNERKIT_RUNNER_TOKEN": None,
    "RUNNERKIT_SIGNING_SECRET": None,
    "RUNNERKIT_FORGE_TOKEN": None,
    "RUNNERKIT_FORGE_RUNNER_TOKEN": None,
    "RUNNERKIT_FORGE_SIGNING_SECRET": None,
    "WEB_CONCURRENCY": None,
}

_SCHEMAS: dict[type[Schema], Schema] = {}


# --------------------------------------------------------------------------- helpers


def check(schema: type[Schema], body: Any, what: str = "") -> dict[str, Any]:
    """``body`` loaded with a contract schema; AssertionError naming the violations."""
    instance = _SCHEMAS.setdefault(schema, schema())
    try:
        instance.load(body)
    except ValidationError as exc:
        raise AssertionError(
            f"{what or 'body'} is not a valid {schema.__name__}: {exc.messages}\n"
            f"{json.dumps(body)[:2000]}"
        ) from None
    assert isinstance(body, dict)
    return body


def job_request(
    job_type: str,
    data: Mapping[str, Any] | None = None,
    *,
    priority: int = 50,
    timeout_ms: int = SYNC_TIMEOUT_MS,
    retry_policy: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A contract-valid JobRequest with a fresh id."""
    body: dict[str, Any] = {
        "id": str(uuid.uuid4()),
        "type": job_type,
        "priority": priority,
        "payload": {"type": job_type, "version": "1.0.0", "data": dict(data or {})},
        "metadata": {"source": "e2e-tests", "createdAt": utc_now()},
        "timeoutMs": timeout_ms,
    }
    if retry_policy is not None:
        body["retryPolicy"] = dict(retry_policy)
    return body


def overlap(intervals: Iterable[tuple[float, float]]) -> int:
    """The most intervals ``[start, end)`` open at one instant."""
    points = sorted((t, d) for s, e in intervals for t, d in ((s, 1), (e, -1)))
    current = peak = 0
    for _, delta in points:  # at equal times -1 sorts first: touching is not overlapping
        current += delta
        peak = max(peak, current)
    return peak


def _sentinels(state_dir: Path) -> list[psutil.Process]:
    """The sentinel processes watching the runner instance of ``state_dir``."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info.get("cmdline") or []
        if "runnerkit.runner.sentinel" in cmdline and str(state_dir) in cmdline:
            found.append(proc)
    return found


def _reap_sentinels(state_dir: Path, timeout: float = 8.0) -> None:
    """Wait for the runner's sentinel (its own session) to exit; SIGKILL it if it lingers."""
    _, alive = psutil.wait_procs(_sentinels(state_dir), timeout=timeout)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()  # psutil checks the pid still names the same process
    psutil.wait_procs(alive, timeout=5)


# --------------------------------------------------------------------------- the stack


@dataclass
class RunnerInstance:
    """One runner instance: its gunicorn, label, capabilities and state directory."""

    label: str
    caps: tuple[str, ...]
    proc: GunicornProcess
    state_dir: Path

    @property
    def url(self) -> str:
        return self.proc.url

    @property
    def health_url(self) -> str:
        return f"{self.proc.url}/health"

    def outbox_rows(self, kind: str | None = None) -> list[dict[str, Any]]:
        """Undelivered (not dead) rows of the runner's durable outbox (read-only look)."""
        path = self.state_dir / "ledger.sqlite3"
        if not path.exists():
            return []
        uri = f"file:{path}?mode=ro"
        with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=5.0)) as conn:
            conn.row_factory = sqlite3.Row
            try:
                rows = conn.execute("SELECT * FROM outbox WHERE dead = 0").fetchall()
            except sqlite3.OperationalError:  # no outbox table yet
                return []
        return [dict(r) for r in rows if kind is None or r["kind"] == kind]


@dataclass
class Stack:
    """A forge and its runners (see the module docstring)."""

    root: Path
    forge_workers: int = 1
    #: The forge's RUNNERKIT_FORGE_DB_URL: empty for its SQLite file, else a PostgreSQL schema.
    db_url: str = ""
    forge_port: int = field(default_factory=free_port)
    runners: dict[str, RunnerInstance] = field(default_factory=dict)
    processes: list[GunicornProcess] = field(default_factory=list)
    forge: GunicornProcess | None = None

    @property
    def exec_log(self) -> Path:
        return self.root / "executions.jsonl"

    @property
    def db_path(self) -> Path:
        return self.root / "forge" / "forge.sqlite3"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.forge_port}"

    # -- processes ------------------------------------------------------------------------

    def _launch(
        self, make: Callable[[int], GunicornProcess], port: int, *, movable: bool
    ) -> GunicornProcess:
        """Start ``make(port)`` and wait until its master listens.

        ``free_port`` only says a port was free a moment ago; when another process took it
        meanwhile gunicorn cannot bind, and if ``movable`` a new port is tried.
        """
        for _ in range(3):
            proc = make(port)
            self.processes.append(proc)
            proc.start()
            outcome = wait_until(
                functools.partial(self._bind_outcome, proc),
                START_TIMEOUT,
                f"gunicorn on port {port} never listened (log: {proc.log_path})",
                interval=0.1,
            )
            if outcome == "listening":
                return proc
            proc.stop(timeout=5)
            if not movable:
                break
            port = free_port()
        raise RuntimeError(f"gunicorn could not bind a port\n{proc.log_tail()}")

    @staticmethod
    def _bind_outcome(proc: GunicornProcess) -> str:
        log = proc.log_text()
        if f"Listening at: {proc.url}" in log:
            return "listening"
        if "Connection in use" in log or proc.returncode is not None:
            return "taken" if "in use" in log else "exited"
        return ""

    def start_forge(self) -> GunicornProcess:
        """Start the forge (again: same port, same database) and wait until it is healthy."""
        env: dict[str, str | None] = dict(CLEAN_ENV)
        env.update(
            {
                "RUNNERKIT_FORGE_DB_PATH": str(self.db_path),
                "RUNNERKIT_FORGE_DB_URL": self.db_url,
                "RUNNERKIT_FORGE_HEARTBEAT_INTERVAL_MS": str(HEARTBEAT_MS),
                "RUNNERKIT_FORGE_OFFLINE_AFTER_MISSED": str(OFFLINE_AFTER_MISSED),
                "RUNNERKIT_FORGE_ASYNC_THRESHOLD_MS": str(ASYNC_THRESHOLD_MS),
                "RUNNERKIT_FORGE_POLL_INTERVAL_MS": "50",
                "RUNNERKIT_FORGE_CONNECT_TIMEOUT_MS": "1000",
                "RUNNERKIT_FORGE_DISPATCH_THREADS": "16",
            }
        )
        starts = len([p for p in self.processes if "forge" in p.app_spec])

        def make(port: int) -> GunicornProcess:
            return GunicornProcess(
                "runnerkit.forge:app",
                log_dir=self.root / "logs",
                workers=self.forge_workers,
                port=port,
                env=env,
                extra_args=[
                    *("--worker-class", "gthread", "--threads", "8"),
                    *("--graceful-timeout", "5"),
                ],
                name=f"forge{starts}-{len(self.processes)}",
            )

        # A restart must keep the port the runners know; a first start may move.
        proc = self._launch(make, self.forge_port, movable=self.forge is None)
        self.forge, self.forge_port = proc, proc.port
        proc.wait_ready("/health", timeout=START_TIMEOUT)
        return proc

    def start_runner(self, label: str, caps: Iterable[str], *, wait: bool = True) -> RunnerInstance:
        """Start a runner instance with these capabilities; by default wait until registered."""
        caps = tuple(caps)
        state_dir = self.root / f"runner-{label}"

        def make(port: int) -> GunicornProcess:
            env: dict[str, str | None] = dict(CLEAN_ENV)
            env.update(
                {
                    "E2E_LABEL": label,
                    "E2E_CAPS": ",".join(caps),
                    "E2E_EXEC_LOG": str(self.exec_log),
                    "RUNNERKIT_JOBFORGE_URL": self.url,
                    "RUNNERKIT_STATE_DIR": str(state_dir),
                    "RUNNERKIT_PORT": str(port),
                    "RUNNERKIT_HEARTBEAT_INTERVAL_MS": str(HEARTBEAT_MS),
                    "RUNNERKIT_REGISTRATION_BACKOFF_MAX_MS": "1000",
                    "RUNNERKIT_HTTP_READ_TIMEOUT_MS": "3000",
                    "GUNICORN_GRACEFUL_TIMEOUT": "5",
                    "GUNICORN_THREADS": "6",
                }
            )
            return GunicornProcess(
                RUNNER_APP,
                log_dir=self.root / "logs",
                workers=2,
                port=port,
                config=GUNICORN_CONF,
                env=env,
                name=f"runner-{label}-{len(self.processes)}",
            )

        proc = self._launch(make, free_port(), movable=True)
        instance = RunnerInstance(label, caps, proc, state_dir)
        self.runners[label] = instance
        if wait:
            self.wait_registered(instance)
        return instance

    def wait_registered(self, instance: RunnerInstance, timeout: float = START_TIMEOUT) -> str:
        """Wait until the runner is ready and the forge lists it healthy; its runnerId."""
        instance.proc.wait_ready("/health/ready", timeout=timeout)
        runner_id = wait_until(
            lambda: self.runner_ids(status="healthy").get(instance.label),
            timeout,
            lambda: f"the forge does not list runner {instance.label}\n{self.logs()}",
            interval=0.1,
        )
        return str(runner_id)

    def kill_runner(self, label: str) -> None:
        """SIGKILL the runner's whole gunicorn tree (master, workers, sentinel) at once.

        The sentinel runs in its own session and outlives the worker that started it, so it
        is not always below the master: it is found by its command line, once the tree is
        frozen (a worker still starting could otherwise start one after the search), and
        killed with the tree.
        """
        instance = self.runners[label]
        # Listed once the tree is frozen: a worker still starting cannot spawn another.
        instance.proc.kill(also=lambda: _sentinels(instance.state_dir))

    def stop(self) -> None:
        """Stop the runners first (they deregister from a forge still up), then the forge."""
        for proc in reversed(self.processes):
            if "forge" not in proc.app_spec:
                proc.stop(timeout=10)
        for instance in self.runners.values():
            _reap_sentinels(instance.state_dir)
        for proc in reversed(self.processes):
            if "forge" in proc.app_spec:
                proc.stop(timeout=10)

    def logs(self, chars: int = 3000) -> str:
        return "\n".join(p.log_tail(chars) for p in self.processes)

    # -- the forge's API ------------------------------------------------------------------

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", QUICK)
        return requests.get(self.url + path, **kwargs)

    def post(self, path: str, body: Any = None, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", QUICK)
        return requests.post(self.url + path, json=body, **kwargs)

    def submit(self, job: Mapping[str, Any]) -> dict[str, Any]:
        """POST /jobs: must answer 202 with a valid JobResponse for this job, queued."""
        response = self.post("/jobs", job)
        assert response.status_code == 202, f"{response.status_code} {response.text[:1000]}"
        body = check(JobResponseSchema, response.json(), "POST /jobs answer")
        assert body["id"] == job["id"] and body["status"] == "queued", body
        return body

    def job(self, job_id: str) -> dict[str, Any]:
        """GET /jobs/{id}, checked against JobResponse."""
        response = self.get(f"/jobs/{job_id}")
        assert response.status_code == 200, f"{response.status_code} {response.text[:1000]}"
        return check(JobResponseSchema, response.json(), f"GET /jobs/{job_id}")

    def events(self, job_id: str) -> list[dict[str, Any]]:
        """GET /jobs/{id}/events (oldest first), every event checked against JobEvent."""
        response = self.get(f"/jobs/{job_id}/events", params={"limit": 500})
        assert response.status_code == 200, f"{response.status_code} {response.text[:1000]}"
        page = check(paginated_schema(JobEventSchema), response.json(), "events page")
        assert not page["hasMore"], page
        for event in page["items"]:
            check(JobEventSchema, event, "JobEvent")
            assert event["jobId"] == job_id, event
        return list(page["items"])

    def cancel(self, job_id: str) -> dict[str, Any]:
        response = self.post(f"/jobs/{job_id}/cancel")
        assert response.status_code == 200, f"{response.status_code} {response.text[:1000]}"
        return check(JobResponseSchema, response.json(), "cancel answer")

    def runners_page(self) -> list[dict[str, Any]]:
        """GET /runners, checked against a PaginatedResponse of RunnerMetadata."""
        response = self.get("/runners", params={"limit": 100})
        assert response.status_code == 200, f"{response.status_code} {response.text[:1000]}"
        page = check(paginated_schema(RunnerMetadataSchema), response.json(), "runners page")
        return list(page["items"])

    def runner_ids(self, status: str | None = None) -> dict[str, str]:
        """label → runnerId of the runners the forge lists (by their health URL)."""
        by_url = {r.health_url: label for label, r in self.runners.items()}
        return {
            by_url[item["healthCheckEndpoint"]]: item["id"]
            for item in self.runners_page()
            if item["healthCheckEndpoint"] in by_url
            and (status is None or item["status"] == status)
        }

    def wait_final(self, job_id: str, timeout: float = 30.0) -> dict[str, Any]:
        """Poll until the job is completed, failed or cancelled; its JobResponse."""
        last: dict[str, Any] = {}

        def done() -> bool:
            last.update(self.job(job_id))
            return last["status"] in FINAL

        wait_until(
            done,
            timeout,
            lambda: f"job {job_id} is still {last.get('status')}: {last}\n{self.logs()}",
            interval=0.1,
        )
        return last

    def wait_status(self, job_id: str, status: str, timeout: float = 15.0) -> dict[str, Any]:
        last: dict[str, Any] = {}

        def reached() -> bool:
            last.update(self.job(job_id))
            return last["status"] == status

        wait_until(
            reached,
            timeout,
            lambda: f"job {job_id} never {status}, last {last.get('status')}\n{self.logs()}",
            interval=0.05,
        )
        return last

    # -- what the capabilities themselves recorded ----------------------------------------

    def executions(self, job_id: str | None = None, event: str | None = None) -> list[dict]:
        """Records of the shared execution log, oldest first."""
        try:
            with open(self.exec_log, encoding="utf-8") as handle:
                fcntl.flock(handle, fcntl.LOCK_SH)  # writers append whole lines under LOCK_EX
                lines = handle.read().splitlines()
        except FileNotFoundError:
            return []
        records = [json.loads(line) for line in lines if line.strip()]
        return [
            r
            for r in records
            if (job_id is None or r["job"] == job_id) and (event is None or r["event"] == event)
        ]

    def wait_execution(self, job_id: str, event: str = "start", timeout: float = 15.0) -> dict:
        found = wait_until(
            lambda: self.executions(job_id, event),
            timeout,
            lambda: f"no {event} record for job {job_id}\n{self.logs()}",
        )
        return found[0]


def error_envelope(response: requests.Response) -> dict[str, Any]:
    """The ``{"success": false, "error": <ErrorEnvelope>}`` body of a forge error answer."""
    body = response.json()
    assert body.get("success") is False, body
    return check(ErrorEnvelopeSchema, body["error"], "error envelope")


# --------------------------------------------------------------------------- fixtures


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Attach the logs of the test's forge and runners to its report when it fails."""
    report = yield
    if report.failed:
        stacks = [v for v in getattr(item, "funcargs", {}).values() if isinstance(v, Stack)]
        stacks += getattr(item, "e2e_stacks", [])
        for stack in {id(s): s for s in stacks}.values():
            for proc in stack.processes:
                report.sections.append((f"log {proc.log_path.name}", proc.log_text()[-5000:]))
    return report


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def e2e_backend(request: pytest.FixtureRequest) -> str:
    """The forge's store for a module's stacks: its SQLite file, or PostgreSQL."""
    backend: str = request.param
    return backend


def _db_url(backend: str, request: pytest.FixtureRequest) -> str:
    """A fresh store for one forge: empty (SQLite) or a new PostgreSQL schema."""
    if backend != "postgres":
        return ""
    database: TestDatabase = request.getfixturevalue("pg_database")
    return database.new_schema()


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, e2e_backend: str, request: pytest.FixtureRequest
) -> Iterator[Stack]:
    """A forge (2 workers) and two runners, shared by a module's tests.

    Runner A offers alpha, work, solo, flaky, strict; runner B offers beta, work, flaky,
    strict. Tests using it must leave no job running.
    """
    db_url = _db_url(e2e_backend, request)
    shared = Stack(tmp_path_factory.mktemp("e2e-stack"), forge_workers=2, db_url=db_url)
    try:
        shared.start_forge()
        shared.start_runner("A", ("alpha", "work", "solo", "flaky", "strict"), wait=False)
        shared.start_runner("B", ("beta", "work", "flaky", "strict"), wait=False)
        for instance in shared.runners.values():
            shared.wait_registered(instance)
        yield shared
    finally:
        shared.stop()


@pytest.fixture
def make_stack(
    request: pytest.FixtureRequest, tmp_path: Path, e2e_backend: str
) -> Iterator[Callable[[], Stack]]:
    """``make_stack() -> Stack``: a fresh forge-less stack to start things in; stopped after."""
    made: list[Stack] = []
    request.node.e2e_stacks = made

    def make() -> Stack:
        fresh = Stack(tmp_path / f"stack{len(made)}", db_url=_db_url(e2e_backend, request))
        made.append(fresh)
        return fresh

    yield make
    for fresh in made:
        fresh.stop()
