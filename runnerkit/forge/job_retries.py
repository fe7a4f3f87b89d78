"""Retries: applying a job's RetryPolicy to a failed attempt, and giving back an attempt a
runner refused.

A refusal (:func:`~.jobs.is_refusal`: the runner runs this job already, is at capacity, is busy or
shutting down, or answered 429) is not a failed attempt: the runner did not run the job. The
attempt is given back and the job waits the retryAfter the runner asked for (capped by
RETRY_AFTER_CAP_S), at least its policy's backoff, then is sent again; for
``JOB_ALREADY_RUNNING`` the next delivery finds the job's answer stored (a replay) or the
job still running. So that a runner refusing for ever cannot hold a job for ever, refusals
are free only within the job's own time budget, ``(maxRetries + 1) * (timeoutMs +
DISPATCH_MARGIN_MS)`` from its first start; later ones spend attempts like any failure.

Every wait is capped at MAX_WAIT_MS; :meth:`JobRetries.cap_retry_waits` cuts waits a
backward step of the clock stretched while no dispatcher was watching.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from runnerkit.errors import retry_delay, should_retry

from . import db, truth
from .job_records import SLOT_FREE, JobRecords, error_summary
from .jobs import MAX_WAIT_MS, Clock, RowLike


class JobRetries(JobRecords):
    """Retry or fail a failed attempt; give back a refused one."""

    def _retry_or_fail(
        self,
        conn: db.Conn,
        row: RowLike,
        envelope: Mapping[str, Any],
        now: Clock,
        values: Mapping[str, Any],
        *,
        immediate: bool = False,
    ) -> str:
        """Apply the job's RetryPolicy to a failed attempt: ``retrying`` or ``failed``."""
        job_id = row["id"]
        attempts = int(row["attempts"])
        policy = db.loads(row["request"])["retryPolicy"]
        if should_retry(envelope, policy) and attempts <= int(policy["maxRetries"]):
            delay_ms = (
                0.0
                if immediate
                else self._retry_delay_ms(retry_delay(attempts - 1, policy), envelope)
            )
            next_at = now.ts + delay_ms / 1000.0
            db.update_job(
                conn,
                job_id,
                {
                    **values,
                    "status": "retrying",
                    "updated_at": now.z,
                    "not_before": next_at,
                    "last_error": db.dumps(envelope),
                },
                attempts=attempts,
            )
            retrying = {
                "attempt": attempts,
                "delayMs": delay_ms,
                "nextAttemptAt": Clock(next_at).z,
                "error": error_summary(envelope),
            }
            self._emit(conn, job_id, "job.retrying", now, retrying)
            self._assert_status(conn, job_id, "retrying", now, {"attempts": attempts})
            return "retrying"
        self._fail(conn, row, envelope, now, values)
        return "failed"

    def _retry_delay_ms(self, delay_ms: float, envelope: Mapping[str, Any]) -> float:
        """How long before a job is sent again: the policy's ``delay_ms``, or the runner's
        ``retryAfter`` when that is longer (capped by RETRY_AFTER_CAP_S), at most MAX_WAIT_MS."""
        retry_after = envelope.get("retryAfter")
        if isinstance(retry_after, int | float) and not isinstance(retry_after, bool):
            capped = min(float(retry_after), float(self.settings.retry_after_cap_s))
            delay_ms = max(delay_ms, capped * 1000.0)
        return min(delay_ms, MAX_WAIT_MS)

    def _within_refusal_budget(self, row: RowLike, now: Clock) -> bool:
        """Whether a refusal may still be free (see the module docstring)."""
        started = row["first_started_at"]
        if not started:
            return True
        policy = db.loads(row["request"])["retryPolicy"]
        per_attempt_ms = float(row["timeout_ms"]) + float(self.settings.dispatch_margin_ms)
        budget_s = (int(policy["maxRetries"]) + 1) * per_attempt_ms / 1000.0
        return now.ts - truth.epoch(started) < budget_s

    def _refused(self, conn: db.Conn, row: db.Row, envelope: Mapping[str, Any], now: Clock) -> None:
        """The runner did not run this attempt: give it back and send the job again later."""
        job_id = row["id"]
        attempts = int(row["attempts"])
        policy = db.loads(row["request"])["retryPolicy"]
        delay_ms = self._retry_delay_ms(retry_delay(max(0, attempts - 1), policy), envelope)
        next_at = now.ts + delay_ms / 1000.0
        db.update_job(
            conn,
            job_id,
            {
                **SLOT_FREE,
                "status": "retrying",
                "attempts": attempts - 1,
                "updated_at": now.z,
                "not_before": next_at,
                "last_error": db.dumps(envelope),
            },
            statuses=("running",),
            attempts=attempts,
        )
        retrying = {
            "attempt": attempts,
            "refused": True,
            "delayMs": delay_ms,
            "nextAttemptAt": Clock(next_at).z,
            "error": error_summary(envelope),
        }
        self._emit(conn, job_id, "job.retrying", now, retrying)
        self._assert_status(conn, job_id, "retrying", now, {"attempts": attempts - 1})

    def cap_retry_waits(self) -> int:
        """No retry waits longer than its own delay from now; how many were cut.

        A retry is due at a wall-clock time written when it was scheduled: a backward step
        of the clock that no dispatcher saw (the forge was down, or between two
        dispatchers) would stretch its wait by the step. Run when a dispatcher takes over;
        each wait is cut to its delay (the policy's backoff for its attempt, or the
        runner's capped ``retryAfter``).
        """
        capped = 0
        with self.db.tx() as conn:
            now = Clock()
            for row in db.retries_due_after(conn, now.ts):
                policy = db.loads(row["request"])["retryPolicy"]
                attempts = int(row["attempts"])
                backoff = max(
                    retry_delay(max(0, attempts - 1), policy), retry_delay(attempts, policy)
                )
                longest = self._retry_delay_ms(backoff, db.loads(row["last_error"]) or {})
                due = now.ts + longest / 1000.0
                if float(row["not_before"]) > due and db.update_job(
                    conn, row["id"], {"not_before": due}, statuses=("retrying",), attempts=attempts
                ):
                    capped += 1
        return capped
