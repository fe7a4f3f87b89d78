"""One attempt sent: the RunnerExecutionRequest, its headers, and the answer made an Outcome.

:meth:`Sending.execute` builds the request (``X-Correlation-Id``, the RUNNER_TOKEN as a
bearer token, with SIGNING_SECRET the ControlPlane webhook signature, ``Prefer:
respond-async`` above ASYNC_THRESHOLD_MS), posts it (:mod:`.connections`) and turns what
happened into an :class:`~.jobs.Outcome`: every way of not getting an answer is a failure
envelope of its own (a runner that cannot be reached, or is at a refused address, also gets
no more work for now), and :meth:`Sending.interpret` reads an answer: the result, a 202
(the result will arrive on ``POST /jobs/<id>/result``), or the runner's error envelope (one
made from the HTTP status when it sent none), checked against its contract by the referee.

:class:`Sending` is one part of :class:`~.dispatcher.Dispatcher` (a base class, so the send
path costs no extra lookup); its state is set up in ``Dispatcher.__init__``.
"""

from __future__ import annotations

import http.client
import json
import logging
import math
import ssl
from typing import Any

from marshmallow import ValidationError

from runnerkit._version import __version__
from runnerkit.contracts import ErrorEnvelopeSchema
from runnerkit.errors import ValidationFailed
from runnerkit.service.jsonbody import check_json_limits
from runnerkit.service.signing import sign

from . import db
from . import jobs as jobs_module
from .connections import AnswerTooLarge, ConnectFailed, Connections, Headers, TargetRefused
from .job_store import JobStore
from .jobs import Claim, Outcome
from .referee import Referee
from .settings import ForgeSettings

log = logging.getLogger("runnerkit.forge.dispatcher")

_ENVELOPE_SCHEMA = ErrorEnvelopeSchema()


def execution_request(claim: Claim) -> dict[str, Any]:
    """The RunnerExecutionRequest of one attempt."""
    request = claim.request
    metadata: dict[str, Any] = {"correlationId": claim.correlation_id}
    user_id = request["metadata"].get("userId")
    if user_id is not None:
        metadata["userId"] = user_id
    return {
        "jobId": claim.job_id,
        "moduleId": claim.runner_name,
        "capabilityId": claim.capability_id,
        "payload": request["payload"]["data"],
        "timeoutMs": request["timeoutMs"],
        "metadata": metadata,
    }


def _retry_after_header(headers: Headers) -> float | None:
    value = (headers.get("Retry-After") or "").strip()
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


# Made once: ``json.dumps``/``json.loads`` with arguments build a new coder on every call.
_encode = json.JSONEncoder(separators=(",", ":")).encode
_decode = json.JSONDecoder(parse_constant=_reject_constant).decode


