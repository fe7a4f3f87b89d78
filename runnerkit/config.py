"""Settings: one table of every knob, its default and its meaning.

A setting named ``X`` is read from ``app.config["RUNNERKIT_X"]``, then from the environment
variable ``RUNNERKIT_X`` (a few also from the ControlPlane names ``JOBFORGE_URL``,
``TRUTHCORE_URL`` and ``RUNNER_TOKEN``), then falls back to its default. Zero configuration
runs; every default is documented here and nowhere else.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

PREFIX = "RUNNERKIT_"


class ConfigError(ValueError):
    """A setting has a value that cannot be used."""


@dataclass(frozen=True)
class Setting:
    """One documented setting."""

    name: str
    default: Any
    parse: Callable[[str], Any]
    help: str
    aliases: tuple[str, ...] = ()


def _bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError(f"{value!r} is not a boolean (use true or false)")


def _positive_int(value: str) -> int:
    number = int(value)
    if number <= 0:
        raise ValueError(f"{value!r} must be a positive integer")
    return number


def _nonnegative_float(value: str) -> float:
    number = float(value)
    if not number >= 0:
        raise ValueError(f"{value!r} must be a non-negative number")
    return number


def _str(value: str) -> str:
    return value


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "JOBFORGE_URL",
        "",
        _str,
        "Base URL of JobForge; empty runs standalone (no registration).",
        ("JOBFORGE_URL",),
    ),
    Setting(
        "TRUTHCORE_URL",
        "",
        _str,
        "Base URL of TruthCore; when set, finished jobs are recorded there as assertions.",
        ("TRUTHCORE_URL",),
    ),
    Setting(
        "RUNNER_TOKEN",
        "",
        _str,
        "Bearer token sent on every call to JobForge and TruthCore.",
        ("RUNNER_TOKEN",),
    ),
    Setting(
        "HOST",
        "127.0.0.1",
        _str,
        "Host this runner is reachable at, used to derive the advertised health URL.",
    ),
    Setting(
        "PORT",
        3000,
        _positive_int,
        "Port this runner is served on (the environment's PORT is used when set).",
        ("PORT",),
    ),
    Setting(
        "HEALTH_CHECK_URL",
        "",
        _str,
        "healthCheckEndpoint advertised at registration; default http://HOST:PORT/health.",
    ),
    Setting(
        "STATE_DIR",
        "",
        _str,
        "Directory for the instance's shared state (lock, identity, ledger); "
        "default a folder under the system temp dir named for the runner and port.",
    ),
    Setting(
        "MAX_BODY_BYTES",
        1_048_576,
        _positive_int,
        "Largest request body accepted on /execute; larger bodies get 413.",
    ),
    Setting(
        "HEALTH_CHECK_TIMEOUT_MS",
        2000,
        _positive_int,
        "How long one registered health check may take before it counts as unhealthy.",
    ),
    Setting(
        "RESERVED_THREADS",
        2,
        _positive_int,
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
        _str,
        "Secret JobForge signs execution requests with; when set, unsigned requests get 401.",
    ),
    Setting(
        "SIGNING_SECRET_PREVIOUS",
        "",
        _str,
        "A second accepted secret, for rotating SIGNING_SECRET without downtime.",
    ),
    Setting(
        "SIGNATURE_MAX_AGE_S",
        300.0,
        _nonnegative_float,
        "Signed requests older than this are refused.",
    ),
    Setting(
        "SIGNATURE_MAX_FUTURE_S",
        60.0,
        _nonnegative_float,
        "Signed requests stamped further ahead than this are refused.",
    ),
    Setting(
        "ENVIRONMENT",
        "development",
        _str,
        "'production' refuses to start without SIGNING_SECRET (unless ALLOW_UNSIGNED).",
    ),
    Setting(
        "ALLOW_UNSIGNED",
        False,
        _bool,
        "Run without request signing even in production (insecure; say so explicitly).",
    ),
    Setting("MAX_JSON_DEPTH", 64, _positive_int, "Deepest JSON nesting accepted; deeper gets 400."),
    Setting("MAX_JSON_KEYS", 10_000, _positive_int, "Most object keys in one body; more gets 400."),
    Setting("LOG_FORMAT", "json", _str, "'json' for one JSON object per line, 'text' for people."),
    Setting("LOG_LEVEL", "INFO", _str, "Level of runnerkit's loggers."),
    Setting(
        "HEARTBEAT_INTERVAL_MS",
        30_000,
        _positive_int,
        "Heartbeat interval until JobForge's registration answer sets one.",
    ),
    Setting(
        "REGISTRATION_BACKOFF_MAX_MS",
        30_000,
        _positive_int,
        "Cap of the exponential backoff between registration attempts.",
    ),
    Setting(
        "HTTP_CONNECT_TIMEOUT_MS",
        3000,
        _positive_int,
        "Connect timeout of calls to JobForge and TruthCore.",
    ),
    Setting(
        "HTTP_READ_TIMEOUT_MS",
        10_000,
        _positive_int,
        "Read timeout of calls to JobForge and TruthCore.",
    ),
    Setting(
        "LEDGER_RETENTION_S",
        86_400.0,
        _nonnegative_float,
        "How long finished jobs stay in the idempotency ledger.",
    ),
    Setting(
        "RATE_LIMIT_RETRY_AFTER_S",
        1.0,
        _nonnegative_float,
        "retryAfter sent with 429 when a capability is at its maxConcurrency.",
    ),
)

_BY_NAME = {s.name: s for s in SETTINGS}


class Settings:
    """Resolved settings of one app: attribute access by setting name, lower-cased."""

    def __init__(self, values: Mapping[str, Any]) -> None:
        self._values = dict(values)

    def __getattr__(self, item: str) -> Any:
        try:
            return self._values[item.upper()]
        except KeyError:
            raise AttributeError(item) from None

    def as_dict(self) -> dict[str, Any]:
        """Every setting by its full ``RUNNERKIT_`` name."""
        return {PREFIX + k: v for k, v in self._values.items()}

    @classmethod
    def load(
        cls, config: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
    ) -> Settings:
        """Resolve every setting from app config, then environment, then default."""
        config = config or {}
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for setting in SETTINGS:
            key = PREFIX + setting.name
            raw: Any = None
            source = ""
            if key in config:
                raw, source = config[key], f"app.config[{key!r}]"
            elif key in environ:
                raw, source = environ[key], key
            else:
                for alias in setting.aliases:
                    if alias in environ:
                        raw, source = environ[alias], alias
                        break
            if raw is None:
                values[setting.name] = setting.default
                continue
            try:
                # Non-string app.config values are checked by the same parser as text.
                text = raw if isinstance(raw, str) else str(raw)
                values[setting.name] = setting.parse(text)
            except ValueError as exc:
                raise ConfigError(f"{source}: {exc}") from None
        if values["ENVIRONMENT"] not in {"development", "production"}:
            raise ConfigError(f"{PREFIX}ENVIRONMENT must be 'development' or 'production'")
        if values["LOG_FORMAT"] not in {"json", "text"}:
            raise ConfigError(f"{PREFIX}LOG_FORMAT must be 'json' or 'text'")
        for url_key in ("JOBFORGE_URL", "TRUTHCORE_URL"):
            values[url_key] = str(values[url_key]).rstrip("/")
        return cls(values)


def default_state_dir(runner_name: str, port: int) -> str:
    """Where an instance keeps its shared state when ``STATE_DIR`` is not set."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in runner_name)
    return os.path.join(tempfile.gettempdir(), "runnerkit", f"{safe}-{port}")


def settings_table(settings: tuple[Setting, ...], prefix: str) -> str:
    """A Markdown table of ``settings`` (docs/configuration.md is checked against it)."""
    lines = ["| setting | default | meaning |", "| --- | --- | --- |"]
    for item in settings:
        names = " / ".join([f"`{prefix}{item.name}`", *(f"`{a}`" for a in item.aliases)])
        default = "(empty)" if item.default == "" else f"`{item.default}`"
        lines.append(f"| {names} | {default} | {item.help} |")
    return "\n".join(lines)


def setting(name: str) -> Setting:
    """The documented setting called ``name`` (without prefix)."""
    return _BY_NAME[name]
