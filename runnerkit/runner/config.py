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
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from runnerkit.service.jsonbody import DEFAULT_MAX_DEPTH, DEFAULT_MAX_KEYS

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


def parse_bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError(f"{value!r} is not a boolean (use true or false)")


def parse_positive_int(value: str) -> int:
    number = int(value)
    if number <= 0:
        raise ValueError(f"{value!r} must be a positive integer")
    return number


def parse_nonnegative_float(value: str) -> float:
    number = float(value)
    if not number >= 0:
        raise ValueError(f"{value!r} must be a non-negative number")
    return number


def parse_str(value: str) -> str:
    return value


def parse_nonnegative_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise ValueError(f"{value!r} must be a non-negative integer")
    return number


def parse_positive_float(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise ValueError(f"{value!r} must be a positive number")
    return number


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
    Setting(
        "CLIENT_IDLE_TIMEOUT_S",
        10.0,
        parse_positive_float,
        "Under gunicorn, reading a request (headers or body) or writing its answer gives up "
        "after this many seconds without progress (a body: 400), so a stalled client does "
        "not hold a thread (the headers need the runnerkit.gunicorn_worker worker class).",
    ),
    Setting(
        "CLIENT_HEADER_TIMEOUT_S",
        10.0,
        parse_positive_float,
        "With the runnerkit.gunicorn_worker worker class, a request's head must be complete "
        "this many seconds after the connection (or its last request) is ready to read, "
        "however steadily it trickles in; else the connection is closed.",
    ),
    Setting(
        "CLIENT_BODY_TIMEOUT_S",
        30.0,
        parse_positive_float,
        "With the runnerkit.gunicorn_worker worker class, a request's body must be complete "
        "this many seconds after its head, else 400 (a Content-Length or chunked body within "
        "the body limit is read before a request thread is taken).",
    ),
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


class ResolvedSettings:
    """Resolved settings: attribute access by setting name, lower-cased."""

    prefix = PREFIX

    def __init__(self, values: Mapping[str, Any]) -> None:
        self._values = dict(values)
        # Plain attributes: settings are read on every request, and __getattr__ is slow.
        self.__dict__.update((name.lower(), value) for name, value in self._values.items())

    def __getattr__(self, item: str) -> Any:
        try:
            return self._values[item.upper()]
        except KeyError:
            raise AttributeError(item) from None

    def as_dict(self) -> dict[str, Any]:
        """Every setting by its full prefixed name."""
        return {self.prefix + k: v for k, v in self._values.items()}


def resolve(
    settings: tuple[Setting, ...],
    prefix: str,
    config: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    bare_keys: bool = False,
) -> dict[str, Any]:
    """Each setting's value: from ``config``, then the environment, then its default.

    ``config`` holds prefixed keys (and, with ``bare_keys``, unprefixed ones too); the
    environment holds prefixed names and a setting's aliases. Every value, text or not, goes
    through the setting's parser, so a bad one fails here with its source named.
    """
    config = config or {}
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for item in settings:
        key = prefix + item.name
        candidates = [(config, key, f"config[{key!r}]")]
        if bare_keys:
            candidates.append((config, item.name, f"config[{item.name!r}]"))
        candidates.append((environ, key, key))
        candidates.extend((environ, alias, alias) for alias in item.aliases)
        found = next(((src[k], label) for src, k, label in candidates if k in src), None)
        if found is None or found[0] is None:
            values[item.name] = item.default
            continue
        raw, label = found
        try:
            values[item.name] = item.parse(raw if isinstance(raw, str) else str(raw))
        except ValueError as exc:
            raise ConfigError(f"{label}: {exc}") from None
    return values


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


#: How the example env files (deploy/runnerkit.env.example) spell a secret still to be chosen.
PLACEHOLDER_PREFIX = "change-me"


def refuse_placeholder(name: str, value: str) -> None:
    """Refuse a secret copied unchanged from an example env file.

    ``cp runnerkit.env.example runnerkit.env`` is the documented first step; a deployment
    that stops there would sign, verify and authenticate with a value printed in this
    repository, which is no secret at all.
    """
    if value.strip().lower().startswith(PLACEHOLDER_PREFIX):
        raise ConfigError(
            f"{name} still holds the example's placeholder ({PLACEHOLDER_PREFIX}…): set a "
            "long random value, e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))'"
        )


def split_base_urls(value: str) -> list[str]:
    """The base URLs of a comma-separated list, each stripped of blanks and trailing ``/``
    (empty items are dropped: ``""`` is no URL, a runner running standalone)."""
    return [url for url in (item.strip().rstrip("/") for item in value.split(",")) if url]


def check_base_url(name: str, url: str) -> None:
    """Refuse a control-plane URL no HTTP client can use, at startup, naming the fix.

    ``127.0.0.1:3002`` (no scheme) would otherwise fail every registration attempt for ever
    with an "unreachable, retrying" line that never says the URL itself is the problem.
    """
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"{name}={url!r} is not a usable URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        hint = f"; write it as http://{url}" if "://" not in url else ""
        raise ConfigError(
            f"{name}={url!r} is not an http(s) base URL such as http://127.0.0.1:3002{hint}"
        )
    if port == 0:
        raise ConfigError(f"{name}={url!r} has port 0, which nothing can listen on")


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


def settings_table(settings: tuple[Setting, ...], prefix: str) -> str:
    """A Markdown table of ``settings`` (docs/configuration.md is checked against it)."""
    lines = ["| setting | default | meaning |", "| --- | --- | --- |"]
    for item in settings:
        names = " / ".join([f"`{prefix}{item.name}`", *(f"`{a}`" for a in item.aliases)])
        default = "(empty)" if item.default == "" else f"`{item.default}`"
        lines.append(f"| {names} | {default} | {item.help} |")
    return "\n".join(lines)


def write_settings_doc(path: str) -> bool:
    """Rewrite the runner and forge settings tables of docs/configuration.md (``make docs``).

    The tables sit between ``<!-- runner-settings:start/end -->`` and ``<!-- forge-settings:
    start/end -->`` markers; a test checks them against the code. True when the file changed.
    """
    from runnerkit.forge.settings import PREFIX as FORGE_PREFIX
    from runnerkit.forge.settings import SETTINGS as FORGE_SETTINGS

    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    updated = text
    for name, table in (
        ("runner-settings", settings_table(SETTINGS, PREFIX)),
        ("forge-settings", settings_table(FORGE_SETTINGS, FORGE_PREFIX)),
    ):
        start, end = f"<!-- {name}:start -->\n", f"\n<!-- {name}:end -->"
        head, found, rest = updated.partition(start)
        _, closed, tail = rest.partition(end)
        if not (found and closed):
            raise ValueError(f"{path} has no {name} section")
        updated = head + start + table + end + tail
    if updated != text:
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(updated)
    return updated != text


def setting(name: str) -> Setting:
    """The documented setting called ``name`` (without prefix)."""
    return _BY_NAME[name]
