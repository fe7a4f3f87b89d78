"""Settings machinery: a table of documented settings, each read from config, environment or
its default, and the checks every service applies to what it is given.

The runner (:mod:`runnerkit.runner.config`) and the forge (:mod:`runnerkit.forge.settings`)
each declare their own table with these pieces; a value that cannot be used fails at startup
with its source named, never on the first request.
"""

from __future__ import annotations

import os
import urllib.parse
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


def settings_table(settings: tuple[Setting, ...], prefix: str) -> str:
    """A Markdown table of ``settings`` (docs/configuration.md is checked against it)."""
    lines = ["| setting | default | meaning |", "| --- | --- | --- |"]
    for item in settings:
        names = " / ".join([f"`{prefix}{item.name}`", *(f"`{a}`" for a in item.aliases)])
        default = "(empty)" if item.default == "" else f"`{item.default}`"
        lines.append(f"| {names} | {default} | {item.help} |")
    return "\n".join(lines)


#: Read by the gunicorn worker class (:mod:`runnerkit.service.gunicorn_worker`) in every
#: service it serves; the runner documents them in its own table.
CLIENT_TIMEOUT_SETTINGS: tuple[Setting, ...] = (
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
)
