"""One job's path through the runner: parse → validate → admit → run → respond.

Nothing here imports Flask: the blueprint hands in the raw body and headers and gets back an
:class:`Answer` (status, JSON body, headers). That keeps the hard rules of the contract in one
place that tests can drive without a server.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import json
import logging
import math
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from marshmallow import ValidationError

from runnerkit.contracts import is_uuid, load_execution_request, utc_now
from runnerkit.errors import (
    Conflict,
    NotFound,
    RateLimited,
    RunnerError,
    SchemaMismatch,
    Timeout,
    Unauthenticated,
    Unavailable,
    ValidationFailed,
    build_envelope,
    details_from_validation_error,
    traceback_text,
    unexpected_envelope,
)
from runnerkit.runner.capability import Capability, Context, Progress
from runnerkit.runner.isolation import run_isolated
from runnerkit.runner.locks import Slot
from runnerkit.runner.storage import STORAGE_ERRORS, LedgerReplaced
from runnerkit.service.jsonbody import check_json_limits, parse_json_object
from runnerkit.service.logs import emit, log_context
from runnerkit.service.metric_families import metrics
from runnerkit.service.metrics import labelled
from runnerkit.service.signing import SignatureError, request_digest, verify

if TYPE_CHECKING:
    from runnerkit.runner.app import Runner

job_log = logging.getLogger("runnerkit.job")

#: The ``priority`` label of runner-side job metrics: JobForge does not send it to runners.
NO_PRIORITY = "unknown"

#: The ``capability`` label of jobs naming a capability this runner does not have.
UNKNOWN_CAPABILITY = "unknown"

#: Progress events are sent at most this often per job (the last one always).
PROGRESS_MIN_INTERVAL_S = 1.0

#: How often an accepted asynchronous job waiting for a slot looks again (and at a drain).
QUEUE_POLL_S = 0.05

#: How long past its deadline a process-isolated job's answer waits for the kill of its
#: process (SIGKILL and reaping take milliseconds; this only bounds a pathological case).
ISOLATED_KILL_WAIT_S = 2.0

#: Header on an answer replayed from the idempotency ledger instead of a new execution.
REPLAY_HEADER = "Idempotent-Replayed"


@dataclass
class _Job:
    """A validated job on its way through the pipeline."""

    capability: Capability
    payload: dict[str, Any]
    job_id: str
    correlation_id: str
    timeout_ms: float
    started: float

    def remaining_ms(self) -> float:
        return max(0.0, self.timeout_ms - (time.monotonic() - self.started) * 1000.0)


def wants_async(headers: Mapping[str, str]) -> bool:
    """Whether the caller sent ``Prefer: respond-async`` (RFC 7240)."""
    prefer = headers.get("Prefer", "")
    return any(
        part.split(";", 1)[0].strip().lower() == "respond-async" for part in prefer.split(",")
    )


@dataclass
class Answer:
    """What the HTTP layer sends back."""

    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)
    _json: str | None = field(default=None, repr=False, compare=False)
    #: The traceback of an unexpected exception, for the job's log line (never sent).
    exception: str | None = field(default=None, repr=False, compare=False)

    def json(self) -> str:
        """The body as JSON text, encoded once for both the ledger and the response.

        Raises TypeError/ValueError for a body JSON cannot carry (an object a capability's
        ``Raw`` field let through, NaN).
        """
        if self._json is None:
            self._json = _ENCODER.encode(self.body)
        return self._json


#: Compact, ASCII-safe (a lone surrogate in a result cannot break the encoding) and strict:
#: NaN and Infinity are not JSON.
_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)


class _Rejection(Exception):
    """Internal: stop the pipeline with this error and whatever is known of the job."""

    def __init__(self, error: RunnerError, job_id: str | None = None) -> None:
        super().__init__(error.message)
        self.error = error
        self.job_id = job_id


class JobThreads:
    """Reusable daemon threads for capability code (a new thread per job costs more than a
    small job itself).

    Daemon threads, unlike ``concurrent.futures``' workers, never hold a process's exit
    hostage to a capability that ignores its deadline; gunicorn's graceful timeout bounds the
    drain. Each submitted call either reuses an idle thread or starts a new one.
    """

    def __init__(self, name: str = "runnerkit-job") -> None:
        self._calls: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0
        self._name = name

    def submit(self, call: Callable[[], None]) -> None:
        with self._lock:
            reuse = self._idle > 0
            if reuse:
                self._idle -= 1
        if not reuse:
            threading.Thread(target=self._work, name=self._name, daemon=True).start()
        self._calls.put(call)

    def _work(self) -> None:
        while True:
            self._calls.get()()
            with self._lock:
                self._idle += 1


_POOL: JobThreads | None = None
_POOL_LOCK = threading.Lock()


def _job_pool() -> JobThreads:
    """The process's job threads (made anew after fork: threads do not survive it)."""
    global _POOL
    pool = _POOL
    if pool is None:
        with _POOL_LOCK:
            if _POOL is None:
                _POOL = JobThreads()
            pool = _POOL
    return pool


