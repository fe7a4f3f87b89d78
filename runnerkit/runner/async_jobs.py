"""The asynchronous path (``Prefer: respond-async``) and what jobs report through the outbox.

An accepted job is answered 202 at once and waits, first come first served across the
instance, for a free slot; its result then travels to JobForge through the durable outbox,
like the TruthCore records of every finished job. A job still waiting when its worker drains
never starts: it is answered with a retryable ``SHUTTING_DOWN``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Any

from runnerkit.contracts import new_uuid, utc_now
from runnerkit.errors import RunnerError, Timeout, Unavailable, build_envelope, traceback_text
from runnerkit.runner.job_answers import Answer, PipelineJob, job_log
from runnerkit.runner.job_running import JobRunning
from runnerkit.runner.storage import STORAGE_ERRORS
from runnerkit.service.logs import emit

#: How often an accepted asynchronous job waiting for a slot looks again (and at a drain).
QUEUE_POLL_S = 0.05


class AsyncJobs(JobRunning):
    """Accepted jobs and the outbox's deliveries (see the module docstring)."""

    def _accept_async(self, job: PipelineJob) -> Answer:
        """Answer 202 now; run when a slot frees up; deliver the result through the outbox.

        The thread is not a daemon: a worker that is told to stop waits for it (within
        gunicorn's graceful timeout) instead of dropping an accepted job.
        """
        threading.Thread(
            target=self._run_async,
            args=(job,),
            name=f"runnerkit-async-{job.job_id}",
            daemon=False,  # whatever the accepting thread is
        ).start()
        body = {"jobId": job.job_id, "accepted": True, "runnerId": self._runner_id()}
        return Answer(202, body, {"Preference-Applied": "respond-async"})

    def _run_async(self, job: PipelineJob) -> None:
        # The request that accepted the job has ended: the job gets an app context of its own.
        with self._app_context():
            self._run_async_job(job)

    def _run_async_job(self, job: PipelineJob) -> None:
        state = self._state()
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
                service=self._name,
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

    def _run_queued(self, job: PipelineJob) -> Answer:
        """Wait for a slot, then run: the accepted job's claim is given back on any
        exception raised before its code owns the slot.

        Waiting jobs get slots first come, first served across the instance: a job takes a
        free slot only when fewer jobs accepted before it (by any worker) still wait than
        slots are free (:meth:`Ledger.ahead`). A job still waiting when its worker drains
        never starts: it is answered with a retryable ``SHUTTING_DOWN`` (delivered through
        the outbox, like any result), so JobForge sends it again elsewhere or later.
        """
        state = self._state()
        capability_id = job.capability.id
        with contextlib.ExitStack() as undo:
            undo.callback(state.ledger.release, job.job_id)
            slot = None
            error: RunnerError | None = None
            while slot is None:
                if self._serving.draining:
                    error = Unavailable(
                        "The runner is shutting down; this job was accepted but not started",
                        code="SHUTTING_DOWN",
                        retry_after=self._serving.settings.rate_limit_retry_after_s,
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
        outbox = self._serving.outbox
        if outbox is None:
            return
        url = outbox.client.url_for(f"/jobs/{job_id}/result")
        outbox.add("result", url, body, {"X-Correlation-Id": correlation_id}, send_now=True)

    def _record_truth(self, job: PipelineJob, answer: Answer, *, send_now: bool) -> None:
        """Record a finished job in TruthCore (status and result) through the outbox."""
        outbox = self._serving.outbox
        base = self._serving.settings.truthcore_url
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
                "id": new_uuid(),
                "subject": job.job_id,
                "predicate": predicate,
                "object": value,
                "source": self._name,
                "confidence": 1,
                "timestamp": utc_now(),
                "metadata": {"capabilityId": job.capability.id, "runnerId": self._runner_id()},
            }
            outbox.add("assertion", f"{base}/assert", assertion, headers, send_now=send_now)