class Sending(Connections):
    """Sending one attempt and reading its answer (a part of the Dispatcher)."""

    # Set up in Dispatcher.__init__.
    jobs: JobStore
    db: db.Database
    settings: ForgeSettings
    referee: Referee

    def execute(self, claim: Claim) -> Outcome:
        """Send one attempt to its runner and read the answer (never raises)."""
        raw = _encode(execution_request(claim)).encode()
        headers = {
            "User-Agent": f"runnerkit-forge/{__version__}",
            "Content-Type": "application/json",
            "Accept": "application/json",
            "X-Correlation-Id": claim.correlation_id,
        }
        if claim.asynchronous:
            headers["Prefer"] = "respond-async"
        if self.settings.runner_token:
            headers["Authorization"] = f"Bearer {self.settings.runner_token}"
        if self.settings.signing_secret:
            headers.update(sign(raw, self.settings.signing_secret))
        timeout_ms = min(
            float(claim.request["timeoutMs"]) + float(self.settings.dispatch_margin_ms),
            jobs_module.MAX_WAIT_MS,
        )
        connect_timeout = float(self.settings.connect_timeout_ms) / 1000.0
        url = f"{claim.base_url}/execute"
        try:
            answer = self._post(claim.base_url, raw, headers, connect_timeout, timeout_ms / 1000.0)
        except ConnectFailed as exc:
            self._suspect(claim.runner_id)
            if isinstance(exc.__cause__, TimeoutError):
                return self._network_failure(claim, f"Connecting to {url} timed out")
            return self._network_failure(claim, f"ConnectionError calling {url}")
        except TargetRefused as exc:
            self._disable(claim.runner_id, str(exc.args[0]))
            return Outcome(
                success=False,
                error=self.jobs.envelope(
                    "NETWORK_ERROR",
                    "RUNNER_ADDRESS_REFUSED",
                    f"Runner {claim.runner_id} is at {exc.args[0]}, an address runners may "
                    "not have here (RUNNERKIT_FORGE_ALLOWED_RUNNER_NETWORKS); nothing was sent",
                    retryable=True,
                    correlation_id=claim.correlation_id,
                ),
            )
        except AnswerTooLarge as exc:
            return Outcome(
                success=False,
                error=self.jobs.envelope(
                    "RUNNER_ERROR",
                    "ANSWER_TOO_LARGE",
                    f"Runner {claim.runner_id} answered with {exc.args[0]}, more than "
                    f"RUNNERKIT_FORGE_MAX_ANSWER_BYTES ({self.max_answer} bytes); "
                    "the answer was not read",
                    retryable=False,
                    correlation_id=claim.correlation_id,
                ),
            )
        except TimeoutError:
            return Outcome(
                success=False,
                error=self.jobs.envelope(
                    "TIMEOUT",
                    "DISPATCH_TIMEOUT",
                    f"Runner {claim.runner_id} did not answer within {timeout_ms:g} ms",
                    retryable=True,
                    correlation_id=claim.correlation_id,
                ),
            )
        except (OSError, http.client.HTTPException) as exc:  # the connection broke
            # Only a failed connect takes a runner out of dispatch: one that died (its
            # port closed) is, one that merely broke this answer (or a connection it had
            # kept open) is not.
            if not self._connects(claim.base_url, connect_timeout):
                self._suspect(claim.runner_id)
            name = "SSLError" if isinstance(exc, ssl.SSLError) else "ConnectionError"
            return self._network_failure(claim, f"{name} calling {url}")
        return self.interpret(claim, *answer)

    def _disable(self, runner_id: str, where: str) -> None:
        """A runner at a refused address gets no work until it registers again."""
        with self.db.tx() as conn:
            db.disable_runner_dispatch(conn, runner_id)
        log.warning("runner %s is at %s, a refused address; it gets no work", runner_id, where)

    def _suspect(self, runner_id: str) -> None:
        """A runner that cannot be reached gets no more work until it heartbeats again.

        Otherwise the retry of its job would go straight back to it (it still counts as
        healthy until it misses OFFLINE_AFTER_MISSED heartbeats), while a live runner idles.
        """
        with self.db.tx() as conn:
            db.mark_runner_unreachable(conn, runner_id)
        log.warning("runner %s is unreachable; no work for it until its next heartbeat", runner_id)

    def _network_failure(self, claim: Claim, message: str) -> Outcome:
        return Outcome(
            success=False,
            error=self.jobs.envelope(
                "NETWORK_ERROR",
                "RUNNER_UNREACHABLE",
                message,
                retryable=True,
                correlation_id=claim.correlation_id,
            ),
        )

    def interpret(self, claim: Claim, status: int, headers: Headers, content: bytes) -> Outcome:
        """Turn a runner's HTTP answer (status, headers, body) into an Outcome."""
        try:
            body = _decode(content.decode("utf-8"))
            if isinstance(body, dict):
                settings = self.settings
                check_json_limits(body, settings.max_json_depth, settings.max_json_keys, content)
        except (UnicodeDecodeError, ValueError, RecursionError, ValidationFailed):
            body = None
        if status == 202:
            return Outcome(success=False, accepted=True)
        found = None
        if 200 <= status < 300 and isinstance(body, dict) and body.get("success") is True:
            execution = body.get("executionTimeMs")
            outcome = Outcome(
                success=True,
                data=body.get("data"),
                has_data="data" in body,
                execution_ms=float(execution) if isinstance(execution, int | float) else None,
            )
        else:
            envelope = found = _envelope_in(body)
            retry_after = _retry_after_header(headers)
            if envelope is None:
                envelope = self._envelope_for_status(claim, status, retry_after)
            elif retry_after is not None and "retryAfter" not in envelope:
                envelope = {**envelope, "retryAfter": retry_after}
            outcome = Outcome(success=False, error=envelope)
        # The answer against its contract: recorded when it breaks it (see referee.py).
        return self.referee.answer(claim, status, body, outcome, found)

    def _envelope_for_status(
        self, claim: Claim, status: int, retry_after: float | None
    ) -> dict[str, Any]:
        name = f"Runner {claim.runner_id} answered HTTP {status}"
        category, code, retryable = {
            429: ("RATE_LIMITED", "RATE_LIMITED", True),
            503: ("SERVICE_UNAVAILABLE", "SERVICE_UNAVAILABLE", True),
            408: ("TIMEOUT", "RUNNER_TIMEOUT", True),
            504: ("TIMEOUT", "RUNNER_TIMEOUT", True),
            401: ("AUTHENTICATION_ERROR", "RUNNER_REFUSED_CREDENTIALS", False),
            403: ("AUTHORIZATION_ERROR", "RUNNER_FORBIDDEN", False),
            404: ("RESOURCE_NOT_FOUND", "RUNNER_HAS_NO_EXECUTE", False),
        }.get(status, ("", "", False))
        if not category:
            if 200 <= status < 300:
                category, code, retryable = "RUNNER_ERROR", "INVALID_RUNNER_RESPONSE", True
                name = f"Runner {claim.runner_id} answered {status} without a valid result"
            elif status < 500:
                category, code, retryable = "VALIDATION_ERROR", "RUNNER_REJECTED", False
            else:
                category, code, retryable = "RUNNER_ERROR", "RUNNER_FAILED", True
        return self.jobs.envelope(
            category,
            code,
            name,
            retryable=retryable,
            retry_after=retry_after,
            correlation_id=claim.correlation_id,
        )


def _envelope_in(body: Any) -> dict[str, Any] | None:
    """The contract-valid ErrorEnvelope in a runner's answer (``body.error`` or the body)."""
    if not isinstance(body, dict):
        return None
    for candidate in (body.get("error"), body):
        if isinstance(candidate, dict):
            try:
                loaded: dict[str, Any] = _ENVELOPE_SCHEMA.load(candidate)
            except ValidationError:
                continue
            return loaded
    return None
