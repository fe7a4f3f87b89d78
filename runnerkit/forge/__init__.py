"""runnerkit.forge: the reference control plane (JobForge + TruthCore) on one SQLite file.

Serve it with ``gunicorn runnerkit.forge:app`` (any number of workers: exactly one of them
dispatches at a time, see ``dispatcher``) or build an app with :func:`create_app`. Importing
this package has no side effects: ``app`` is created, from the environment, on first access.

Endpoints (every error is ``{"success": false, "error": <ErrorEnvelope>}``; bodies must be
JSON objects: 415 otherwise, 400 for invalid JSON):

- runners: ``POST /runners/register`` → 201 RunnerRegistrationResponse plus ``runnerToken``;
  ``POST /runners/heartbeat`` (Bearer runnerToken) → 200, 404 for an unknown runner;
  ``DELETE /runners/<id>`` (Bearer runnerToken or TOKEN) → 204;
  ``GET /runners[?status=&limit=&offset=]`` → PaginatedResponse of RunnerMetadata;
  ``GET /runners/<id>`` → RunnerMetadata (plus ``contractViolations``, and ``refusal`` while
  its heartbeats are refused); ``GET /violations[?runnerId=|?jobId=]`` → what runners sent
  that broke a contract (see ``referee``);
- jobs: ``POST /jobs`` → 202 JobResponse (same id and body again → 200, different body →
  409); ``GET /jobs/<id>``; ``GET /jobs[?status=a,b&type=&limit=&offset=]`` →
  PaginatedResponse of JobResponse, newest first; ``POST /jobs/<id>/cancel``;
- from runners (Bearer runnerToken of the job's runner): ``POST /jobs/<id>/result``
  (RunnerExecutionResponse of an async job; ``X-Result-Outcome: recorded|duplicate|ignored``),
  ``POST /jobs/<id>/events`` (a ``job.progress`` JobEvent) → 202, and
  ``GET /jobs/<id>/events`` → PaginatedResponse of JobEvent, oldest first (by timestamp);
- TruthCore: ``POST /assert`` → 201 TruthAssertion (200 when already stored),
  ``POST /query`` → TruthQueryResult;
- ``GET /health`` → HealthCheck (checks ``database`` and ``dispatcher``; 200 or 503);
  ``GET /metrics`` → Prometheus metrics (see ``metrics``); ``GET /openapi.json`` → OpenAPI
  3.1 of these routes; ``GET /`` → the dashboard, ``GET /jobs/<id>/view`` → a job's page,
  ``GET|POST /login`` and ``POST /logout`` → the dashboard's session (with a TOKEN).

Settings (``RUNNERKIT_FORGE_<NAME>``, defaults in :mod:`runnerkit.forge.settings`): DB_PATH,
DB_URL, DB_POOL_SIZE, TOKEN, RUNNER_TOKEN, SIGNING_SECRET, TRUST_RUNNER_IDS,
ALLOWED_RUNNER_NETWORKS, HEARTBEAT_INTERVAL_MS, OFFLINE_AFTER_MISSED, ASYNC_THRESHOLD_MS,
DISPATCH_MARGIN_MS, CONNECT_TIMEOUT_MS, DISPATCH_THREADS, POLL_INTERVAL_MS, DISPATCHER,
DISPATCHER_STALE_MS, SERVICE_NAME, MAX_PAGE_SIZE, RETRY_AFTER_CAP_S, MAX_BODY_BYTES,
MAX_ANSWER_BYTES, HISTORY_RETENTION_HOURS, ASSERTION_RETENTION_HOURS, UNMATCHED_JOB_EXPIRY_S,
STRICT.

Who may call (``trust``): with TOKEN set, every route but ``/health`` needs it (a bearer
header, or the dashboard's session cookie from ``POST /login``); without one, only loopback
peers are served. Heartbeats, deregistration, results and events need the runner's own
``runnerToken`` (given at registration). State-changing requests from another site are
refused.

Modules: ``settings`` (every knob and its default), ``db`` (schema and queries), ``runners``
(registration, heartbeats), ``jobs`` (the job state machine, retries, events), ``truth``
(assertions and queries), ``dispatcher`` (matching jobs to runners, sending them), ``api``
(the Flask routes, health and the dashboard), ``metrics`` (``/metrics``, across workers),
``trust`` (who may call what), ``targets`` (the addresses runners may have), ``referee``
(what runners send, checked against the contracts) and ``violations`` (what broke them).
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Mapping
from typing import Any

from flask import Flask

from runnerkit.errors import RunnerError
from runnerkit.service.http import register_error_handlers

from . import api, db, metrics, submit_lane, trust
from .db.factory import open_database
from .dispatcher import Dispatcher
from .job_store import JobStore
from .runners import RunnerRegistry
from .settings import PREFIX, SETTINGS, ForgeSettings
from .truth import TruthStore

__all__ = [
    "PREFIX",
    "SETTINGS",
    "Forge",
    "ForgeSettings",
    "create_app",
    "get_forge",
]


class Forge:
    """One forge: its settings, database, registries, truth store and dispatcher."""

    def __init__(self, settings: ForgeSettings) -> None:
        self.settings = settings
        self.instance_id = str(uuid.uuid4())
        self.started = time.monotonic()
        self.db = open_database(settings)
        self.jobs = JobStore(self.db, settings)
        self.runners = RunnerRegistry(self.db, settings)
        self.truth = TruthStore(self.db, max_limit=int(self.settings.max_page_size))
        self.dispatcher = Dispatcher(self.jobs, settings, instance_id=self.instance_id)
        #: Checks what runners send against the contracts (see :mod:`.referee`).
        self.referee = self.dispatcher.referee

    def submit(self, request: Mapping[str, Any]) -> tuple[int, str]:
        """Queue a loaded JobRequest (:meth:`JobStore.submit`) and wake the dispatcher.

        On PostgreSQL, when the dispatcher looks like another instance's, the statement that
        queues the job also NOTIFYs it (:meth:`Dispatcher.remote_channel`): no transaction
        of its own for the wake-up, which is then only the local datagram.
        """
        channel = self.dispatcher.remote_channel()
        status, job = self.jobs.submit(request, notify=channel)
        if status == 202:
            self.dispatcher.wake(everywhere=channel is None)
        return status, job

    def wake_dispatcher(self) -> None:
        """New work or freed capacity: let the dispatching process look now.

        That may be another process (another gunicorn worker, or this one is an API-only
        forge): a datagram on the database's wake-up socket (:mod:`.wakeup`) wakes it; on
        PostgreSQL, where it may be another forge instance, a NOTIFY too.
        """
        self.dispatcher.wake(everywhere=True)

    def health(self) -> dict[str, Any]:
        """The HealthCheck document."""
        return api.health_document(self)

    def close(self, timeout: float = 5.0) -> None:
        """Stop the dispatcher and close this process's database connections."""
        self.dispatcher.stop(timeout)
        self.db.close()


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """A Flask app serving the forge; its dispatcher thread starts unless DISPATCHER is false.

    ``config`` holds forge settings (``RUNNERKIT_FORGE_DB_PATH`` or just ``DB_PATH`` …, see
    :mod:`runnerkit.forge.settings`); other keys go to ``app.config`` unchanged. The
    :class:`Forge` is ``app.extensions["forge"]`` (or :func:`get_forge`).
    """
    config = dict(config or {})
    settings = ForgeSettings.load(config)
    app = Flask(str(settings.service_name), root_path=os.path.dirname(os.path.abspath(__file__)))
    app.config["MAX_CONTENT_LENGTH"] = int(settings.max_body_bytes)
    app.json.sort_keys = False  # type: ignore[attr-defined]
    known = {PREFIX + s.name for s in SETTINGS} | {s.name for s in SETTINGS}
    app.config.update({k: v for k, v in config.items() if k not in known})
    forge = Forge(settings)
    app.extensions["forge"] = forge
    trust.init_app(app)  # who may call what: before every route, /metrics included
    app.register_blueprint(api.blueprint)
    register_error_handlers(app)
    app.register_error_handler(RunnerError, api.handle_runner_error)
    for unreachable in db.UNAVAILABLE:
        app.register_error_handler(unreachable, api.handle_store_unavailable)
    metrics.init_app(app, forge)  # GET /metrics, request counts, dispatch latency
    submit_lane.install(app, forge)  # plain POST /jobs without Flask's machinery, once all is set
    forge.db.ping()  # create the file and schema now, so a bad DB_PATH fails at startup
    if settings.dispatcher:
        forge.dispatcher.start()
    return app


def get_forge(app: Flask) -> Forge:
    """The :class:`Forge` behind an app made by :func:`create_app`."""
    forge: Forge = app.extensions["forge"]
    return forge


_app: Flask | None = None
_app_lock = threading.Lock()


def __getattr__(name: str) -> Any:
    """``runnerkit.forge.app``: the app built from the environment, created on first use."""
    global _app
    if name == "app":
        with _app_lock:
            if _app is None:
                _app = create_app()
            return _app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
