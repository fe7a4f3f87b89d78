"""Claiming jobs: the dispatcher starts the next attempt of a waiting job on a runner.

A claim moves the job to ``running`` (only if it still waits at the attempt the dispatcher
saw), takes one of the runner's capability slots (``slot_runner``) and sets the attempt's
lease: its timeout plus the dispatch margin (twice that for an asynchronous job), at most
MAX_WAIT_MS. The lease is noted on this process's monotonic clock (:class:`~.jobs.Leases`)
as it is written, so housekeeping can tell when an attempt nobody answers is overdue.
"""

from __future__ import annotations

from collections.abc import Sequence

from . import db
from .job_records import JobRecords
from .jobs import MAX_WAIT_MS, Claim, Claims, Clock, Pick, correlation_id_for


class JobClaims(JobRecords):
    """Start attempts: one job (:meth:`claim`) or the dispatcher's picks of a tick."""

    def claim(
        self, row: db.Row, runner: db.Row, capability_id: str, now: Clock | None = None
    ) -> Claim | None:
        """Start the next attempt of a waiting job on ``runner``; None if the job moved on."""
        now = now or Clock()
        with self.db.tx() as conn:
            claims = self.claim_all(conn, [(row, runner, capability_id)], now)
        return claims[0] if claims else None

    def claim_all(self, conn: db.Conn, picks: Sequence[Pick], now: Clock) -> Claims:
        """Start the next attempt of every picked job, inside the caller's transaction.

        ``picks`` are (job row, runner row, capability id); a job no longer waiting at the
        attempt its row shows is skipped. The Claims of the jobs taken, in ``picks`` order.
        """
        margin = float(self.settings.dispatch_margin_ms)
        threshold = self.settings.async_threshold_ms
        # Stamped in the transaction, not when the tick began: a slot freed by a transaction
        # that committed while this one waited for its turn (an async result) must not be
        # recorded as freed after this claim took it.
        fresh = Clock()
        if fresh.ts > now.ts:
            now = fresh
        claims: Claims = []
        sent = []
        # Every claim's UPDATE is sent before any is read: on PostgreSQL, one round trip.
        with conn.pipeline():
            for row, runner, capability_id in picks:
                timeout_ms = float(row["timeout_ms"])
                asynchronous = timeout_ms > threshold
                lease_ms = min(timeout_ms + margin * (2 if asynchronous else 1), MAX_WAIT_MS)
                lease_until = now.ts + lease_ms / 1000.0
                attempt = int(row["attempts"]) + 1
                cursor = db.update_job_sent(
                    conn,
                    row["id"],
                    {
                        "status": "running",
                        "updated_at": now.z,
                        "attempts": attempt,
                        "not_before": None,
                        "runner_id": runner["id"],
                        "runner_name": runner["name"],
                        "runner_version": runner["version"],
                        "capability_id": capability_id,
                        "first_started_at": row["first_started_at"] or now.z,
                        "attempt_started_at": now.z,
                        "slot_runner": runner["id"],
                        "slot_capability": capability_id,
                        "lease_until": lease_until,
                        "async": int(asynchronous),
                    },
                    statuses=("queued", "retrying"),
                    attempts=int(row["attempts"]),
                )
                sent.append((row, runner, capability_id, asynchronous, lease_ms, attempt, cursor))
        for row, runner, capability_id, asynchronous, lease_ms, attempt, cursor in sent:
            if cursor.rowcount <= 0:  # the job moved on meanwhile
                continue
            lease_until = now.ts + lease_ms / 1000.0
            self.leases.note(row["id"], attempt, lease_until, now.mono + lease_ms / 1000.0)
            started = {
                "attempt": attempt,
                "runnerId": runner["id"],
                "capabilityId": capability_id,
                "async": asynchronous,
            }
            self._emit(conn, row["id"], "job.started", now, started)
            self._assert_status(conn, row["id"], "running", now, {"attempt": attempt})
            request = db.loads(row["request"])
            claims.append(
                Claim(
                    job_id=row["id"],
                    attempt=attempt,
                    request=request,
                    runner_id=runner["id"],
                    runner_name=runner["name"],
                    base_url=runner["base_url"],
                    capability_id=capability_id,
                    asynchronous=asynchronous,
                    correlation_id=correlation_id_for(row["id"], request),
                )
            )
        return claims
