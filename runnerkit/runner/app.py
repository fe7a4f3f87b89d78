"""Runner: the capability registry, its settings, and the Flask extension that serves it."""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

from flask import Flask

from runnerkit.contracts import CONTRACT_VERSION, SEMVER_RE, utc_now
from runnerkit.runner.capability import Capability, CapabilityDefinitionError
from runnerkit.runner.config import Settings, default_state_dir, unknown_settings
from runnerkit.runner.deregistration import instance_key
from runnerkit.runner.draining import install_drain_handler
from runnerkit.runner.execution import Executor
from runnerkit.runner.health import CheckFunction, HealthChecks, overall_status
from runnerkit.runner.lifecycle import Lifecycle
from runnerkit.runner.outbox import Outbox
from runnerkit.runner.preload import in_gunicorn_master, start_in_workers
from runnerkit.runner.serving import Serving
from runnerkit.runner.state import InstanceState
from runnerkit.runner.statefiles import secure_directory
from runnerkit.service.gunicorn_settings import gunicorn_config, problems
from runnerkit.service.logs import configure_logging
from runnerkit.service.metrics import prepare_snapshot_dir
from runnerkit.service.process import instance_owner, under_gunicorn
from runnerkit.service.settings import ConfigError
from runnerkit.service.write_failures import STORAGE

EXTENSION_KEY = "runnerkit"
_RUNNER_ID_NAMESPACE = uuid.UUID("6f1c2d1e-5b0a-4f4e-9a53-0c6f2b7d9e11")

F = TypeVar("F", bound=CheckFunction)


def _current_instance() -> str:
    """The running instance's key, asked when the ledger is opened: in a worker, not in a
    gunicorn master that imported the app before forking (``--preload``)."""
    return instance_key(instance_owner())


