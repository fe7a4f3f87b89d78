"""The referee: the forge sees every byte a runner sends, so it says what breaks a contract.

Registrations, heartbeats, events and async results are validated by the API before anything
else (:func:`.api._body`); the referee only hears about the ones refused (:meth:`Referee.watch`
around the route), so a conforming request costs it nothing. An answer to ``POST /execute``
was never validated whole (the dispatcher reads ``success``, ``data`` and an error envelope):
:meth:`Referee.answer` checks it with a few dictionary look-ups first, and runs the contract's
schema only when those find something off, to say what.

What is found is recorded (:mod:`.violations`) against the runner, and the job for an answer,
with the contract, the path and the message; logged; shown on the dashboard and counted in
``GET /runners`` (``contractViolations``). A refused heartbeat also leaves its reason on the
runner's row (``refusal``). A broken answer is still used unless ``RUNNERKIT_FORGE_STRICT``,
which fails the attempt with ``SCHEMA_MISMATCH`` (not retried).

Who sent a refused request: the runner whose ``runnerToken`` it carries; else the job's
runner (results, events), the runner with that ``runnerId`` or ``healthCheckEndpoint``, or
the only runner registered at the request's address; else nobody, and it is recorded as
unattributed with what the request said about itself. Refused requests cost a write, so
recording and logging them is rate-limited per sender (:class:`Gate`): garbage sent all day
costs a few writes a second, never one each.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from flask import g, request

from runnerkit.contracts import is_uuid, utc_now
from runnerkit.contracts.validator import ContractValidator
from runnerkit.errors import RunnerError, ValidationFailed, make_envelope

from . import db, violations
from .jobs import Claim, Outcome
from .settings import ForgeSettings
from .trust import ANY_RUNNER, is_loopback
from .violations import Violation

log = logging.getLogger("runnerkit.forge.referee")

ANSWER = "RunnerExecutionResponse"
#: What each contract a runner sends is, in a log line or on a runner's row.
WHAT = {
    "RunnerRegistrationRequest": "registration",
    "RunnerHeartbeat": "heartbeat",
    "JobEvent": "event",
    ANSWER: "result",
}
#: Seconds between two log lines about one runner's answers (the rest are counted).
ANSWER_LOG_EVERY_S = 10.0

_VALIDATOR = ContractValidator()


class Gate:
    """At most one pass per key every ``every_s`` seconds, and ``per_second`` in all.

    Counts what it holds back per key, so the next pass can say how many there were. Its
    memory is bounded: past ``max_keys`` keys it starts afresh.
    """

    def __init__(self, every_s: float = 1.0, per_second: int = 20, max_keys: int = 4096) -> None:
        self.every_s = every_s
        self.per_second = per_second
        self.max_keys = max_keys
        self._next: dict[Any, float] = {}
        self._held: dict[Any, int] = {}
        self._second = 0
        self._in_second = 0
        self._lock = threading.Lock()

    def admit(self, key: Any, now: float | None = None) -> int | None:
        """How many were held back before this one, or None when this one is held back."""
        now = time.monotonic() if now is None else now
        with self._lock:
            second = int(now)
            if second != self._second:
                self._second, self._in_second = second, 0
            if now < self._next.get(key, 0.0) or self._in_second >= self.per_second:
                if key in self._held or len(self._held) < self.max_keys:  # bounded too
                    self._held[key] = self._held.get(key, 0) + 1
                return None
            if len(self._next) >= self.max_keys:
                self._next.clear()
                self._held.clear()
            self._in_second += 1
            self._next[key] = now + self.every_s
            return self._held.pop(key, 0)


def _text(detail: Mapping[str, Any]) -> tuple[str, str]:
    """(path, message) of an ErrorDetail or a validator problem, the value quoted."""
    path = ".".join(str(p) for p in detail.get("path") or [])
    message = str(detail.get("message") or "invalid").rstrip(".")
    message = message[:1].lower() + message[1:]
    if "value" in detail and detail["value"] is not None:
        message = f"{message} (got {detail['value']!r:.80})"
    return path, message


def _violations(
    contract: str, details: Sequence[Mapping[str, Any]], prefix: str = ""
) -> list[Violation]:
    found = []
    for detail in details:
        path, message = _text(detail)
        found.append(Violation(contract, ".".join(p for p in (prefix, path) if p), message))
    return found


def describe(found: Sequence[Violation], limit: int = 5) -> str:
    """``runnerId: not a valid UUID (got 'unknown'); status: …`` (``limit`` of them)."""
    said = "; ".join(f"{v.path}: {v.message}" if v.path else v.message for v in found[:limit])
    return said + (f" (and {len(found) - limit} more)" if len(found) > limit else "")


def refusal_text(contract: str, found: Sequence[Violation], limit: int = 1) -> str:
    """``heartbeat refused: runnerId: not a valid UUID (got 'unknown')``."""
    return f"{WHAT.get(contract, contract)} refused: {describe(found, limit)}"


def _host(url: str) -> str:
    try:
        return (urlsplit(url).hostname or "").lower()
    except ValueError:
        return ""


def _same_place(peer: str, host: str) -> bool:
    """Whether a request from ``peer`` may come from a runner registered at ``host``."""
    if peer == host:
        return True
    return (host == "localhost" or is_loopback(host)) and is_loopback(peer)


class Referee:
    """Checks what runners send against the contracts; records and reports what breaks them."""

    def __init__(self, database: db.Database, settings: ForgeSettings) -> None:
        self.db = database
        self.service = str(settings.service_name)
        self.strict = bool(settings.strict)
        self.gate = Gate()
        self.answer_logs = Gate(every_s=ANSWER_LOG_EVERY_S, per_second=50)

    # -- requests the API refused ---------------------------------------------------------

    @contextlib.contextmanager
    def watch(self, contract: str, job_id: str | None = None) -> Iterator[None]:
        """Around a route taking ``contract`` from a runner: a refusal (400) is recorded."""
        try:
            yield
        except ValidationFailed as exc:
            try:
                self.refused(contract, exc, job_id)
            except Exception:  # the refusal itself must still be answered
                log.exception("recording a refused %s failed", WHAT.get(contract, contract))
            raise

    def refused(self, contract: str, exc: ValidationFailed, job_id: str | None) -> None:
        """Record and log why a runner's request was refused (rate-limited per sender)."""
        found = _violations(contract, exc.details or [])
        if not found:
            found = [Violation(contract, "", _text({"message": exc.message})[1])]
        peer = str(request.remote_addr or "?")
        holder = g.get("forge_runner")
        # Rate-limited before anything is read: by the runner its credential names, else by
        # the address it came from.
        held = self.gate.admit((holder if holder and holder != ANY_RUNNER else peer, contract))
        if held is None:
            return
        raw = g.get("forge_body")
        raw = raw if isinstance(raw, dict) else {}
        runner_id, source = self._sender(contract, job_id, raw, peer)
        ts = time.time()
        with self.db.tx() as conn:
            violations.record(
                conn,
                found,
                runner_id=runner_id,
                source=source,
                at=utc_now(),
                ts=ts,
                job_id=job_id,
                unrecorded=held,
            )
            if runner_id is not None and contract == "RunnerHeartbeat":
                violations.note_refusal(conn, runner_id, refusal_text(contract, found), ts)
        more = f" ({held} more like it not logged)" if held else ""
        log.warning(
            "%s (from %s)%s",
            refusal_text(contract, found, limit=5),
            f"runner {runner_id}" if runner_id else f"an unidentified sender, {source}",
            more,
            extra={"contract": contract, "runnerId": runner_id, "jobId": job_id},
        )

    def unauthenticated(self, error: RunnerError) -> None:
        """A heartbeat refused before its body was read (401: no runnerToken, or an unknown
        one): not a contract violation, but the runner's row says why (rate-limited)."""
        peer = str(request.remote_addr or "?")
        if self.gate.admit((peer, "401")) is None:
            return
        raw = request.get_json(silent=True)
        runner_id, _source = self._sender(
            "RunnerHeartbeat", None, raw if isinstance(raw, dict) else {}, peer
        )
        reason = (
            "heartbeat refused: it carries no runnerToken (send Authorization: Bearer "
            "<runnerToken from the registration answer>)"
            if error.code == "MISSING_TOKEN"
            else f"heartbeat refused: {error.message}"
        )
        if runner_id is not None:
            try:
                with self.db.tx() as conn:
                    violations.note_refusal(conn, runner_id, reason, time.time())
            except Exception:  # the 401 itself must still be answered
                log.exception("recording a refused heartbeat failed")
        log.warning("%s (from %s)", reason, f"runner {runner_id}" if runner_id else peer)

    def _sender(
        self, contract: str, job_id: str | None, raw: Mapping[str, Any], peer: str
    ) -> tuple[str | None, str]:
        """(runner id or None, what the sender is known by) of a refused request."""
        holder = g.get("forge_runner")
        if isinstance(holder, str) and holder != ANY_RUNNER:
            return holder, peer  # its runnerToken says who it is
        with self.db.connection() as conn:
            if job_id is not None:
                row = conn.execute("SELECT runner_id FROM jobs WHERE id = ?", (job_id,)).fetchone()
                if row is not None and row[0]:
                    return str(row[0]), peer
            given = raw.get("runnerId")
            if isinstance(given, str) and is_uuid(given) and db.get_runner(conn, given):
                return given, peer
            health = raw.get("healthCheckEndpoint")
            if isinstance(health, str):
                same = db.runner_ids_with_health_url(conn, health)
                if len(same) == 1:
                    return str(same[0]), peer
            if contract == "RunnerHeartbeat":
                rows = conn.execute("SELECT id, base_url, health_url FROM runners").fetchall()
                here = [
                    r["id"]
                    for r in rows
                    if _same_place(peer, _host(str(r["base_url"] or r["health_url"])))
                ]
                if len(here) == 1:
                    return str(here[0]), peer
        said = [
            f"{k} {raw[k]!r:.80}" for k in ("name", "runnerId", "healthCheckEndpoint") if k in raw
        ]
        return None, f"{peer} ({', '.join(said)})" if said else peer

    # -- answers to POST /execute -----------------------------------------------------------

    def answer(
        self,
        claim: Claim,
        status: int,
        body: Any,
        outcome: Outcome,
        envelope: Mapping[str, Any] | None,
    ) -> Outcome:
        """``outcome`` of a runner's answer, once the answer is checked against its contract.

        ``body`` is the parsed answer (None: not JSON), ``envelope`` the valid ErrorEnvelope
        the dispatcher found in it. A conforming answer costs a few look-ups here.
        """
        if status == 202:
            return outcome
        if type(body) is dict:
            if 200 <= status < 300 or "jobId" in body or "runnerId" in body:
                if (envelope is not None or status < 300) and _fits(claim, body, envelope):
                    return outcome
            elif envelope is not None:
                return outcome  # a refusal: {"success": false, "error": <ErrorEnvelope>}
        found = answer_violations(claim, status, body, envelope)
        if not found:
            return outcome
        try:
            self._record_answer(claim, found)
        except Exception:  # the answer is still the job's outcome
            log.exception("recording the violations of job %s's answer failed", claim.job_id)
        if not self.strict or type(body) is not dict:
            # Not a JSON object (a proxy's HTML 502, a cut connection's scraps) need not be
            # the runner's own answer: recorded, and the attempt keeps its outcome (retries).
            return outcome
        first = found[0]
        return Outcome(
            success=False,
            error=make_envelope(
                "SCHEMA_MISMATCH",
                "CONTRACT_VIOLATION",
                f"Runner {claim.runner_id} answered attempt {claim.attempt} with HTTP {status} "
                f"that breaks {first.contract} ({first.path or 'the body'}: {first.message}); "
                "RUNNERKIT_FORGE_STRICT fails such answers",
                service=self.service,
                details=[
                    {
                        "message": v.message,
                        "path": v.path.split(".") if v.path else [],
                        "code": v.contract,
                    }
                    for v in found[: violations.MAX_PER_DOCUMENT]
                ],
                retryable=False,
                operation="dispatch",
                correlation_id=claim.correlation_id,
            ),
        )

    def _record_answer(self, claim: Claim, found: Sequence[Violation]) -> None:
        with self.db.tx() as conn:
            violations.record(
                conn,
                found,
                runner_id=claim.runner_id,
                source=claim.base_url,
                at=utc_now(),
                ts=time.time(),
                job_id=claim.job_id,
                attempt=claim.attempt,
            )
        held = self.answer_logs.admit(claim.runner_id)
        if held is not None:
            more = f" ({held} more answers of this runner broke it since)" if held else ""
            log.warning(
                "runner %s answered job %s attempt %d with a %s that breaks it: %s%s",
                claim.runner_id,
                claim.job_id,
                claim.attempt,
                found[0].contract,
                describe(found),
                more,
                extra={"runnerId": claim.runner_id, "jobId": claim.job_id},
            )


