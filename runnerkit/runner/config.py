"""Settings: one table of every knob, its default and its meaning.

A setting named ``X`` is read from ``app.config["RUNNERKIT_X"]``, then from the environment
variable ``RUNNERKIT_X`` (a few also from the ControlPlane names ``JOBFORGE_URL``,
``TRUTHCORE_URL`` and ``RUNNER_TOKEN``), then falls back to its default. Zero configuration
runs; every default is documented here and nowhere else.
"""

from __future__ import annotations

import difflib
import os
import tempfile
from collections.abc import Mapping
from typing import Any

from runnerkit.service.jsonbody import DEFAULT_MAX_DEPTH, DEFAULT_MAX_KEYS
from runnerkit.service.settings import (
    CLIENT_TIMEOUT_SETTINGS,
    ConfigError,
    ResolvedSettings,
    Setting,
    check_base_url,
    parse_bool,
    parse_nonnegative_float,
    parse_positive_int,
    parse_str,
    refuse_placeholder,
    resolve,
    split_base_urls,
)

PREFIX = "RUNNERKIT_"


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "JOBFORGE_URL",
        "",
        parse_str,
        "Base URL of JobForge; empty runs standalone (no registration). Several base URLs, "
        "comma-separated (forges sharing one database), make the runner fail over: calls "
        "go to the URL that last answered and move to the next when it is unreachable.",
        ("JOBFORGE_URL",),
    ),
    Setting(
        "TRUTHCORE_URL",
        "",
        parse_str,
        "Base URL of TruthCore; when set, finished jobs are recorded there as assertions.",
        ("TRUTHCORE_URL",),
    ),
    Setting(
        "RUNNER_TOKEN",
        "",
        parse_str,
        "Bearer token sent on every call to JobForge and TruthCore.",
        ("RUNNER_TOKEN",),
    ),
    Setting(
        "HOST",
        "127.0.0.1",
        parse_str,
        "Host this runner is reachable at, used to derive the advertised health URL.",
    ),
    Setting(
        "PORT",
        3000,
        parse_positive_int,
        "Port this runner is served on (the environment's PORT is used when set; when neither "
        "is set, under gunicorn, the port it listens on).",
        ("PORT",),
    ),
    Setting(
        "HEALTH_CHECK_URL",
        "",
        parse_str,
        "healthCheckEndpoint advertised at registration; default http://HOST:PORT/health.",
    ),
    Setting(
        "STATE_DIR",
        "",
        parse_str,
        "Directory for the instance's shared state (lock, identity, ledger); "
        "default a folder under the system temp dir named for the runner and port. "
        "Created 0700; one owned by another user or writable by others is refused.",
    ),
    Setting(
        "MAX_BODY_BYTES",
        1_048_576,
        parse_positive_int,
        "Largest request body accepted on /execute; larger bodies get 413.",
    ),
    Setting(
        "HEALTH_CHECK_TIMEOUT_MS",
        2000,
        parse_positive_int,
        "How long one registered health check may take before it counts as unhealthy.",
    ),
    Setting(
        "RESERVED_THREADS",
        2,
        parse_positive_int,
        "Request threads per gunicorn worker kept free of jobs, so /health answers while jobs run.",
    ),
    Setting(
        "WORKER_THREADS",
        0,
        int,
        "Request threads per worker; set by deploy/gunicorn.conf.py, "
        "0 when unknown (no per-worker job cap).",
    ),
    Setting(
        "SIGNING_SECRET",
        "",
        parse_str,
        "Secret JobForge signs execution requests with; when set, unsigned requests get 401.",
    ),
    Setting(
        "SIGNING_SECRET_PREVIOUS",
        "",
        parse_str,
        "A second accepted secret, for rotating SIGNING_SECRET without downtime "
        "(set without SIGNING_SECRET, the runner refuses to start).",
    ),
    Setting(
        "SIGNATURE_MAX_AGE_S",
        300.0,
        parse_nonnegative_float,
        "Signed requests older than this are refused.",
    ),
    Setting(
        "SIGNATURE_MAX_FUTURE_S",
        60.0,
        parse_nonnegative_float,
        "Signed requests stamped further ahead than this are refused.",
    ),
    Setting(
        "ENVIRONMENT",
        "development",
        parse_str,
        "'production' refuses to start without SIGNING_SECRET (unless ALLOW_UNSIGNED).",
    ),
    Setting(
        "ALLOW_UNSIGNED",
        False,
        parse_bool,
        "Run without request signing even in production (insecure; say so explicitly).",
    ),
    Setting(
        "MAX_JSON_DEPTH",
        DEFAULT_MAX_DEPTH,
        parse_positive_int,
        "Deepest JSON nesting accepted; deeper gets 400.",
    ),
    Setting(
        "MAX_JSON_KEYS",
        DEFAULT_MAX_KEYS,
        parse_positive_int,
        "Most object keys in one body; more gets 400.",
    ),
    Setting(
        "LOG_FORMAT", "json", parse_str, "'json' for one JSON object per line, 'text' for people."
    ),
    Setting("LOG_LEVEL", "INFO", parse_str, "Level of runnerkit's loggers."),
    Setting(
        "HEARTBEAT_INTERVAL_MS",
        30_000,
        parse_positive_int,
        "Heartbeat interval until JobForge's registration answer sets one.",
    ),
    Setting(
        "REGISTRATION_BACKOFF_MAX_MS",
        30_000,
        parse_positive_int,
        "Cap of the exponential backoff between registration attempts.",
    ),
    Setting(
        "HTTP_CONNECT_TIMEOUT_MS",
        3000,
        parse_positive_int,
        "Connect timeout of calls to JobForge and TruthCore.",
    ),
    Setting(
        "HTTP_READ_TIMEOUT_MS",
        10_000,
        parse_positive_int,
        "Read timeout of calls to JobForge and TruthCore.",
    ),
    Setting(
        "LEDGER_RETENTION_S",
        86_400.0,
        parse_nonnegative_float,
        "How long finished jobs stay in the idempotency ledger.",
    ),
    *CLIENT_TIMEOUT_SETTINGS,
    Setting(
        "MAX_QUEUED_JOBS",
        100,
        parse_positive_int,
        "Asynchronous jobs accepted but not yet started, across the instance; beyond it, "
        "'Prefer: respond-async' gets 429 (each waiting job holds a thread).",
    ),
    Setting(
        "RATE_LIMIT_RETRY_AFTER_S",
        1.0,
        parse_nonnegative_float,
        "retryAfter sent with 429 when a capability is at its maxConcurrency.",
    ),
)

