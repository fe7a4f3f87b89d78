"""Running one admitted job: its code on a job thread, its answer at the deadline at the latest.

:class:`JobRunning` takes a job that holds its ledger claim and a slot, runs the capability
(on a job thread, inline, or in a child process), answers ``TIMEOUT`` when the deadline
passes while the code runs on, checks the result can be sent as JSON, and records the answer
in the idempotency ledger. What it holds is given back when the code really returns.
"""

from __future__ import annotations

import contextvars
import functools
import logging
import time
from collections.abc import Callable
from typing import Any

from runnerkit.contracts import new_uuid, utc_now
from runnerkit.errors import (
    RunnerError,
    SchemaMismatch,
    Timeout,
    traceback_text,
    unexpected_envelope,
)
from runnerkit.runner.capability import Context, Progress
from runnerkit.runner.deadlines import deadlines
from runnerkit.runner.isolation import run_isolated
from runnerkit.runner.job_answers import Answer, JobAnswers, PipelineJob, SendEarly, job_log
from runnerkit.runner.job_threads import JobThread
from runnerkit.runner.locks import Slot
from runnerkit.runner.storage import STORAGE_ERRORS
from runnerkit.service.logs import emit, log_context
from runnerkit.service.metric_families import metrics
from runnerkit.service.metrics import labelled

#: Progress events are sent at most this often per job (the last one always).
PROGRESS_MIN_INTERVAL_S = 1.0

#: How long past its deadline a process-isolated job's answer waits for the kill of its
#: process (SIGKILL and reaping take milliseconds; this only bounds a pathological case).
ISOLATED_KILL_WAIT_S = 2.0


class JobRunning(JobAnswers):
    """Runs admitted jobs and records their answers (see the module docstring)."""

    def _done(self) -> None:
        with self._in_flight_lock:
            self._in_flight -= 1

    def _execute(self, job: PipelineJob, slot: Slot, send_early: SendEarly | None = None) -> Answer:
        """Run a claimed job holding ``slot``; answer at its deadline at the latest.

        The ledger entry is completed with the answer given; after a timeout that happens only
        when the code really stops, so a redelivery meanwhile is told the job still runs.
        ``send_early``: the server can send an answer while the request is still in the app, so
        a job of ``isolation = "thread"`` runs on the request's thread, watched by
        :func:`~runnerkit.runner.deadlines.deadlines` (its ``TIMEOUT`` sent at the deadline
        through ``send_early``), instead of on a job thread of its own.
        """
        state = self._state()
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

        if send_early is not None and capability.isolation == "thread":
            in_context = contextvars.copy_context().run
            return self._execute_watched(job, ctx, in_context, call, release, send_early)
        if capability.isolation == "inline":
            thread = JobThread(call, release)
            thread.run_here()
        else:
            # The code runs in this thread's context, the app's context included: Flask's
            # ``current_app`` and the extensions built on it work on the job thread (and in
            # a process-isolated child, forked from it) as they do in the request.
            thread = JobThread(functools.partial(contextvars.copy_context().run, call), release)
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
            answer = self._timeout(job)
            complete = functools.partial(self._store, job.job_id, answer)
            if not thread.abandon(complete):
                complete()
            return answer
        answer = self._encodable(
            self._outcome(thread, job.job_id, job.correlation_id, job.started), job
        )
        self._store(job.job_id, answer)
        return answer

    def _execute_watched(
        self,
        job: PipelineJob,
        ctx: Context,
        in_context: Callable[[Callable[[], Any]], Any],
        call: Callable[[], Any],
        release: Callable[[], None],
        send_early: SendEarly,
    ) -> Answer:
        """Run the code on this thread; at the deadline the watcher sends ``TIMEOUT``.

        The answer sent at the deadline is stored once the code returns, as after a job
        thread's timeout, and the request then ends with nothing more to send
        (``Answer.sent``); the slot is held until then.
        """
        sent: list[Answer] = []

        def at_deadline() -> None:  # on the watcher's thread
            ctx.cancel()
            answer = self._timeout(job)
            sent.append(answer)
            send_early(answer)

        watch = deadlines().watch(ctx.deadline_monotonic, at_deadline)
        thread = JobThread(functools.partial(in_context, call), release)
        thread.run_here()
        if not watch.end() and sent:
            answer = sent[0]
            answer.sent = True
            self._store(job.job_id, answer)
            return answer
        if thread.finished_at >= ctx.deadline_monotonic:
            ctx.cancel()
            answer = self._timeout(job)
        else:
            answer = self._encodable(
                self._outcome(thread, job.job_id, job.correlation_id, job.started), job
            )
        self._store(job.job_id, answer)
        return answer

    def _timeout(self, job: PipelineJob) -> Answer:
        """The ``TIMEOUT`` answer of a job past its deadline."""
        timeout = Timeout(
            f"{job.capability.id!r} did not finish within {job.timeout_ms:g} ms",
            code="DEADLINE_EXCEEDED",
        )
        return self._failure(timeout, job.job_id, job.correlation_id, job.started)

    def _store(self, job_id: str, answer: Answer) -> None:
        """Record a finished job's answer in the ledger, which frees its job lock.

        When that write fails (a full disk) the answer computed is still the caller's: it
        is sent, the failure is logged and turns readiness unhealthy, and the job lock is
        free all the same. The ledger then holds no answer for the job, so a redelivery
        runs it again (a new attempt) instead of replaying it: at least once, never lost.
        """
        state = self._state()
        try:
            written = state.ledger.complete(job_id, answer.status, answer.json())
        except STORAGE_ERRORS as exc:
            state.ledger.unlock(job_id)  # if the failure came before complete's own
            state.storage.failed(exc)
            emit(
                job_log,
                logging.ERROR,
                "job answer not stored",
                {"jobId": job_id, "status": answer.status, "error": f"{type(exc).__name__}"},
            )
            return
        if written and state.storage.failure:  # (a journal's fold says so for its answers)
            state.storage.recovered()

    def _encodable(self, answer: Answer, job: PipelineJob) -> Answer:
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
        self, thread: JobThread, job_id: str, correlation_id: str, started: float
    ) -> Answer:
        if thread.error is None:
            return self._answer(200, job_id, True, started, data=thread.result)
        if isinstance(thread.error, RunnerError):
            return self._failure(thread.error, job_id, correlation_id, started)
        # Anything else, a marshmallow ValidationError of the author's own included, is an
        # unexpected failure of the capability, not a fault of the caller's input.
        envelope = unexpected_envelope(
            thread.error,
            service=self._name,
            operation="execute",
            correlation_id=correlation_id,
            log_traceback=False,
        )
        answer = self._answer(500, job_id, False, started, error=envelope)
        # Logged in the job's own line, with its ids, not on a line of its own without them.
        answer.exception = traceback_text(thread.error)
        return answer

    def _progress_sender(self, job: PipelineJob) -> Callable[[Progress], None] | None:
        """Report ``ctx.progress`` to JobForge as job.progress events, at most one a second."""
        outbox = self._serving.outbox
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
                "id": new_uuid(),
                "type": "job.progress",
                "jobId": job.job_id,
                "timestamp": utc_now(),
                "data": {"percent": update.percent, "message": update.message},
                "metadata": {"service": self._name, "version": self._version},
            }
            try:
                outbox.add("event", url, event, {"X-Correlation-Id": job.correlation_id})
            except STORAGE_ERRORS as exc:
                # Progress is advice: a full disk drops the event, not the job.
                self._state().storage.failed(exc)

        return send
