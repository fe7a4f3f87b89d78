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
        planned = []
        for row, runner, capability_id in picks:
            timeout_ms = float(row["timeout_ms"])
            asynchronous = timeout_ms > threshold
            lease_ms = min(timeout_ms + margin * (2 if asynchronous else 1), MAX_WAIT_MS)
            planned.append(
                (
                    row,
                    runner,
                    capability_id,
                    asynchronous,
                    lease_ms,
                    {
                        "id": row["id"],
                        "seq": row["seq"],
                        "attempts": int(row["attempts"]) + 1,
                        "updated_at": now.z,
                        "runner_id": runner["id"],
                        "runner_name": runner["name"],
                        "runner_version": runner["version"],
                        "capability_id": capability_id,
                        "first_started_at": row["first_started_at"] or now.z,
                        "lease_until": now.ts + lease_ms / 1000.0,
                        "async": int(asynchronous),
                    },
                )
            )
        taken = db.claim_jobs(conn, [claim for *_, claim in planned])
        for row, runner, capability_id, asynchronous, lease_ms, claim in planned:
            if row["id"] not in taken:  # the job moved on meanwhile
                continue
            attempt, lease_until = claim["attempts"], claim["lease_until"]
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