def _forget_pool_after_fork() -> None:
    global _POOL, _POOL_LOCK
    _POOL, _POOL_LOCK = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_pool_after_fork)


class _JobThread:
    """Runs one capability call on a job thread so the request can answer at the deadline.

    Python cannot kill a thread: when the deadline passes the request answers ``TIMEOUT`` and
    the thread runs on until the code returns. ``on_done`` fires only then, which is what keeps
    a concurrency slot honestly occupied and the ledger entry ``running``.
    """

    def __init__(self, target: Callable[[], Any], on_done: Callable[[], None]) -> None:
        self._target = target
        self._on_done = on_done
        # Held until the code returns: the request thread waits by acquiring it, one C-level
        # call (an Event would add a Condition and its own lock per job).
        self._running = threading.Lock()
        self._running.acquire()
        self._finished = False
        self._lock = threading.Lock()
        self._after_abandoned: Callable[[], None] | None = None
        self.result: Any = None
        self.error: BaseException | None = None
        self.finished_at = 0.0

    def start(self) -> None:
        _job_pool().submit(self._run)

    def run_here(self) -> None:
        """Run on the calling thread (``isolation = "inline"``): no hand-off, and no answer
        before the code returns; an answer that comes late is still a ``TIMEOUT``."""
        self._run()

    def _run(self) -> None:
        try:
            self.result = self._target()
        except BaseException as exc:  # noqa: BLE001 - every failure becomes an envelope
            self.error = exc
        finally:
            self.finished_at = time.monotonic()
            # The slot is free before the request answers, so a caller that sends its next
            # job on the answer never finds this one's slot still taken.
            self._on_done()
            with self._lock:
                self._finished = True
                after = self._after_abandoned
            self._running.release()
            if after is not None:
                after()

    def wait(self, timeout_s: float) -> bool:
        if self._running.acquire(timeout=max(0.0, timeout_s)):
            self._running.release()
            return True
        return False

    def abandon(self, after: Callable[[], None]) -> bool:
        """Stop waiting: ``after`` runs when the code finally returns. False if it already has."""
        with self._lock:
            if self._finished:
                return False
            self._after_abandoned = after
            return True


