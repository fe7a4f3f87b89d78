"""The forge's settings: one table of every knob, its default and its meaning.

A setting named ``X`` is read from ``config["RUNNERKIT_FORGE_X"]`` (the mapping given to
``create_app``), then from the environment variable ``RUNNERKIT_FORGE_X``, then falls back to
its default. This mirrors :mod:`runnerkit.config`; every default is documented here only.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from runnerkit.config import ConfigError, Setting

PREFIX = "RUNNERKIT_FORGE_"


def _str(value: str) -> str:
    return value


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


def _nonnegative_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise ValueError(f"{value!r} must be a non-negative integer")
    return number


def _positive_float(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise ValueError(f"{value!r} must be a positive number")
    return number


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "DB_PATH",
        "./var/forge.sqlite3",
        _str,
        "The SQLite file holding runners, jobs, events and assertions (created on first "
        "start, with its directory). The dispatcher lock is '<DB_PATH>.dispatcher.lock'.",
    ),
    Setting(
        "TOKEN",
        "",
        _str,
        "Bearer token runners must send (Authorization: Bearer ...) on /runners*, "
        "POST /jobs/{id}/result and /jobs/{id}/events; empty disables the check.",
    ),
    Setting(
        "RUNNER_TOKEN",
        "",
        _str,
        "Bearer token the dispatcher sends to runners on POST /execute; empty sends none.",
    ),
    Setting(
        "SIGNING_SECRET",
        "",
        _str,
        "When set, every POST /execute is signed with the ControlPlane webhook scheme "
        "(x-webhook-signature/-timestamp/-event-id, HMAC-SHA256; see runnerkit.signing).",
    ),
    Setting(
        "HEARTBEAT_INTERVAL_MS",
        30_000,
        _positive_int,
        "heartbeatIntervalMs given to runners at registration.",
    ),
    Setting(
        "OFFLINE_AFTER_MISSED",
        3,
        _positive_int,
        "A runner is 'offline' after this many heartbeat intervals without a heartbeat; its "
        "running jobs are then requeued.",
    ),
    Setting(
        "ASYNC_THRESHOLD_MS",
        10_000,
        _nonnegative_int,
        "Jobs whose timeoutMs is above this are sent with 'Prefer: respond-async'.",
    ),
    Setting(
        "DISPATCH_MARGIN_MS",
        5_000,
        _nonnegative_int,
        "Added to a job's timeoutMs for the HTTP read timeout of POST /execute (and for how "
        "long an async job may take before its result is overdue).",
    ),
    Setting(
        "CONNECT_TIMEOUT_MS",
        3_000,
        _positive_int,
        "Connect timeout of POST /execute.",
    ),
    Setting(
        "DISPATCH_THREADS",
        32,
        _positive_int,
        "Executions in flight at once (the dispatcher's thread pool).",
    ),
    Setting(
        "POLL_INTERVAL_MS",
        100,
        _positive_int,
        "How often the dispatcher looks for work (it is also woken by new jobs and results).",
    ),
    Setting(
        "DISPATCHER",
        True,
        _bool,
        "Run the dispatcher thread in this process (it still dispatches only while it holds "
        "the dispatcher lock); false makes an API-only forge.",
    ),
    Setting(
        "DISPATCHER_STALE_MS",
        5_000,
        _positive_int,
        "/health reports the dispatcher unhealthy when its holder has not ticked for this long.",
    ),
    Setting(
        "SERVICE_NAME",
        "jobforge",
        _str,
        "'service' of every envelope, event and health answer; 'source' of status assertions.",
    ),
    Setting(
        "MAX_PAGE_SIZE",
        500,
        _positive_int,
        "Largest 'limit' accepted by the list endpoints.",
    ),
    Setting(
        "RETRY_AFTER_CAP_S",
        3600.0,
        _positive_float,
        "Upper bound on a runner's retryAfter honoured by the dispatcher.",
    ),
)

_BY_NAME = {s.name: s for s in SETTINGS}


class ForgeSettings:
    """Resolved forge settings: attribute access by setting name, lower-cased."""

    def __init__(self, values: Mapping[str, Any]) -> None:
        self._values = dict(values)

    def __getattr__(self, item: str) -> Any:
        try:
            return self._values[item.upper()]
        except KeyError:
            raise AttributeError(item) from None

    def as_dict(self) -> dict[str, Any]:
        """Every setting by its full ``RUNNERKIT_FORGE_`` name."""
        return {PREFIX + k: v for k, v in self._values.items()}

    @classmethod
    def load(
        cls, config: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
    ) -> ForgeSettings:
        """Resolve every setting from ``config``, then the environment, then the default.

        ``config`` keys may be given with the ``RUNNERKIT_FORGE_`` prefix or without it.
        """
        config = config or {}
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for setting in SETTINGS:
            key = PREFIX + setting.name
            raw: Any = None
            source = ""
            if key in config:
                raw, source = config[key], f"config[{key!r}]"
            elif setting.name in config:
                raw, source = config[setting.name], f"config[{setting.name!r}]"
            elif key in environ:
                raw, source = environ[key], key
            if raw is None:
                values[setting.name] = setting.default
                continue
            try:
                values[setting.name] = setting.parse(raw) if isinstance(raw, str) else raw
            except ValueError as exc:
                raise ConfigError(f"{source}: {exc}") from None
        if not str(values["DB_PATH"]).strip():
            raise ConfigError(f"{PREFIX}DB_PATH must not be empty")
        return cls(values)


def setting(name: str) -> Setting:
    """The documented forge setting called ``name`` (without prefix)."""
    return _BY_NAME[name]
