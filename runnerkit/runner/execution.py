"""One job's path through the runner: parse → validate → admit → run → respond.

Nothing here imports Flask: the blueprint hands in the raw body and headers and gets back an
:class:`~runnerkit.runner.job_answers.Answer` (status, JSON body, headers). That keeps the
hard rules of the contract in one place that tests can drive without a server. This module
holds the entry (:class:`Executor`): the signature check, parsing and validation of the
request, and admission (the ledger's claim, a slot, a job thread of this worker); running
the job and answering build on :mod:`~runnerkit.runner.job_running`,
:mod:`~runnerkit.runner.async_jobs` and :mod:`~runnerkit.runner.job_answers`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from typing import Any

from marshmallow import ValidationError

from runnerkit.contracts import is_uuid, load_execution_request
from runnerkit.errors import (
    Conflict,
    NotFound,
    RateLimited,
    RunnerError,
    Unauthenticated,
    Unavailable,
    ValidationFailed,
    details_from_validation_error,
)
from runnerkit.runner.async_jobs import AsyncJobs
from runnerkit.runner.capability import Capability
from runnerkit.runner.job_answers import (
    NO_PRIORITY,
    REPLAY_HEADER,
    UNKNOWN_CAPABILITY,
    Answer,
    PipelineJob,
    Rejection,
    SendEarly,
    or_new_id,
)
from runnerkit.runner.locks import Slot
from runnerkit.runner.serving import Serving
from runnerkit.runner.state import InstanceState
from runnerkit.runner.storage import STORAGE_ERRORS
from runnerkit.service.gil_locks import GILLock
from runnerkit.service.jsonbody import check_json_limits, parse_json_object
from runnerkit.service.metric_families import metrics
from runnerkit.service.metrics import labelled
from runnerkit.service.signing import SignatureError, replay_key, verify


def wants_async(headers: Mapping[str, str]) -> bool:
    """Whether the caller sent ``Prefer: respond-async`` (RFC 7240)."""
    prefer = headers.get("Prefer", "")
    return any(
        part.split(";", 1)[0].strip().lower() == "respond-async" for part in prefer.split(",")
    )


class Executor(AsyncJobs):
    """The ``/execute`` pipeline of one runner, shared by every request of a worker.

    Handed the pieces of the runner it reads, never the Runner itself: ``serving`` for what
    changes while it serves (settings, draining, the outbox), ``state`` for the instance
    state (made on first use), ``runner_id`` for the id answers carry (JobForge's once
    registered), ``app_context`` for an asynchronous job's own application context.
    """

    def __init__(
        self,
        *,
        serving: Serving,
        state: Callable[[], InstanceState],
        capabilities: Mapping[str, Capability],
        name: str,
        version: str,
        runner_id: Callable[[], str],
        app_context: Callable[[], AbstractContextManager[Any]],
    ) -> None:
        self._serving = serving
        self._state = state
        self._capabilities = capabilities
        self._name = name
        self._version = version
        self._runner_id = runner_id
        self._app_context = app_context
        self._in_flight = 0
        self._in_flight_lock = GILLock()
        #: Request threads of this worker, when the worker sized them after the app loaded
        #: (:func:`runnerkit.gunicorn_worker.fit_threads`); else ``settings.worker_threads``.
        self.worker_threads: int | None = None

    @property
    def in_flight(self) -> int:
        """Jobs whose code is still running in this worker (including timed-out ones)."""
        return self._in_flight

    def execute(
        self,
        raw: bytes,
        content_type: str | None,
        headers: Mapping[str, str],
        send_early: SendEarly | None = None,
    ) -> Answer:
        """Answer one ``POST /execute``.

        ``send_early``: the server can send an answer while the request is still in the app
        (see :meth:`~.job_running.JobRunning._execute`); an answer it sent comes back with
        ``sent`` set, logged already.
        """
        started = time.monotonic()
        job_id: str | None = None
        # A new id is made only when neither the body nor the header brings one.
        correlation_id = _given_correlation(headers)
        capability_id = ""
        try:
            signed = self._verify(raw, headers)
            body = parse_json_object(raw, content_type)
            check_json_limits(
                body,
                self._serving.settings.max_json_depth,
                self._serving.settings.max_json_keys,
                raw,
            )
            job_id = _known_job_id(body)
            request = self._load_request(body, job_id)
            job_id = request["jobId"]
            capability_id = request["capabilityId"]
            correlation_id = or_new_id(request["metadata"].get("correlationId") or correlation_id)
            answer = self._run(request, correlation_id, started, headers, signed, send_early)
            if answer.sent:
                return answer
        except Rejection as rejection:
            job_id = rejection.job_id or job_id
            correlation_id = or_new_id(correlation_id)
            answer = self._failure(rejection.error, job_id, correlation_id, started)
        except RunnerError as error:
            correlation_id = or_new_id(correlation_id)
            answer = self._failure(error, job_id, correlation_id, started)
        except STORAGE_ERRORS as exc:
            correlation_id = or_new_id(correlation_id)
            answer = self._failure(self.storage_error(exc), job_id, correlation_id, started)
        answer.headers.setdefault("X-Correlation-Id", correlation_id)
        self._log(answer, job_id, capability_id, correlation_id, started)
        return answer

    def reject(self, error: RunnerError, headers: Mapping[str, str]) -> Answer:
        """Answer a request refused before its body could be read (e.g. too large)."""
        started = time.monotonic()
        correlation_id = or_new_id(_given_correlation(headers))
        answer = self._failure(error, None, correlation_id, started)
        answer.headers.setdefault("X-Correlation-Id", correlation_id)
        self._log(answer, None, "", correlation_id, started)
        return answer

    def _verify(self, raw: bytes, headers: Mapping[str, str]) -> bytes:
        """Check the signature before the body is parsed, looked up or run; the digest of
        what a signed request's signature covers (b"" when signing is off)."""
        settings = self._serving.settings
        secrets = [settings.signing_secret, settings.signing_secret_previous]
        if not settings.signing_secret:
            return b""
        try:
            verify(
                headers,
                raw,
                secrets,
                max_age_s=settings.signature_max_age_s,
                max_future_s=settings.signature_max_future_s,
            )
        except SignatureError as exc:
            raise Unauthenticated(exc.message, code=exc.code) from None
        return replay_key(headers, raw)

    def _load_request(self, body: dict[str, Any], job_id: str | None) -> dict[str, Any]:
        try:
            request = load_execution_request(body)
        except ValidationError as exc:
            raise Rejection(
                ValidationFailed(
                    "The execution request does not match RunnerExecutionRequest",
                    details=details_from_validation_error(exc, data=body),
                ),
                job_id,
            ) from None
        return request

    def _run(
        self,
        request: dict[str, Any],
        correlation_id: str,
        started: float,
        headers: Mapping[str, str],
        signed: bytes = b"",
        send_early: SendEarly | None = None,
    ) -> Answer:
        job_id = request["jobId"]
        capability = self._capabilities.get(request["capabilityId"])
        # Label values come from the runner's own capabilities only: a caller inventing ids
        # must not be able to grow /metrics without bound.
        label = capability.id if capability is not None else UNKNOWN_CAPABILITY
        labelled(metrics().jobs_received, label, NO_PRIORITY).inc()
        if capability is None:
            known = ", ".join(sorted(self._capabilities)) or "none"
            raise Rejection(
                NotFound(
                    f"Unknown capability {request['capabilityId']!r} (this runner has: {known})",
                    code="CAPABILITY_NOT_FOUND",
                    details=[{"message": "Unknown capability", "path": ["capabilityId"]}],
                ),
                job_id,
            )
        try:
            payload = capability.load_input(request["payload"])
        except ValidationError as exc:
            raise Rejection(
                ValidationFailed(
                    f"The payload does not match the input schema of {capability.id!r}",
                    code="PAYLOAD_INVALID",
                    details=details_from_validation_error(
                        exc, prefix=("payload",), data=request["payload"]
                    ),
                ),
                job_id,
            ) from None
        if self._serving.draining:
            raise Rejection(
                Unavailable(
                    "The runner is shutting down and takes no new jobs",
                    code="SHUTTING_DOWN",
                    retry_after=self._serving.settings.rate_limit_retry_after_s,
                ),
                job_id,
            )
        timeout_ms = min(float(request["timeoutMs"]), float(capability.timeout_ms))
        job = PipelineJob(capability, payload, job_id, correlation_id, timeout_ms, started)
        asynchronous = self._serving.outbox is not None and wants_async(headers)
        state = self._state()
        claim = state.ledger.claim(
            job_id,
            queued=asynchronous,
            correlation_id=correlation_id,
            capability=capability.id,
            signed=signed,
        )
        if claim.outcome == "replay":
            assert claim.body is not None
            return Answer(claim.status, claim.body, {REPLAY_HEADER: "true"})
        if claim.outcome == "running":
            raise Rejection(
                Conflict(
                    f"Job {job_id} is already running on this runner",
                    code="JOB_ALREADY_RUNNING",
                    retryable=True,
                    retry_after=self._serving.settings.rate_limit_retry_after_s,
                ),
                job_id,
            )
        # Everything taken from here on is given back on any exception, a storage error
        # included, until the job's code owns it: its job lock and row, then its slot and
        # this worker's count of jobs in flight. (try/finally with flags: an ExitStack
        # would cost ~5 µs per job on the fast path.)
        slot: Slot | None = None
        admitted = handed_over = False
        try:
            if asynchronous:
                limit = self._serving.settings.max_queued_jobs
                if state.ledger.queued() > limit:  # this job included
                    raise Rejection(
                        RateLimited(
                            f"This runner already holds {limit} asynchronous jobs waiting to start",
                            code="QUEUE_FULL",
                            retry_after=self._serving.settings.rate_limit_retry_after_s,
                        ),
                        job_id,
                    )
                self._first_delivery(signed, job_id, claim.signed_before)
                answer = self._accept_async(job)
                handed_over = True  # the job's thread owns its claim now
                return answer
            slot = state.slots.acquire(capability.id)
            if slot is None:
                raise Rejection(
                    RateLimited(
                        f"{capability.id!r} is running its maximum of "
                        f"{capability.max_concurrency} concurrent jobs",
                        code="CAPACITY_EXCEEDED",
                        retry_after=self._serving.settings.rate_limit_retry_after_s,
                    ),
                    job_id,
                )
            self._admit(job_id)
            admitted = True
            self._first_delivery(signed, job_id, claim.signed_before)
            handed_over = True  # _execute gives them back when the code returns
        finally:
            if not handed_over:
                try:
                    if admitted:
                        self._done()
                    if slot is not None:
                        state.slots.release(slot)
                finally:
                    state.ledger.release(job_id, recorded=claim.recorded)
        if send_early is not None:
            send_early = self._sending(send_early, job)
        answer = self._execute(job, slot, send_early)
        try:
            self._record_truth(job, answer, send_now=False)
        except STORAGE_ERRORS as exc:
            # The job ran and its caller is owed its answer; TruthCore misses this record.
            self._state().storage.failed(exc)
        return answer

    def _sending(self, send_early: SendEarly, job: PipelineJob) -> SendEarly:
        """``send_early`` for an answer sent before the request ends: finished and logged as
        :meth:`execute` finishes the answers it returns."""

        def send(answer: Answer) -> None:
            answer.headers.setdefault("X-Correlation-Id", job.correlation_id)
            self._log(answer, job.job_id, job.capability.id, job.correlation_id, job.started)
            send_early(answer)

        return send

    def _first_delivery(self, signed: bytes, job_id: str, in_file: bool | None) -> None:
        """Refuse a signed request that already reached a run (401 EVENT_REPLAYED).

        The ControlPlane scheme's duplicate-event record, keyed on the digest of what the
        signature covers (timestamp and body), not on the unsigned x-webhook-event-id that a
        copy may change or leave out. Kept after the signature check (so a forgery cannot
        spend a real request) and only once the job would really run: a redelivery is still
        answered from the ledger or with 409, and a request refused at capacity (429/503) may
        be sent again as it was.
        """
        if not signed or self._state().ledger.first_sight(signed, job_id, in_file):
            return
        raise Rejection(
            Unauthenticated(
                "This signed request (its timestamp and body) was delivered before; "
                "a new attempt is signed anew",
                code="EVENT_REPLAYED",
            ),
            job_id,
        )

    def _admit(self, job_id: str) -> None:
        """Take a job thread in this worker, keeping the reserved request threads free."""
        settings = self._serving.settings
        threads = self.worker_threads or settings.worker_threads
        limit = threads - settings.reserved_threads if threads else 0
        with self._in_flight_lock:
            if threads and self._in_flight >= max(1, limit):
                raise Rejection(
                    Unavailable(
                        "This worker is busy; its remaining threads are reserved for health checks",
                        code="WORKER_BUSY",
                        retry_after=settings.rate_limit_retry_after_s,
                    ),
                    job_id,
                )
            self._in_flight += 1


def _known_job_id(body: Mapping[str, Any]) -> str | None:
    value = body.get("jobId")
    return value if is_uuid(value) else None


def _given_correlation(headers: Mapping[str, str]) -> str:
    """The caller's ``X-Correlation-Id`` when it is a uuid, else ``""``."""
    value = headers.get("X-Correlation-Id", "")
    return value if is_uuid(value) else ""
