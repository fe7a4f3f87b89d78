"""Registration with JobForge: the leader's first duty, and the base of the lifecycle.

:class:`Registration` holds what the lifecycle was handed (the instance state, the shared
:class:`~runnerkit.runner.serving.Serving`, the runner's name and documents) and registers the
instance, backing off while JobForge is unreachable and slowly when it refuses; the
runnerId it gets is kept in the state directory for every worker. :mod:`~runnerkit.runner.
heartbeat` and :mod:`~runnerkit.runner.lifecycle` build on it.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import Any

import psutil
import requests
from marshmallow import ValidationError

from runnerkit.contracts import (
    CONTRACT_VERSION,
    RunnerRegistrationResponseSchema,
    format_version,
)
from runnerkit.runner.jobforge import JobForgeClient
from runnerkit.runner.serving import Serving
from runnerkit.runner.state import InstanceState

log = logging.getLogger("runnerkit.lifecycle")

#: Slow retry for a registration JobForge refused (4xx): a human has to change something.
REFUSED_RETRY_S = 60.0
_REGISTRATION_SCHEMA = RunnerRegistrationResponseSchema()


class Registration:
    """Registers the instance (see the module docstring); set up by ``Lifecycle()``."""

    state: InstanceState
    client: JobForgeClient
    owner: tuple[int, float]
    key: str
    _serving: Serving
    _name: str
    _version: str
    _runner_id: Callable[[], str]
    _registration_document: Callable[[], dict[str, Any]]
    _health: Callable[[], tuple[int, dict[str, Any]]]
    _deliver_result: Callable[[str, str, dict[str, Any]], None]
    _attempt: int
    _next_register_at: float
    _condition: str
    _heartbeat_due: float
    _processes: dict[int, psutil.Process]

    def _runner_token(self) -> str:
        """The runnerToken JobForge gave this instance ('' when none: the shared token)."""
        identity = self.current_identity()
        return str(identity.get("runnerToken") or "") if identity else ""

    def current_identity(self) -> dict[str, Any] | None:
        """This instance's registration, ignoring one left behind by an earlier instance."""
        identity = self.state.identity()
        if identity and identity.get("instance") == self.key and identity.get("runnerId"):
            return identity
        return None

    def _note(self, condition: str, level: int, message: str, *args: Any) -> None:
        """Log once per change of condition, not once per retry."""
        if condition != self._condition:
            self._condition = condition
            log.log(level, message, *args)

    def register(self) -> None:
        document = self._registration_document()
        try:
            response = self.client.register(document)
        except requests.RequestException as exc:
            self._backoff()
            self._note(
                "unreachable",
                logging.WARNING,
                "JobForge unreachable at %s (%s); retrying registration with backoff",
                ", ".join(self.client.base_urls),
                type(exc).__name__,
            )
            return
        if response.status_code >= 500:
            self._backoff()
            self._note(
                f"register-{response.status_code}",
                logging.WARNING,
                "JobForge answered %s to registration; retrying with backoff",
                response.status_code,
            )
            return
        if response.status_code >= 400:
            self._refused(response)
            return
        try:
            answer = _REGISTRATION_SCHEMA.load(response.json())
        except (ValueError, ValidationError):
            self._backoff()
            self._note(
                "bad-answer",
                logging.ERROR,
                "JobForge's registration answer is not a RunnerRegistrationResponse",
            )
            return
        identity = {
            "instance": self.key,
            "runnerId": answer["runnerId"],
            "registeredAt": answer["registeredAt"],
            "heartbeatIntervalMs": answer["heartbeatIntervalMs"],
            "nextHeartbeatAt": time.time() + answer["heartbeatIntervalMs"] / 1000.0,
        }
        runner_token = _runner_token_in(response)
        if runner_token:  # the file is written with mode 0600
            identity["runnerToken"] = runner_token
        self.state.save_identity(identity)
        self._attempt = 0
        self._next_register_at = 0.0
        self._note(
            "registered",
            logging.INFO,
            "registered with JobForge as runner %s (heartbeat every %s ms)",
            answer["runnerId"],
            answer["heartbeatIntervalMs"],
        )

    def _backoff(self) -> None:
        cap = self._serving.settings.registration_backoff_max_ms / 1000.0
        delay = min(cap, 0.5 * 2**self._attempt) * random.uniform(0.5, 1.0)
        self._attempt = min(self._attempt + 1, 32)
        self._next_register_at = time.time() + delay

    def _refused(self, response: requests.Response) -> None:
        try:
            envelope = response.json().get("error", response.json())
        except ValueError:
            envelope = {}
        theirs = envelope.get("contractVersion") if isinstance(envelope, dict) else None
        self._next_register_at = time.time() + max(
            REFUSED_RETRY_S, self._serving.settings.registration_backoff_max_ms / 1000.0
        )
        self._note(
            f"refused-{response.status_code}",
            logging.ERROR,
            "JobForge refused the registration (%s %s: %s); runner contract version %s, "
            "JobForge contract version %s; retrying every %.0f s",
            response.status_code,
            envelope.get("code", "") if isinstance(envelope, dict) else "",
            envelope.get("message", response.text[:200]) if isinstance(envelope, dict) else "",
            format_version(CONTRACT_VERSION),
            format_version(theirs) if isinstance(theirs, dict) else "unknown",
            REFUSED_RETRY_S,
        )


def _runner_token_in(response: requests.Response) -> str:
    """``runnerToken`` of a registration answer (not part of the contract schema, so it is
    read beside it); '' from a JobForge that issues none."""
    try:
        token = response.json().get("runnerToken")
    except (ValueError, AttributeError):
        return ""
    return token if isinstance(token, str) else ""