def _fits(claim: Claim, body: Mapping[str, Any], envelope: Mapping[str, Any] | None) -> bool:
    """Whether an answer is plainly a RunnerExecutionResponse for this attempt (no schema)."""
    if body.get("jobId") != claim.job_id or type(body.get("success")) is not bool:
        return False
    elapsed = body.get("executionTimeMs")
    if type(elapsed) not in (int, float) or not 0 <= float(elapsed or 0) < math.inf:
        return False
    runner_id = body.get("runnerId")
    if runner_id != claim.runner_id and not is_uuid(runner_id):
        return False
    if "error" not in body:
        return True
    error = body["error"]
    return envelope is not None and isinstance(error, dict) and error.get("id") == envelope["id"]


def answer_violations(
    claim: Claim, status: int, body: Any, envelope: Mapping[str, Any] | None
) -> list[Violation]:
    """Every way a runner's answer (HTTP ``status``, parsed ``body``) breaks its contract."""
    success = 200 <= status < 300
    if not isinstance(body, dict):
        kind = "not JSON" if body is None else f"a JSON {type(body).__name__}, not an object"
        wanted = "a RunnerExecutionResponse" if success else "an ErrorEnvelope"
        return [
            Violation(
                ANSWER if success else "ErrorEnvelope",
                "",
                f"the HTTP {status} answer is {kind}; expected {wanted}",
            )
        ]
    found: list[Violation] = []
    if success or "jobId" in body or "runnerId" in body:
        result = _VALIDATOR.validate(ANSWER, body)
        found += _violations(ANSWER, [vars(p) for p in result.errors])
        given = body.get("jobId")
        if is_uuid(given) and given != claim.job_id:
            found.append(
                Violation(ANSWER, "jobId", f"{given!r} is not the request's jobId {claim.job_id}")
            )
    if not success and envelope is None:
        if "error" in body or "category" not in body:
            candidate, prefix = body.get("error"), "error"
        else:
            candidate, prefix = body, ""
        if candidate is None:
            found.append(
                Violation(
                    "ErrorEnvelope", prefix, f"the HTTP {status} answer carries no ErrorEnvelope"
                )
            )
        else:
            result = _VALIDATOR.validate("ErrorEnvelope", candidate)
            known = {(v.path, v.message) for v in found}
            for v in _violations("ErrorEnvelope", [vars(p) for p in result.errors], prefix):
                if (v.path, v.message) not in known:
                    found.append(v)
    return found