_BY_NAME = {s.name: s for s in SETTINGS}


class Settings(ResolvedSettings):
    """Resolved settings of one runner app."""

    @classmethod
    def load(
        cls, config: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
    ) -> Settings:
        """Resolve every setting from app config, then environment, then default."""
        values = resolve(SETTINGS, PREFIX, config, environ)
        if values["ENVIRONMENT"] not in {"development", "production"}:
            raise ConfigError(f"{PREFIX}ENVIRONMENT must be 'development' or 'production'")
        if values["LOG_FORMAT"] not in {"json", "text"}:
            raise ConfigError(f"{PREFIX}LOG_FORMAT must be 'json' or 'text'")
        for secret_key in ("SIGNING_SECRET", "SIGNING_SECRET_PREVIOUS", "RUNNER_TOKEN"):
            refuse_placeholder(PREFIX + secret_key, str(values[secret_key]))
        urls = split_base_urls(str(values["JOBFORGE_URL"]))
        for url in urls:
            check_base_url(PREFIX + "JOBFORGE_URL", url)
        values["JOBFORGE_URL"] = ",".join(urls)
        values["TRUTHCORE_URL"] = str(values["TRUTHCORE_URL"]).strip().rstrip("/")
        if values["TRUTHCORE_URL"]:
            check_base_url(PREFIX + "TRUTHCORE_URL", values["TRUTHCORE_URL"])
        environ = os.environ if environ is None else environ
        port_given = (
            PREFIX + "PORT" in (config or {}) or PREFIX + "PORT" in environ or "PORT" in environ
        )
        if not port_given:
            served = gunicorn_port(environ)
            if served is not None:
                values["PORT"] = served
        return cls(values)


def unknown_settings(environ: Mapping[str, str]) -> list[str]:
    """One line for each ``RUNNERKIT_*`` variable that is no runner setting (a typo in a
    setting's name is otherwise silently ignored), with the nearest real name when there is
    one. The forge's ``RUNNERKIT_FORGE_*`` settings are the forge's to check."""
    known = [PREFIX + item.name for item in SETTINGS]
    lines = []
    for name in sorted(environ):
        if not name.startswith(PREFIX) or name in known or name.startswith(PREFIX + "FORGE_"):
            continue
        near = difflib.get_close_matches(name, known, n=1, cutoff=0.8)
        hint = f"; did you mean {near[0]}?" if near else " (see docs/configuration.md)"
        lines.append(f"{name} is not a runnerkit setting and is ignored{hint}")
    return lines


def gunicorn_port(environ: Mapping[str, str]) -> int | None:
    """The one TCP port this gunicorn process listens on; None outside gunicorn or if unsure.

    ``gunicorn app:app`` binds 8000 unless told otherwise, and a ``--bind`` elsewhere does not
    reach the app: without this the runner would advertise PORT's default (3000) to JobForge
    and never be reached. A worker inherits its master's listening sockets, so it can see
    the port itself.
    """
    if not str(environ.get("SERVER_SOFTWARE", "")).startswith("gunicorn/"):
        return None
    import psutil

    try:
        connections = psutil.Process().net_connections(kind="tcp")
    except psutil.Error:
        return None
    ports = {c.laddr.port for c in connections if c.status == psutil.CONN_LISTEN and c.laddr}
    return ports.pop() if len(ports) == 1 else None


def default_state_dir(runner_name: str, port: int) -> str:
    """Where an instance keeps its shared state when ``STATE_DIR`` is not set."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in runner_name)
    return os.path.join(tempfile.gettempdir(), "runnerkit", f"{safe}-{port}")


def setting(name: str) -> Setting:
    """The documented setting called ``name`` (without prefix)."""
    return _BY_NAME[name]
