"""Where the suite learns what a runner advertises: a file, the forge, or the runner itself.

The capabilities (and each one's ``inputSchema``) decide which valid requests the suite sends.
They come from a registration document in a file (``--manifest``), from the RunnerMetadata
the forge keeps for the runner registered at the URL under test (``--forge``), or, with
neither, from the runner's own ``GET /capabilities`` (what runnerkit runners serve).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import requests

from runnerkit.forge.runners import base_url

from .probe import CONNECT_TIMEOUT_S, Probe

#: Bearer tokens for the forge, in the order ``runnerkit runners`` uses them.
FORGE_TOKEN_VARIABLES = ("RUNNERKIT_FORGE_TOKEN", "RUNNERKIT_RUNNER_TOKEN", "RUNNER_TOKEN")


class SourceError(Exception):
    """The runner's capabilities could not be learned; the message says what to do."""


@dataclass(frozen=True)
class Advertised:
    """What the runner advertises, where it came from and which contract it should obey."""

    origin: str
    contract: str
    document: Any

    @property
    def capabilities(self) -> list[dict[str, Any]]:
        """The capabilities that are objects with a string ``id`` (the rest is a finding of
        the document check, not something to send requests for)."""
        items = self.document.get("capabilities") if isinstance(self.document, dict) else None
        return [c for c in items or [] if isinstance(c, dict) and isinstance(c.get("id"), str)]


def normalized(url: str) -> str:
    """A base URL compared as the forge dispatches to it: scheme and host lower-cased, no
    trailing slash."""
    parts = urlsplit(url.strip())
    return f"{parts.scheme.lower()}://{parts.netloc.lower()}{parts.path.rstrip('/')}"


def from_file(path: str) -> Advertised:
    """A RunnerRegistrationRequest in a JSON file."""
    try:
        with open(path, encoding="utf-8") as handle:
            document = json.load(handle)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise SourceError(f"cannot read the manifest {path}: {exc}") from None
    return Advertised(f"manifest {path}", "RunnerRegistrationRequest", document)


def from_forge(forge_url: str, runner_url: str) -> Advertised:
    """The RunnerMetadata of the runner the forge dispatches to at ``runner_url``; of several
    registrations there, the newest one not offline."""
    base = forge_url.rstrip("/")
    token = next((os.environ[n] for n in FORGE_TOKEN_VARIABLES if os.environ.get(n)), "")
    session = requests.Session()
    session.trust_env = False
    try:
        response = session.get(
            f"{base}/runners",
            params={"limit": 500},
            headers={"Authorization": f"Bearer {token}"} if token else {},
            timeout=(CONNECT_TIMEOUT_S, 30),
            allow_redirects=False,
        )
        items = response.json().get("items") if response.status_code == 200 else None
    except (requests.RequestException, ValueError, AttributeError) as exc:
        raise SourceError(f"cannot list the runners of {base}: {type(exc).__name__}") from None
    finally:
        session.close()
    if not isinstance(items, list):
        raise SourceError(f"{base}/runners answered {response.status_code}: {response.text[:200]}")
    wanted = normalized(runner_url)
    matches = [
        r
        for r in items
        if isinstance(r, dict)
        and isinstance(r.get("healthCheckEndpoint"), str)
        and normalized(base_url(r["healthCheckEndpoint"]) or "-") == wanted
    ]
    if not matches:
        known = sorted({str(r.get("healthCheckEndpoint")) for r in items if isinstance(r, dict)})
        raise SourceError(
            f"no runner registered with {base} is served at {runner_url} (their "
            f"healthCheckEndpoint: {', '.join(known) or 'none'})"
        )
    matches.sort(key=lambda r: (r.get("status") != "offline", str(r.get("registeredAt"))))
    chosen = matches[-1]
    return Advertised(f"runner {chosen.get('id')} registered with {base}", "RunnerMetadata", chosen)


def from_runner(probe: Probe) -> Advertised:
    """The registration document a runnerkit runner serves on ``GET /capabilities``."""
    reply = probe.get("/capabilities")
    if not reply.answered or reply.status != 200 or not isinstance(reply.body, dict):
        raise SourceError(
            f"{probe.base_url}/capabilities gives no registration document "
            f"({reply.describe()}): say what the runner advertises with --manifest FILE "
            "or --forge URL"
        )
    return Advertised(f"{probe.base_url}/capabilities", "RunnerRegistrationRequest", reply.body)