class Executor:
    """The ``/execute`` pipeline of one runner, shared by every request of a worker."""

    def __init__(self, runner: Runner) -> None:
        self.runner = runner
        self._in_flight = 0
        self._in_flight_lock = threading.Lock()
        #: Request threads of this worker, when the worker sized them after the app loaded
        #: (:func:`runnerkit.gunicorn_worker.fit_threads`); else ``settings.worker_threads``.
        self.worker_threads: int | None = None

    @property
    def in_flight(self) -> int:
        """Jobs whose code is still running in this worker (including timed-out ones)."""
        return self._in_flight

    def execute(self, raw: bytes, content_type: str | None, headers: Mapping[str, str]) -> Answer:
        """Answer one ``POST /execute``."""
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
                self.runner.settings.max_json_depth,
                self.runner.settings.max_json_keys,
                raw,
            )
            job_id = _known_job_id(body)
            request = self._load_request(body, job_id)
            job_id = request["jobId"]
            capability_id = request["capabilityId"]
            correlation_id = _or_new(request["metadata"].get("correlationId") or correlation_id)
            answer = self._run(request, correlation_id, started, headers, signed)
        except _Rejection as rejection:
            job_id = rejection.job_id or job_id
            correlation_id = _or_new(correlation_id)
            answer = self._failure(rejection.error, job_id, correlation_id, started)
        except RunnerError as error:
            correlation_id = _or_new(correlation_id)
            answer = self._failure(error, job_id, correlation_id, started)
        except STORAGE_ERRORS as exc:
            correlation_id = _or_new(correlation_id)
            answer = self._failure(self.storage_error(exc), job_id, correlation_id, started)
        answer.headers.setdefault("X-Correlation-Id", correlation_id)
        self._log(answer, job_id, capability_id, correlation_id, started)
        return answer

    def storage_error(self, exc: BaseException) -> Unavailable:
        """The retryable 503 for a job the instance's state could not take.

        A replaced ledger is ``LEDGER_REPLACED`` (for good, until a restart); any other
        failure (disk full, I/O error) is ``STATE_UNAVAILABLE`` and turns readiness
        unhealthy until a write succeeds again (:class:`~runnerkit.state.StorageHealth`).
        """
        retry_after = self.runner.settings.rate_limit_retry_after_s
        if isinstance(exc, LedgerReplaced):
            return Unavailable(
                "This runner's idempotency ledger was deleted or replaced while it ran; "
                "it takes no new jobs until it is restarted",
                code="LEDGER_REPLACED",
                retry_after=retry_after,
            )
        self.runner.state.storage.failed(exc)
        return Unavailable(
            "This runner cannot write its state right now (disk full or I/O error); "
            "try again later",
            code="STATE_UNAVAILABLE",
            retry_after=retry_after,
        )

    def reject(self, error: RunnerError, headers: Mapping[str, str]) -> Answer:
        """Answer a request refused before its body could be read (e.g. too large)."""
        started = time.monotonic()
        correlation_id = _or_new(_given_correlation(headers))
        answer = self._failure(error, None, correlation_id, started)
        answer.headers.setdefault("X-Correlation-Id", correlation_id)
        self._log(answer, None, "", correlation_id, started)
        return answer

    def _verify(self, raw: bytes, headers: Mapping[str, str]) -> bytes:
        """Check the signature before the body is parsed, looked up or run; the digest of
        what a signed request's signature covers (b"" when signing is off)."""
        settings = self.runner.settings
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
        return request_digest(headers, raw)

    def _load_request(self, body: dict[str, Any], job_id: str | None) -> dict[str, Any]:
        try:
            request = load_execution_request(body)
        except ValidationError as exc:
            raise _Rejection(
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
    ) -> Answer:
        job_id = request["jobId"]
        capability = self.runner.capabilities.get(request["capabilityId"])
        # Label values come from the runner's own capabilities only: a caller inventing ids
        # must not be able to grow /metrics without bound.
        label = capability.id if capability is not None else UNKNOWN_CAPABILITY
        labelled(metrics().jobs_received, label, NO_PRIORITY).inc()
        if capability is None:
            known = ", ".join(sorted(self.runner.capabilities)) or "none"
            raise _Rejection(
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
            raise _Rejection(
                ValidationFailed(
                    f"The payload does not match the input schema of {capability.id!r}",
                    code="PAYLOAD_INVALID",
                    details=details_from_validation_error(
                        exc, prefix=("payload",), data=request["payload"]
                    ),
                ),
                job_id,
            ) from None
        if self.runner.draining:
            raise _Rejection(
                Unavailable(
                    "The runner is shutting down and takes no new jobs",
                    code="SHUTTING_DOWN",
                    retry_after=self.runner.settings.rate_limit_retry_after_s,
                ),
                job_id,
            )
        timeout_ms = min(float(request["timeoutMs"]), float(capability.timeout_ms))
        job = _Job(capability, payload, job_id, correlation_id, timeout_ms, started)
        asynchronous = self.runner.outbox is not None and wants_async(headers)
        state = self.runner.state
        claim = state.ledger.claim(
            job_id, queued=asynchronous, correlation_id=correlation_id, capability=capability.id
        )
        if claim.outcome == "replay":
            assert claim.body is not None
            return Answer(claim.status, claim.body, {REPLAY_HEADER: "true"})
        if claim.outcome == "running":
            raise _Rejection(
                Conflict(
                    f"Job {job_id} is already running on this runner",
                    code="JOB_ALREADY_RUNNING",
                    retryable=True,
                    retry_after=self.runner.settings.rate_limit_retry_after_s,
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
                limit = self.runner.settings.max_queued_jobs
                if state.ledger.queued() > limit:  # this job included
                    raise _Rejection(
                        RateLimited(
                            f"This runner already holds {limit} asynchronous jobs waiting to start",
                            code="QUEUE_FULL",
                            retry_after=self.runner.settings.rate_limit_retry_after_s,
                        ),
                        job_id,
                    )
                self._first_delivery(signed, job_id)
                answer = self._accept_async(job)
                handed_over = True  # the job's thread owns its claim now
                return answer
            slot = state.slots.acquire(capability.id)
            if slot is None:
                raise _Rejection(
                    RateLimited(
                        f"{capability.id!r} is running its maximum of "
                        f"{capability.max_concurrency} concurrent jobs",
                        code="CAPACITY_EXCEEDED",
                        retry_after=self.runner.settings.rate_limit_retry_after_s,
                    ),
                    job_id,
                )
            self._admit(job_id)
            admitted = True
            self._first_delivery(signed, job_id)
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
        answer = self._execute(job, slot)
        try:
            self._record_truth(job, answer, send_now=False)
        except STORAGE_ERRORS as exc:
            # The job ran and its caller is owed its answer; TruthCore misses this record.
            self.runner.state.storage.failed(exc)
        return answer

    def _execute(self, job: _Job, slot: Slot) -> Answer:
        """Run a claimed job holding ``slot``; answer at its deadline at the latest.

        The ledger entry is completed with the answer given; after a timeout that happens only
        when the code really stops, so a redelivery meanwhile is told the job still runs.
        """
        state = self.runner.state
        ctx = Context(
            job_id=job.job_id,
            capability_id=job.capability.id,
            correlation_id=job.correlation_id,
            timeout_ms=job.remaining_ms(),
            on_progress=self._progress_sender(job),
        )

        active = labelled(metrics().active_jobs, job.capability.id)
        active.inc()

        def release() -> None:
            state.slots.release(slot)
            active.dec()
            self._done()

        capability, payload = job.capability, job.payload

        def call() -> Any:
            with log_context(jobId=job.job_id, correlationId=job.correlation_id):
                if capability.isolation == "process":
                    return run_isolated(capability, payload, ctx)
                return capability.dump_output(capability.run(payload, ctx))

        if capability.isolation == "inline":
            thread = _JobThread(call, release)
            thread.run_here()
        else:
            # The code runs in this thread's context, the app's context included: Flask's
            # ``current_app`` and the extensions built on it work on the job thread (and in
            # a process-isolated child, forked from it) as they do in the request.
            thread = _JobThread(functools.partial(contextvars.copy_context().run, call), release)
            try:
                thread.start()
            except BaseException:
                # No thread to run the code (or to give anything back): do it here.
                release()
                state.ledger.release(job.job_id)
                raise
        in_time = thread.wait(ctx.remaining_ms / 1000.0)
        if not in_time and capability.isolation == "process":
            # Its process is being killed right now: answer once that is done, so the slot
            # is free when the caller hears TIMEOUT and may send the next job.
            thread.wait(ISOLATED_KILL_WAIT_S)
        if not in_time or thread.finished_at >= ctx.deadline_monotonic:
            # Past the deadline the caller is owed a TIMEOUT, also when the code returned just
            # then because ctx.wait/ctx.cancelled cut it short: never its partial result.
            ctx.cancel()
            timeout = Timeout(
                f"{capability.id!r} did not finish within {job.timeout_ms:g} ms",
                code="DEADLINE_EXCEEDED",
            )
            answer = self._failure(timeout, job.job_id, job.correlation_id, job.started)
            complete = functools.partial(self._store, job.job_id, answer)
            if not thread.abandon(complete):
                complete()
            return answer
        answer = self._encodable(
            self._outcome(thread, job.job_id, job.correlation_id, job.started), job
        )
        self._store(job.job_id, answer)
        return answer

    def _store(self, job_id: str, answer: Answer) -> None:
        """Record a finished job's answer in the ledger, which frees its job lock.

        When that write fails (a full disk) the answer computed is still the caller's: it
        is sent, the failure is logged and turns readiness unhealthy, and the job lock is
        free all the same. The ledger then holds no answer for the job, so a redelivery
        runs it again (a new attempt) instead of replaying it: at least once, never lost.
        """
        state = self.runner.state
        try:
            state.ledger.complete(job_id, answer.status, answer.json())
        except STORAGE_ERRORS as exc:
            state.ledger.running.release(job_id)  # if the failure came before complete's own
            state.storage.failed(exc)
            emit(
                job_log,
                logging.ERROR,
                "job answer not stored",
                {"jobId": job_id, "status": answer.status, "error": f"{type(exc).__name__}"},
            )
            return
        if state.storage.failure:
            state.storage.recovered()

    def _encodable(self, answer: Answer, job: _Job) -> Answer:
        """``answer``, or SCHEMA_MISMATCH when its data cannot be sent as JSON."""
        try:
            answer.json()
        except (TypeError, ValueError) as exc:
            error = SchemaMismatch(
                f"{type(job.capability).__name__}.run returned a value JSON cannot carry: "
                f"{str(exc)[:200]}",
                details=[{"message": str(exc)[:200], "path": ["data"]}],
            )
            return self._failure(error, job.job_id, job.correlation_id, job.started)
        return answer

    def _outcome(
        self, thread: _JobThread, job_id: str, correlation_id: str, started: float
    ) -> Answer:
        if thread.error is None:
            return self._answer(200, job_id, True, started, data=thread.result)
        if isinstance(thread.error, RunnerError):
            return self._failure(thread.error, job_id, correlation_id, started)
        # Anything else, a marshmallow ValidationError of the author's own included, is an
        # unexpected failure of the capability, not a fault of the caller's input.
        envelope = unexpected_envelope(
            thread.error,
            service=self.runner.name,
            operation="execute",
            correlation_id=correlation_id,
            log_traceback=False,
        )
        answer = self._answer(500, job_id, False, started, error=envelope)
        # Logged in the job's own line, with its ids, not on a line of its own without them.
        answer.exception = traceback_text(thread.error)
        return answer

    # -- asynchronous jobs ------------------------------------------------------------

    def _accept_async(self, job: _Job) -> Answer:
        """Answer 202 now; run when a slot frees up; deliver the result through the outbox.

        The thread is not a daemon: a worker that is told to stop waits for it (within
        gunicorn's graceful timeout) instead of dropping an accepted job.
        """
        threading.Thread(
            target=self._run_async, args=(job,), name=f"runnerkit-async-{job.job_id}"
        ).start()
        body = {"jobId": job.job_id, "accepted": True, "runnerId": self.runner.runner_id}
        return Answer(202, body, {"Preference-Applied": "respond-async"})

    def _run_async(self, job: _Job) -> None:
        # The request that accepted the job has ended: the job gets an app context of its own.
        with self.runner.app_context():
            self._run_async_job(job)

    def _run_async_job(self, job: _Job) -> None:
        state = self.runner.state
        try:
            answer = self._run_queued(job)
        except STORAGE_ERRORS as exc:
            # Its claim is given back already: a retryable failure the forge may retry.
            answer = self._failure(
                self.storage_error(exc), job.job_id, job.correlation_id, job.started
            )
        except Exception as exc:  # noqa: BLE001 - an accepted job always gets an answer
            envelope = build_envelope(
                exc,
                service=self.runner.name,
                operation="execute",
                correlation_id=job.correlation_id,
                log_traceback=False,
            )
            answer = self._answer(500, job.job_id, False, job.started, error=envelope)
            if not isinstance(exc, RunnerError):
                answer.exception = traceback_text(exc)
            self._store(job.job_id, answer)
        self._log(answer, job.job_id, job.capability.id, job.correlation_id, job.started)
        try:
            self.deliver_result(job.job_id, job.correlation_id, answer.body)
            self._record_truth(job, answer, send_now=True)
        except STORAGE_ERRORS as exc:
            # Not even the outbox can be written: JobForge hears nothing and retries the
            # job once its attempt is overdue; the ledger holds no answer, so it runs again.
            state.storage.failed(exc)
            log_error = f"{type(exc).__name__}"
            emit(
                job_log,
                logging.ERROR,
                "job result not queued for delivery",
                {"jobId": job.job_id, "error": log_error},
            )

    def _run_queued(self, job: _Job) -> Answer:
        """Wait for a slot, then run: the accepted job's claim is given back on any
        exception raised before its code owns the slot.

        Waiting jobs get slots first come, first served across the instance: a job takes a
        free slot only when fewer jobs accepted before it (by any worker) still wait than
        slots are free (:meth:`Ledger.ahead`). A job still waiting when its worker drains
        never starts: it is answered with a retryable ``SHUTTING_DOWN`` (delivered through
        the outbox, like any result), so JobForge sends it again elsewhere or later.
        """
        state = self.runner.state
        capability_id = job.capability.id
        with contextlib.ExitStack() as undo:
            undo.callback(state.ledger.release, job.job_id)
            slot = None
            error: RunnerError | None = None
            while slot is None:
                if self.runner.draining:
                    error = Unavailable(
                        "The runner is shutting down; this job was accepted but not started",
                        code="SHUTTING_DOWN",
                        retry_after=self.runner.settings.rate_limit_retry_after_s,
                    )
                    break
                if job.remaining_ms() <= 0:
                    error = Timeout(
                        f"{capability_id!r} found no free slot within {job.timeout_ms:g} ms",
                        code="DEADLINE_EXCEEDED",
                    )
                    break
                # The slots first (no write, no read of the ledger while none is free).
                free = state.slots.limits[capability_id] - state.slots.in_use(capability_id)
                if free > 0 and state.ledger.ahead(job.job_id, capability_id) < free:
                    slot = state.slots.acquire(capability_id)
                if slot is None:
                    time.sleep(QUEUE_POLL_S)
            if slot is None:
                assert error is not None
                answer = self._failure(error, job.job_id, job.correlation_id, job.started)
                undo.pop_all()
                self._store(job.job_id, answer)
                return answer
            undo.callback(state.slots.release, slot)
            with self._in_flight_lock:
                self._in_flight += 1
            undo.callback(self._done)
            state.ledger.start(job.job_id)
            undo.pop_all()  # _execute gives them back when the code returns
        return self._execute(job, slot)

    def deliver_result(self, job_id: str, correlation_id: str, body: dict[str, Any]) -> None:
        """Queue an asynchronous job's RunnerExecutionResponse for JobForge and try it now."""
        outbox = self.runner.outbox
        if outbox is None:
            return
        url = outbox.client.url_for(f"/jobs/{job_id}/result")
        outbox.add("result", url, body, {"X-Correlation-Id": correlation_id}, send_now=True)

    def _record_truth(self, job: _Job, answer: Answer, *, send_now: bool) -> None:
        """Record a finished job in TruthCore (status and result) through the outbox."""
        outbox = self.runner.outbox
        base = self.runner.settings.truthcore_url
        if outbox is None or not base:
            return
        success = bool(answer.body.get("success"))
        result = answer.body.get("data") if success else answer.body.get("error")
        headers = {"X-Correlation-Id": job.correlation_id}
        for predicate, value in (
            ("status", "completed" if success else "failed"),
            ("result", result),
        ):
            assertion = {
                "id": str(uuid.uuid4()),
                "subject": job.job_id,
                "predicate": predicate,
                "object": value,
                "source": self.runner.name,
                "confidence": 1,
                "timestamp": utc_now(),
                "metadata": {"capabilityId": job.capability.id, "runnerId": self.runner.runner_id},
            }
            outbox.add("assertion", f"{base}/assert", assertion, headers, send_now=send_now)

    def _progress_sender(self, job: _Job) -> Callable[[Progress], None] | None:
        """Report ``ctx.progress`` to JobForge as job.progress events, at most one a second."""
        outbox = self.runner.outbox
        if outbox is None:
            return None
        url = outbox.client.url_for(f"/jobs/{job.job_id}/events")
        last = [0.0]

        def send(update: Progress) -> None:
            now = time.monotonic()
            if now - last[0] < PROGRESS_MIN_INTERVAL_S and update.percent < 100:
                return
            last[0] = now
            event = {
                "id": str(uuid.uuid4()),
                "type": "job.progress",
                "jobId": job.job_id,
                "timestamp": utc_now(),
                "data": {"percent": update.percent, "message": update.message},
                "metadata": {"service": self.runner.name, "version": self.runner.version},
            }
            try:
                outbox.add("event", url, event, {"X-Correlation-Id": job.correlation_id})
            except STORAGE_ERRORS as exc:
                # Progress is advice: a full disk drops the event, not the job.
                self.runner.state.storage.failed(exc)

        return send

    def _first_delivery(self, signed: bytes, job_id: str) -> None:
        """Refuse a signed request that already reached a run (401 EVENT_REPLAYED).

        The ControlPlane scheme's duplicate-event record, keyed on the digest of what the
        signature covers (timestamp and body), not on the unsigned x-webhook-event-id that a
        copy may change or leave out. Kept after the signature check (so a forgery cannot
        spend a real request) and only once the job would really run: a redelivery is still
        answered from the ledger or with 409, and a request refused at capacity (429/503) may
        be sent again as it was.
        """
        if not signed or self.runner.state.ledger.first_sight(signed):
            return
        raise _Rejection(
            Unauthenticated(
                "This signed request (its timestamp and body) was delivered before; "
                "a new attempt is signed anew",
                code="EVENT_REPLAYED",
            ),
            job_id,
        )

    def _admit(self, job_id: str) -> None:
        """Take a job thread in this worker, keeping the reserved request threads free."""
        settings = self.runner.settings
        threads = self.worker_threads or settings.worker_threads
        limit = threads - settings.reserved_threads if threads else 0
        with self._in_flight_lock:
            if threads and self._in_flight >= max(1, limit):
                raise _Rejection(
                    Unavailable(
                        "This worker is busy; its remaining threads are reserved for health checks",
                        code="WORKER_BUSY",
                        retry_after=settings.rate_limit_retry_after_s,
                    ),
                    job_id,
                )
            self._in_flight += 1

    def _done(self) -> None:
        with self._in_flight_lock:
            self._in_flight -= 1

    def _failure(
        self, error: RunnerError, job_id: str | None, correlation_id: str, started: float
    ) -> Answer:
        envelope = build_envelope(
            error, service=self.runner.name, operation="execute", correlation_id=correlation_id
        )
        answer = self._answer(error.status, job_id, False, started, error=envelope)
        if error.retry_after is not None:
            answer.headers["Retry-After"] = str(max(1, math.ceil(error.retry_after)))
        return answer

    def _answer(
        self,
        status: int,
        job_id: str | None,
        success: bool,
        started: float,
        *,
        data: Any = None,
        error: dict[str, Any] | None = None,
    ) -> Answer:
        if job_id is None:
            return Answer(status, {"success": False, "error": error})
        body: dict[str, Any] = {
            "jobId": job_id,
            "success": success,
            "executionTimeMs": round((time.monotonic() - started) * 1000.0, 3),
            "runnerId": self.runner.runner_id,
        }
        if success:
            body["data"] = data
        else:
            body["error"] = error
        return Answer(status, body)

    def _count(self, answer: Answer, capability_id: str, started: float) -> None:
        """The job metrics of one answered job (a 202 is counted when its result is)."""
        if answer.status == 202 or not capability_id or REPLAY_HEADER in answer.headers:
            return
        if capability_id not in self.runner.capabilities:
            capability_id = UNKNOWN_CAPABILITY
        current = metrics()
        label = capability_id
        if answer.body.get("success"):
            labelled(current.jobs_completed, label, "success").inc()
        else:
            code = (answer.body.get("error") or {}).get("code", "UNKNOWN")
            labelled(current.jobs_completed, label, "failed").inc()
            labelled(current.jobs_failed, label, code).inc()
        labelled(current.job_duration, label).observe(time.monotonic() - started)

    def _log(
        self,
        answer: Answer,
        job_id: str | None,
        capability_id: str,
        correlation_id: str,
        started: float,
    ) -> None:
        error = answer.body.get("error") or {}
        if answer.status == 202:
            outcome = "accepted"
        elif REPLAY_HEADER in answer.headers:
            outcome = "replayed"
        elif answer.body.get("success"):
            outcome = "success"
        else:
            outcome = error.get("category", "error")
        self._count(answer, capability_id, started)
        fields: dict[str, Any] = {
            "jobId": job_id,
            "capabilityId": capability_id,
            "correlationId": correlation_id,
            "outcome": outcome,
            "status": answer.status,
            "durationMs": round((time.monotonic() - started) * 1000.0, 3),
        }
        level = logging.INFO
        if error:
            fields["error"] = {"code": error["code"], "category": error["category"]}
            if answer.exception is not None:
                level = logging.ERROR
                fields["exception"] = answer.exception
        emit(job_log, level, _JOB_MESSAGES.get(outcome, "job failed"), fields, trusted=True)


_JOB_MESSAGES = {
    "success": "job completed",
    "accepted": "job accepted",
    "replayed": "job replayed",
}


def _known_job_id(body: Mapping[str, Any]) -> str | None:
    value = body.get("jobId")
    return value if is_uuid(value) else None


def _given_correlation(headers: Mapping[str, str]) -> str:
    """The caller's ``X-Correlation-Id`` when it is a uuid, else ``""``."""
    value = headers.get("X-Correlation-Id", "")
    return value if is_uuid(value) else ""


def _or_new(correlation_id: str | None) -> str:
    """``correlation_id``, or a new one when there is none."""
    return correlation_id or str(uuid.uuid4())
