"""Results: turning what an attempt produced into ``completed``, ``retrying`` or ``failed``.

An attempt's answer arrives two ways: as the runner's answer to ``POST /execute``, which
the dispatcher records (:meth:`JobResults.finish`, :meth:`JobResults.finish_in`), or POSTed
later by the runner for an asynchronous job (:meth:`JobResults.deliver_result`, the same
delivery twice recorded once). Runners' ``job.progress`` events are stored here too
(:meth:`JobResults.add_progress`).

An answer that arrives for an earlier attempt, or after the job was requeued (its runner
went offline, its read timed out), is still the job's result while the job is unfinished:
a success completes it, a failure its policy would not retry fails it; a retryable failure
of an earlier attempt changes nothing (the retry under way supersedes it). A job that is
completed, failed or cancelled ignores every later answer, so it finishes once; a newer
attempt still running keeps its runner slot until that attempt answers.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Mapping
from typing import Any, Literal

from runnerkit.errors import Conflict, ValidationFailed, should_retry

from . import db
from .job_records import SLOT_FREE
from .job_retries import JobRetries
from .jobs import ACTIVE_STATUSES, MAX_WAIT_MS, Clock, Outcome, RowLike, is_refusal

log = logging.getLogger("runnerkit.forge.jobs")


class JobResults(JobRetries):
    """Record attempts' answers and runners' progress events."""

    def deliver_result(
        self, job_id: str, response: Mapping[str, Any]
    ) -> tuple[str, dict[str, Any]]:
        """Record a RunnerExecutionResponse POSTed by a runner (an async job's result).

        Returns what happened (``recorded``, ``duplicate`` or ``ignored``) and the JobResponse.
        The same delivery twice is recorded once; a result for a job that is no longer
        running (cancelled, requeued, finished) or from a runner that is not running its
        current attempt changes nothing; one for a job running synchronously is a 409.
        """
        if response["jobId"] != job_id:
            raise ValidationFailed(
                "jobId in the body does not match the URL",
                code="JOB_ID_MISMATCH",
                details=[{"message": f"Expected {job_id}", "path": ["jobId"]}],
            )
        digest = hashlib.sha256(db.dumps(response).encode()).hexdigest()
        with self.db.tx() as conn:
            now = Clock()  # once this change has its turn (see :mod:`.job_store`)
            row = self._get(conn, job_id)
            if not db.record_delivery(conn, job_id, digest, now.ts):
                return "duplicate", self.response(row)
            from_runner = response["runnerId"]
            outcome = self._delivered_outcome(response)
            if row["status"] != "running" or row["runner_id"] != from_runner:
                if (
                    row["status"] in ACTIVE_STATUSES
                    and self._late_result(row, outcome)
                    and db.runner_was_sent(conn, job_id, from_runner)
                ):
                    # An earlier attempt's result, the job still unfinished: it is the result.
                    run_by = self._as_run_by(conn, row, from_runner)
                    self._apply(conn, run_by, outcome, now, late=True)
                    return "recorded", self.response(self._get(conn, job_id))
                if row["slot_runner"] == from_runner and row["status"] != "running":
                    db.update_job(conn, job_id, SLOT_FREE, attempts=row["attempts"])
                log.info(
                    "ignored a result for job %s (status %s, from runner %s)",
                    job_id,
                    row["status"],
                    from_runner,
                )
                return "ignored", self.response(row)
            if not row["async"]:
                # Its result is the runner's answer to POST /execute, which the dispatcher
                # awaits. Retryable: a runner that answered 202 unasked may deliver before the
                # dispatcher has recorded that 202.
                raise Conflict(
                    f"Job {job_id} was sent to its runner synchronously: its result is the "
                    "answer to POST /execute",
                    code="JOB_NOT_ASYNC",
                    retryable=True,
                    retry_after=1,
                )
            self._apply(conn, row, outcome, now)
            return "recorded", self.response(self._get(conn, job_id))

    def _delivered_outcome(self, response: Mapping[str, Any]) -> Outcome:
        """The Outcome of a RunnerExecutionResponse POSTed by a runner."""
        outcome = Outcome(
            success=bool(response["success"]),
            data=response.get("data"),
            has_data="data" in response,
            error=response.get("error"),
            execution_ms=float(response["executionTimeMs"]),
        )
        if not outcome.success and outcome.error is None:
            outcome.error = self.envelope(
                "RUNNER_ERROR",
                "MISSING_ERROR",
                "The runner reported a failure without an error envelope",
                retryable=True,
            )
        return outcome

    def _late_result(self, row: RowLike, outcome: Outcome) -> bool:
        """Whether an answer to an earlier attempt decides the (unfinished) job.

        A success does; so does a failure the job's policy would not retry. A refusal or a
        retryable failure does not: the job is being retried already.
        """
        if outcome.accepted:
            return False
        if outcome.success:
            return True
        error = outcome.error
        if error is None or is_refusal(error):
            return False
        return not should_retry(error, db.loads(row["request"])["retryPolicy"])

    def _as_run_by(self, conn: db.Conn, row: db.Row, runner_id: str | None) -> RowLike:
        """``row`` naming ``runner_id`` as its runner (an earlier attempt's may differ)."""
        if not runner_id or runner_id == row["runner_id"]:
            return row
        runner = db.get_runner(conn, runner_id)
        return {
            **{key: row[key] for key in row.keys()},  # noqa: SIM118 - a db.Row
            "runner_id": runner_id,
            "runner_name": runner["name"] if runner is not None else None,
            "runner_version": runner["version"] if runner is not None else None,
        }

    def add_progress(self, job_id: str, event: Mapping[str, Any]) -> bool:
        """Store a runner's ``job.progress`` JobEvent.

        Runners report progress through an outbox, so an event may arrive after the job
        finished; it is kept as long as the job was ever sent to a runner, and one whose
        attempt had ended (the last attempt started before its timestamp) gets that
        attempt's number as ``data.attempt``. False when the job never started or the event
        (by id) is already stored.
        """
        problems = []
        if event["jobId"] != job_id:
            problems.append({"message": f"Expected {job_id}", "path": ["jobId"]})
        if event["type"] != "job.progress":
            problems.append(
                {"message": "Runners may only post job.progress events", "path": ["type"]}
            )
        if problems:
            raise ValidationFailed("The event cannot be recorded for this job", details=problems)
        with self.db.tx() as conn:
            row = self._get(conn, job_id)
            attempts = int(row["attempts"])
            if attempts == 0:
                return False
            event = dict(event)
            attempt = db.attempt_at(conn, job_id, str(event["timestamp"])) or attempts
            if attempt < attempts or row["status"] != "running":
                # Its attempt had ended when it arrived: say which one it belongs to.
                event["data"] = {**(event.get("data") or {}), "attempt": attempt}
            return db.insert_event(conn, event)

    def finish(
        self, job_id: str, attempt: int, outcome: Outcome, *, runner_id: str | None = None
    ) -> str:
        """Record what attempt ``attempt`` of a job produced, in a transaction of its own.

        Returns ``recorded``, ``accepted`` (202: the result comes later), ``refused`` (the
        runner did not run it: the attempt is given back), ``ignored`` (the job finished
        meanwhile, or the answer is an earlier attempt's retryable failure; only its runner
        slot is given back) or ``failed`` (the forge could not record it, so the job failed:
        :meth:`apart`). ``runner_id``: the runner the attempt was sent to.
        """
        with self.db.tx() as conn:
            now = Clock()
            record = functools.partial(
                self.finish_in, conn, job_id, attempt, outcome, now, runner_id=runner_id
            )
            return self.apart(conn, job_id, now, record) or "failed"

    def finish_in(
        self,
        conn: db.Conn,
        job_id: str,
        attempt: int,
        outcome: Outcome,
        now: Clock,
        *,
        runner_id: str | None = None,
        row: db.Row | Literal[False] | None = False,
    ) -> str:
        """:meth:`finish` inside the caller's transaction.

        ``row``: the job's row as read in this transaction (None: there is no such job), when
        the caller read many at once; else it is read here.
        """
        if row is False:
            row = db.get_job(conn, job_id)
        if row is None:
            return "ignored"
        if row["status"] != "running" or int(row["attempts"]) != attempt:
            if row["status"] in ACTIVE_STATUSES and self._late_result(row, outcome):
                # The answer of an earlier attempt (or one requeued meanwhile): the result.
                self._apply(conn, self._as_run_by(conn, row, runner_id), outcome, now, late=True)
                return "recorded"
            if row["slot_runner"] is not None and int(row["attempts"]) == attempt:
                db.update_job(conn, job_id, SLOT_FREE, attempts=attempt)
            return "ignored"
        error = outcome.error
        if (
            not outcome.success
            and error is not None
            and is_refusal(error)
            and self._within_refusal_budget(row, now)
        ):
            self._refused(conn, row, error, now)
            return "refused"
        if outcome.accepted:
            timeout_ms = float(row["timeout_ms"])
            lease_ms = min(timeout_ms + 2 * float(self.settings.dispatch_margin_ms), MAX_WAIT_MS)
            lease_until = now.ts + lease_ms / 1000.0
            db.update_job(conn, job_id, {"async": 1, "lease_until": lease_until}, attempts=attempt)
            self.leases.note(job_id, attempt, lease_until, now.mono + lease_ms / 1000.0)
            return "accepted"
        self._apply(conn, row, outcome, now)
        return "recorded"

    def _apply(
        self, conn: db.Conn, row: RowLike, outcome: Outcome, now: Clock, *, late: bool = False
    ) -> None:
        """Turn an attempt's outcome into completed / retrying / failed.

        Normally the current attempt's. A ``late`` one is an earlier attempt's result (see
        :meth:`finish_in`) for a job that may be waiting or running a newer attempt; that
        attempt, if running, keeps its runner slot until its own answer frees it.
        """
        job_id = row["id"]
        attempts = int(row["attempts"])
        slot = {} if late and row["status"] == "running" else SLOT_FREE
        statuses = ACTIVE_STATUSES if late else ("running",)
        if outcome.success:
            result: dict[str, Any] = {"success": True}
            if outcome.has_data:
                result["data"] = outcome.data
            result["metadata"] = self._result_metadata(row, now, attempts)
            result_json = db.dumps(result)
            db.update_job(
                conn,
                job_id,
                {
                    **slot,
                    "status": "completed",
                    "updated_at": now.z,
                    "not_before": None,
                    "result": result_json,
                    "error": None,
                    "last_error": None,
                },
                statuses=statuses,
                attempts=attempts,
            )
            done = {
                "attempts": attempts,
                "runnerId": row["runner_id"],
                "durationMs": result["metadata"]["durationMs"],
            }
            self._emit(conn, job_id, "job.completed", now, done)
            self._assert_status(conn, job_id, "completed", now, {"attempts": attempts})
            self._assert_result(conn, row, result, now, result_json)
            return
        envelope = outcome.error or self.envelope(
            "RUNNER_ERROR", "UNKNOWN_FAILURE", "The attempt failed", retryable=True
        )
        self._retry_or_fail(conn, row, envelope, now, {**slot})