class Runner:
    """A runner: a name, a version and the capabilities it offers.

    Follows Flask's extension contract: ``Runner(...).init_app(app)`` adds the blueprint
    (with its JSON error handlers) to an existing app, ``create_app()`` makes a new one.
    Settings come from ``app.config``/the environment with the ``RUNNERKIT_`` prefix (see
    :mod:`runnerkit.config`) and, with the instance state, belong to the app served: a
    Runner serves one app, and each further app is served by a copy of it
    (``app.extensions["runnerkit"]``).
    """

    def __init__(
        self,
        name: str,
        version: str = "0.1.0",
        capabilities: Iterable[Capability | type[Capability]] = (),
        tags: Iterable[str] = (),
        app: Flask | None = None,
    ) -> None:
        if not isinstance(name, str) or not name.strip():
            raise CapabilityDefinitionError("Runner.name: is required (a non-empty string)")
        if not isinstance(version, str) or not SEMVER_RE.fullmatch(version):
            raise CapabilityDefinitionError(
                f"Runner.version: {version!r} is not a semantic version like '1.0.0'"
            )
        self.name = name
        self.version = version
        self.tags = [str(t) for t in tags]
        self.capabilities: dict[str, Capability] = {}
        for item in capabilities:
            self.add(item)
        self.health_checks = HealthChecks()
        #: Readiness conditions added with :meth:`add_readiness_check` (every app's).
        self._readiness_checks: list[Callable[[], dict[str, Any]]] = []
        self._start_serving_state()
        if app is not None:
            self.init_app(app)

    def _start_serving_state(self) -> None:
        """What belongs to the one app this Runner serves: its settings, its instance state,
        its schedule, its executor. A second app gets a copy of the Runner with its own."""
        #: The Flask app this Runner serves (None until ``init_app``).
        self.app: Flask | None = None
        #: Where the blueprint is mounted in :attr:`app` (``""``: at the root).
        self.url_prefix = ""
        self.settings: Settings = Settings.load()
        #: What the executor and the lifecycle read live (settings, draining, the outbox);
        #: :attr:`settings` is replaced together with ``serving.settings``.
        self.serving = Serving(self.settings)
        self.started_at = time.time()
        self._runner_id_override: str | None = None
        self._fallback_id: tuple[str, str] | None = None
        self._readiness: list[Callable[[], dict[str, Any]]] = [self._accepting, self._storage]
        self._state: InstanceState | None = None
        self.lifecycle: Lifecycle | None = None
        #: Signing is off and nobody has been told yet (see :meth:`warn_unsigned`).
        self.unsigned_warning_due = False
        self.executor = Executor(
            serving=self.serving,
            state=self._instance_state,
            capabilities=self.capabilities,
            name=self.name,
            version=self.version,
            runner_id=self._current_runner_id,
            app_context=self.app_context,
        )

    @property
    def outbox(self) -> Outbox | None:
        """Durable delivery of async results, progress and assertions (with JobForge only)."""
        return self.serving.outbox

    @outbox.setter
    def outbox(self, value: Outbox | None) -> None:
        self.serving.outbox = value

    @property
    def draining(self) -> bool:
        """True once the instance is shutting down: ready turns 503, new jobs get 503."""
        return self.serving.draining

    @draining.setter
    def draining(self, value: bool) -> None:
        self.serving.draining = value

    @property
    def drain_deadline(self) -> float:
        """When (time.monotonic()) a drain must be done: the graceful timeout less a margin."""
        return self.serving.drain_deadline

    @drain_deadline.setter
    def drain_deadline(self, value: float) -> None:
        self.serving.drain_deadline = value

    # -- the registry -------------------------------------------------------------------

    def add(self, capability: Capability | type[Capability]) -> Capability:
        """Register one capability (an instance, or a class to instantiate)."""
        if isinstance(capability, type) and issubclass(capability, Capability):
            capability = capability()
        if not isinstance(capability, Capability) or capability.abstract:
            raise CapabilityDefinitionError(
                f"Runner({self.name!r}).capabilities: {capability!r} is not a Capability"
            )
        if capability.id in self.capabilities:
            other = type(self.capabilities[capability.id]).__qualname__
            raise CapabilityDefinitionError(
                f"{type(capability).__qualname__}.id: {capability.id!r} is already used by "
                f"{other} in Runner({self.name!r})"
            )
        self.capabilities[capability.id] = capability
        return capability

    def health_check(self, func: F | None = None, *, name: str | None = None) -> Any:
        """Register a dependency check; use as ``@runner.health_check`` or with ``name=``."""

        def register(f: F) -> F:
            self.health_checks.add(name or f.__name__, f)
            return f

        return register(func) if func is not None else register

    def add_readiness_check(self, check: Callable[[], dict[str, Any]]) -> None:
        """A readiness condition (``/health/ready``): returns one HealthCheck item."""
        self._readiness_checks.append(check)

    # -- documents ----------------------------------------------------------------------

    @property
    def max_timeout_ms(self) -> float:
        """The largest capability timeout; gunicorn's worker timeout must exceed it."""
        return max((c.timeout_ms for c in self.capabilities.values()), default=30_000)

    @property
    def state_dir(self) -> str:
        return self.settings.state_dir or default_state_dir(self.name, self.settings.port)

    @property
    def state(self) -> InstanceState:
        """The instance state shared by every worker (created on first use)."""
        return self._instance_state()

    def _instance_state(self) -> InstanceState:
        """:attr:`state`, as a method: what the executor calls for it on a job's path."""
        if self._state is None:
            limits = {c.id: c.max_concurrency for c in self.capabilities.values()}
            if not self.settings.state_dir:
                # The shared temp dir's runnerkit/ must be ours too, or its owner could
                # swap our state directory for one of their own.
                secure_directory(os.path.dirname(self.state_dir))
            self._state = InstanceState(
                self.state_dir,
                limits,
                self.settings.ledger_retention_s,
                instance=_current_instance,
            )
            self._readiness.append(self._state.readiness_item)
            window = self.settings.signature_max_age_s + self.settings.signature_max_future_s
            self._state.ledger.event_memory_s = max(self._state.ledger.event_memory_s, 2 * window)
        return self._state

    def queued_jobs(self) -> int:
        """Jobs accepted but not started; only asynchronous work can queue."""
        return self.state.ledger.queued()

    @property
    def runner_id(self) -> str:
        """The id in execution responses: JobForge's once assigned, else a stable uuid."""
        return self._current_runner_id()

    @runner_id.setter
    def runner_id(self, value: str | None) -> None:
        self._runner_id_override = value

    def _current_runner_id(self) -> str:
        """:attr:`runner_id`, as a method: what the executor and the lifecycle call for it
        (JobForge's id is read from the instance's identity file, which any worker's
        registration may change)."""
        if self._runner_id_override:
            return self._runner_id_override
        if self.lifecycle is not None:
            identity = self.lifecycle.current_identity()
            if identity is not None:
                return str(identity["runnerId"])
        key = f"{self.name}:{self.settings.host}:{self.settings.port}"
        if self._fallback_id is None or self._fallback_id[0] != key:
            self._fallback_id = (key, str(uuid.uuid5(_RUNNER_ID_NAMESPACE, key)))
        return self._fallback_id[1]

    @property
    def health_check_url(self) -> str:
        s = self.settings
        return s.health_check_url or f"http://{s.host}:{s.port}{self.url_prefix}/health"

    def registration_document(self) -> dict[str, Any]:
        """The RunnerRegistrationRequest this runner sends to JobForge."""
        return {
            "name": self.name,
            "version": self.version,
            "contractVersion": dict(CONTRACT_VERSION),
            "capabilities": [c.manifest() for c in self.capabilities.values()],
            "healthCheckEndpoint": self.health_check_url,
            "tags": list(self.tags),
        }

    def health(self) -> tuple[int, dict[str, Any]]:
        """``GET /health``: the HealthCheck document and its HTTP status."""
        checks = self.health_checks.run(self.settings.health_check_timeout_ms)
        if self._state is not None:
            # Listed only when something is wrong: a runner's own checks are the author's.
            state = self._state.readiness_item()
            if state["status"] != "healthy":
                checks.append(state)
        if self.lifecycle is not None:
            # JobForge reached by no URL: degraded (200), as jobs already here still run.
            registration = self.lifecycle.readiness_item()
            if registration["status"] == "degraded":
                checks.append(registration)
        status = overall_status(checks)
        return (503 if status == "unhealthy" else 200), self._health_document(status, checks)

    def readiness(self) -> tuple[int, dict[str, Any]]:
        """``GET /health/ready``: can this instance take work now?"""
        checks = [check() for check in self._readiness]
        checks += [check() for check in self._readiness_checks]
        status = "unhealthy" if any(c["status"] == "unhealthy" for c in checks) else "healthy"
        return (503 if status == "unhealthy" else 200), self._health_document(status, checks)

    def _accepting(self) -> dict[str, Any]:
        item: dict[str, Any] = {"name": "accepting", "status": "healthy", "responseTimeMs": 0}
        if self.draining:
            item.update(status="unhealthy", message="shutting down")
        return item

    def _storage(self) -> dict[str, Any]:
        """Unhealthy while a write of the instance's files keeps failing (a full disk).

        The lifecycle retries its own writes every tick; a runner without JobForge has no
        ticks, so a state directory that could not be made is tried again here.
        """
        item: dict[str, Any] = {"name": "storage", "status": "healthy", "responseTimeMs": 0}
        problems = STORAGE.problems()
        if "the state directory" in problems and self._state is not None:
            self._state.ensure_directory()
            problems = STORAGE.problems()
        if problems:
            failing = "; ".join(f"{what}: {why}" for what, why in sorted(problems.items()))
            item.update(status="unhealthy", message=f"cannot write {failing}")
        return item

    def liveness(self) -> tuple[int, dict[str, Any]]:
        """``GET /health/live``: the process is up and serving."""
        return 200, self._health_document("healthy", [])

    def _health_document(self, status: str, checks: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "service": self.name,
            "status": status,
            "timestamp": utc_now(),
            "version": self.version,
            "uptime": round(time.time() - self.started_at, 3),
            "checks": checks,
        }

    # -- Flask --------------------------------------------------------------------------

    def init_app(self, app: Flask, *, url_prefix: str | None = None) -> Runner:
        """Serve this runner from ``app`` (Flask's extension pattern); returns the Runner
        that serves it, also found as ``app.extensions["runnerkit"]``.

        The settings are read from ``app.config`` (and the environment) and, with the
        instance state, belong to that app: the first app is served by this Runner itself,
        each further one by a copy with settings and state of its own, so two apps (two
        tests) never share a state directory or a secret. The app stays the host's: the
        blueprint's JSON error handlers, body limit (``RUNNERKIT_MAX_BODY_BYTES``) and
        JSON encoding apply to runnerkit's routes only, ``MAX_CONTENT_LENGTH``, ``app.json``
        and the host's own error pages are left alone. ``url_prefix`` mounts the routes
        under a path (``/runner/execute``, ``/runner/health`` …); the health check URL
        sent to JobForge then carries it, and JobForge dispatches to ``<prefix>/execute``.
        """
        runner = self._for_new_app()
        runner._serve(app, url_prefix or "", whole_app=False)
        return runner

    def _for_new_app(self) -> Runner:
        """This Runner if it serves no app yet, else a copy that shares the definition (the
        capabilities, health and readiness checks) but nothing of the app it serves."""
        if self.app is None:
            return self
        runner = copy.copy(self)
        runner._start_serving_state()
        return runner

    def _serve(self, app: Flask, url_prefix: str, whole_app: bool) -> None:
        from runnerkit.runner import execute_lane
        from runnerkit.runner.blueprint import blueprint, register_routing_errors
        from runnerkit.service.http import register_error_handlers, register_request_metrics

        if url_prefix and (not url_prefix.startswith("/") or url_prefix.endswith("/")):
            raise ConfigError(
                f"url_prefix {url_prefix!r}: must start with '/' and not end with one "
                "(like '/runner')"
            )
        self.app = app
        self.url_prefix = url_prefix
        self.settings = self.serving.settings = Settings.load(app.config)
        configure_logging(
            self.name,
            self.version,
            self.settings.log_format,
            self.settings.log_level,
            isolate=under_gunicorn(),
        )
        self._check_signing()
        app.extensions[EXTENSION_KEY] = self
        if whole_app:
            # An app runnerkit made is the runner's alone: every error of it, an unknown
            # route's 404 and an author's own route included, leaves as an ErrorEnvelope.
            register_error_handlers(app)
        else:
            # In a host's app only runnerkit's routes answer with envelopes (the blueprint's
            # own handlers), and an unknown path under its url_prefix or a wrong method on
            # one of its routes: errors Flask raises before any blueprint is chosen.
            register_routing_errors(app)
        register_request_metrics(app)
        app.register_blueprint(blueprint, url_prefix=url_prefix or None)
        execute_lane.install(app, self)  # plain POST <prefix>/execute without Flask's machinery
        if in_gunicorn_master():
            # --preload: this process only forks the workers; each starts its own.
            start_in_workers(lambda: self._start_process(app, preloaded=True))
        else:
            self._start_process(app)

    def _start_process(self, app: Flask, preloaded: bool = False) -> None:
        """What each serving process starts for itself: the state directory, metrics, the
        drain handler, the lifecycle (in a gunicorn worker, never in its master)."""
        if preloaded:
            # Read again in the worker: the port gunicorn bound since, the threads its
            # post_fork hook set.
            self.settings = self.serving.settings = Settings.load(app.config)
        # The state directory is checked (and made) before anything is put in it.
        self.state  # noqa: B018
        prepare_snapshot_dir(os.path.join(self.state_dir, "metrics"), instance_owner())
        if under_gunicorn():
            install_drain_handler(self.serving)
            self._say_how_it_is_configured()
            self.warn_unsigned()
        if self.settings.jobforge_url and self.lifecycle is None:
            self.lifecycle = Lifecycle(
                self.state,
                serving=self.serving,
                name=self.name,
                version=self.version,
                runner_id=self._current_runner_id,
                registration_document=self.registration_document,
                health=self.health,
                deliver_result=self.executor.deliver_result,
            )
            self.outbox = Outbox(
                os.path.join(self.state.directory, "ledger.sqlite3"),
                self.lifecycle.client,
                identity=self.state.ledger.identity,
            )
            self._readiness.append(self.lifecycle.readiness_item)
            self.lifecycle.start()

    def app_context(self) -> Any:
        """A new application context of the app this Runner serves (a no-op without one):
        what a job's code runs in when it runs off the request's thread."""
        if self.app is None:
            return contextlib.nullcontext()
        return self.app.app_context()

    def close(self) -> None:
        """Stop this process's registration and heartbeat schedule (no deregistration).

        For a test or script that made an app with a JobForge URL and is done with it; a
        gunicorn worker never needs it (the instance deregisters when the master exits).
        """
        if self.lifecycle is not None:
            self.lifecycle.stop()

    def _say_how_it_is_configured(self) -> None:
        """Startup lines a serving runner owes its operator: no JobForge URL (it then serves
        direct calls only, and nothing else would say so), misspelled settings, and gunicorn
        settings that cannot keep the runner's promises."""
        log = logging.getLogger("runnerkit")
        if not self.settings.jobforge_url:
            log.warning(
                "No JobForge URL: running standalone (no registration, no heartbeats); "
                "set RUNNERKIT_JOBFORGE_URL=http://<host>:<port> to connect to a control plane"
            )
        for line in unknown_settings(os.environ):
            log.warning(line)
        cfg = gunicorn_config()
        if cfg is not None:
            max_timeout_s = self.max_timeout_ms / 1000.0
            for line in problems(cfg, max_timeout_s, int(self.settings.reserved_threads)):
                log.error(line)

    def _check_signing(self) -> None:
        """No secret: refuse to start in production (unless told), warn loudly otherwise.

        A previous secret without a current one is refused in every environment: it reads
        as "signing on, mid-rotation", yet with no current secret nothing would be verified.
        """
        s = self.settings
        if s.signing_secret_previous and not s.signing_secret:
            raise ConfigError(
                "RUNNERKIT_SIGNING_SECRET_PREVIOUS is set but RUNNERKIT_SIGNING_SECRET is empty: "
                "set the current secret too (the previous one alone would turn verification off)."
            )
        self.unsigned_warning_due = False
        if s.signing_secret:
            return
        if s.environment == "production" and not s.allow_unsigned:
            raise ConfigError(
                "RUNNERKIT_SIGNING_SECRET is not set: in production every execution request "
                "must be signed. Set the secret JobForge signs with, or set "
                "RUNNERKIT_ALLOW_UNSIGNED=true to run unsigned (insecure)."
            )
        self.unsigned_warning_due = True

    def warn_unsigned(self) -> None:
        """Say once per process, when this app is served, that requests go unverified.

        Called when a gunicorn worker loads the app, and on the first ``/execute`` under any
        other server. Not when the app is merely imported (``runnerkit validate``,
        ``manifest``, a test's import): a warning about a port nobody serves is noise that
        teaches people to skip the one that matters.
        """
        if not self.unsigned_warning_due:
            return
        self.unsigned_warning_due = False
        logging.getLogger("runnerkit.signing").warning(
            "REQUEST SIGNING IS OFF: anyone who can reach this port can run jobs. "
            "Set RUNNERKIT_SIGNING_SECRET (required when RUNNERKIT_ENVIRONMENT=production)."
        )

    def create_app(self, config: Mapping[str, Any] | None = None) -> Flask:
        """A new Flask app serving this runner (with settings and state of its own).

        The app is the runner's alone, so every error it answers is an ErrorEnvelope, an
        unknown route's 404 and an exception in a route the author adds to it included.
        """
        app = Flask(self.name, static_folder=None)  # no /static route serving the cwd
        if config:
            app.config.update(config)
        self._for_new_app()._serve(app, "", whole_app=True)
        return app
