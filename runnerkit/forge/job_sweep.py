"""The dispatcher's sweep: runners that stopped heartbeating, attempts nobody will answer,
jobs past their ``expiresAt``; and following a step of the wall clock.

Silence and leases are measured on the monotonic clock (:class:`~.jobs.Sightings`,
:class:`~.jobs.Leases`), so a step of the system clock neither marks every runner offline
nor expires every lease; :meth:`JobSweep.follow_clock_step` moves the stored waits with the
step so they keep their length.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping

from . import db, violations
from .job_records import SLOT_FREE
from .job_retries import JobRetries
from .jobs import MAX_WAIT_MS, Clock

log = logging.getLogger("runnerkit.forge.jobs")


class JobSweep(JobRetries):
    """Housekeeping of runners' liveness, overdue attempts and expired jobs."""

    def sweep(
        self, *, in_flight: Mapping[str, int], grace_from: float, now: Clock | None = None
    ) -> dict[str, int]:
        """The dispatcher's housekeeping, in one transaction.

        - runners silent for OFFLINE_AFTER_MISSED heartbeat intervals become ``offline``
          (on the monotonic clock, see :class:`Sightings`; counted from ``grace_from``, a
          ``time.monotonic()`` reading, at the earliest: the moment this dispatcher took
          over, so a restarted forge gives every runner a full window to heartbeat again);
        - jobs running on an offline runner, or on a runner that is no longer registered
          (unless this process is still waiting for that runner's answer), are requeued as
          ``retrying``, counted as an attempt and eligible at once;
        - an attempt whose lease has passed (on the monotonic clock, see :class:`Leases`)
          with nobody waiting for it (e.g. the forge restarted while an execution was in
          flight) fails with a retryable TIMEOUT;
        - waiting jobs past ``metadata.expiresAt`` fail as expired.

        ``in_flight`` maps job id → attempt of the executions this process is waiting on.
        """
        summary = {"offline": 0, "requeued": 0, "overdue": 0, "expired": 0}
        with self.db.tx() as conn:
            now = now or Clock()
            missed = int(self.settings.offline_after_missed)
            offline = self.sightings.silent(db.watched_runners(conn), now, grace_from, missed)
            db.mark_runners_offline(conn, offline)
            summary["offline"] = len(offline)
            for runner_id in offline:
                why = violations.offline_reason(conn, runner_id)  # a refused heartbeat's reason
                log.warning("runner %s missed its heartbeats and is offline%s", runner_id, why)
            holding = db.jobs_holding_slots(conn)
            self.leases.keep({row["id"] for row in holding})
            for row in holding:
                if not self._sweep_due(row, in_flight, now):
                    continue  # the common case: no write, so no savepoint either
                summary_key = self.apart(
                    conn,
                    row["id"],
                    now,
                    functools.partial(self._sweep_job, conn, row, in_flight, now),
                )
                if summary_key:
                    summary[summary_key] += 1
            for row in db.expired_jobs(conn, now=now.ts):
                if self.apart(
                    conn, row["id"], now, functools.partial(self._expire, conn, row, now)
                ):
                    summary["expired"] += 1
        return summary

    def _sweep_due(self, row: db.Row, in_flight: Mapping[str, int], now: Clock) -> bool:
        """Whether housekeeping has anything to do for this job holding a slot (``sweep``)."""
        if in_flight.get(row["id"]) == int(row["attempts"]):
            # This process still waits for the runner's answer; only "offline" overrides that.
            return bool(row["runner_status"] == "offline")
        return row["runner_status"] in ("offline", None) or self._lease_passed(row, now)

    def _sweep_job(
        self, conn: db.Conn, row: db.Row, in_flight: Mapping[str, int], now: Clock
    ) -> str | None:
        """Requeue, fail or free the slot of a job :func:`_sweep_due` picked."""
        attempt = int(row["attempts"])
        waiting_here = in_flight.get(row["id"]) == attempt
        runner_status = row["runner_status"]
        running = row["status"] == "running"
        if runner_status == "offline" or (runner_status is None and not waiting_here):
            gone = "went offline" if runner_status == "offline" else "is no longer registered"
            if not running:
                db.update_job(conn, row["id"], SLOT_FREE, attempts=attempt)
                return None
            envelope = self.envelope(
                "NETWORK_ERROR",
                "RUNNER_OFFLINE" if runner_status == "offline" else "RUNNER_GONE",
                f"Runner {row['runner_id']} {gone} while running attempt {attempt}",
                retryable=True,
            )
            self._retry_or_fail(conn, row, envelope, now, SLOT_FREE, immediate=True)
            return "requeued"
        if self._lease_passed(row, now) and not waiting_here:
            if not running:
                db.update_job(conn, row["id"], SLOT_FREE, attempts=attempt)
                return None
            envelope = self.envelope(
                "TIMEOUT",
                "RESULT_OVERDUE",
                f"No result for attempt {attempt} within {row['timeout_ms']:g} ms "
                "(plus the dispatch margin)",
                retryable=True,
            )
            self._retry_or_fail(conn, row, envelope, now, SLOT_FREE)
            return "overdue"
        return None

    def _lease_passed(self, row: db.Row, now: Clock) -> bool:
        if row["lease_until"] is None:
            return False
        margin = float(self.settings.dispatch_margin_ms)
        longest_ms = min(float(row["timeout_ms"]) + 2 * margin, MAX_WAIT_MS)
        return self.leases.passed(row, now, longest_ms / 1000.0)

    def _expire(self, conn: db.Conn, row: db.Row, now: Clock) -> bool:
        expired_at = db.loads(row["request"])["metadata"]["expiresAt"]
        envelope = self.envelope(
            "TIMEOUT",
            "JOB_EXPIRED",
            f"Job {row['id']} expired at {expired_at} before it could run",
            retryable=False,
        )
        self._fail(conn, row, envelope, now, {}, event="job.expired")
        return True

    def follow_clock_step(self, step_s: float) -> None:
        """The wall clock just stepped by ``step_s`` seconds: the waits it measures keep
        their length. Queued jobs keep their age (``submitted``: a forward step does not
        fail them as unmatched), retries their delay (``not_before``) and attempts their
        lease (``lease_until``, for a forge that restarts; this process counts leases on
        the monotonic clock anyway). Contract times (``scheduledAt``, ``expiresAt``) are
        wall-clock times by definition and stay.
        """
        with self.db.tx() as conn:
            db.shift_waits(conn, step_s)
