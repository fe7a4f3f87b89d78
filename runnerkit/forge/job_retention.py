"""Retention: what keeps a forge that runs for months from growing for good.

Finished jobs older than HISTORY_RETENTION_HOURS are deleted with their events, TruthCore
assertions past ASSERTION_RETENTION_HOURS (or their own ``expiresAt``) too, and jobs queued
for UNMATCHED_JOB_EXPIRY_S whose type no runner lists fail rather than wait for ever. The
dispatcher's housekeeping runs each pass, at most PRUNE_BATCH rows to a transaction.
"""

from __future__ import annotations

import functools

from . import db
from .job_records import JobRecords
from .jobs import Clock

#: The most finished jobs one housekeeping pass deletes (a pass is one transaction).
PRUNE_BATCH = 1000


class JobRetention(JobRecords):
    """Delete old history and fail jobs nobody serves."""

    def prune(self, now: Clock | None = None, limit: int = PRUNE_BATCH) -> int:
        """Delete finished jobs older than HISTORY_RETENTION_HOURS (at most ``limit``), with
        their events; how many. A forge that runs for months keeps its size, and its lists
        and counts their speed. TruthCore assertions are a record of their own and stay.
        """
        hours = float(self.settings.history_retention_hours)
        if hours <= 0:
            return 0
        cutoff = (now or Clock()).ts - hours * 3600.0
        if cutoff <= 0:  # nothing can be that old
            return 0
        before = Clock(cutoff)
        with self.db.tx() as conn:
            return db.prune_finished_jobs(conn, before=before.z, limit=limit)

    def prune_assertions(self, now: Clock | None = None, limit: int = PRUNE_BATCH) -> int:
        """Delete TruthCore assertions past ASSERTION_RETENTION_HOURS (by their timestamp) or
        past their own ``expiresAt``, at most ``limit``; how many. Without it every job, and
        every ``POST /assert``, would grow the database for good."""
        now = now or Clock()
        hours = float(self.settings.assertion_retention_hours)
        before = now.ts - hours * 3600.0 if hours > 0 else None
        with self.db.tx() as conn:
            return db.prune_assertions(conn, before=before, now=now.ts, limit=limit)

    def expire_unmatched(self, now: Clock | None = None, limit: int = PRUNE_BATCH) -> int:
        """Fail jobs queued for UNMATCHED_JOB_EXPIRY_S whose type no registered runner (other
        than offline ones) lists: RESOURCE_NOT_FOUND / NO_RUNNER_FOR_TYPE; how many.

        A job of a type nobody serves would otherwise wait, and take space, for ever.
        """
        expiry = float(self.settings.unmatched_job_expiry_s)
        if expiry <= 0:
            return 0
        now = now or Clock()
        with self.db.snapshot() as conn:
            waiting = db.queued_types(conn)
            taken = db.taken_types(conn) if waiting else set()
            candidates = [
                row
                for job_type in waiting
                if job_type not in taken
                for row in db.queued_since(conn, job_type, before=now.ts - expiry, limit=limit)
            ][:limit]
        if not candidates:
            return 0
        failed = 0
        with self.db.tx() as conn:
            taken = db.taken_types(conn)  # a runner may have registered meanwhile
            for candidate in candidates:
                if candidate["type"] in taken:
                    continue
                step = functools.partial(self._no_runner, conn, candidate["id"], now)
                if self.apart(conn, candidate["id"], now, step):
                    failed += 1
        return failed

    def _no_runner(self, conn: db.Conn, job_id: str, now: Clock) -> bool:
        row = db.get_job(conn, job_id)
        if row is None or row["status"] != "queued":
            return False
        expiry = float(self.settings.unmatched_job_expiry_s)
        envelope = self.envelope(
            "RESOURCE_NOT_FOUND",
            "NO_RUNNER_FOR_TYPE",
            f"No registered runner takes jobs of type {row['type']!r}: job {job_id} waited "
            f"{expiry:g} s (RUNNERKIT_FORGE_UNMATCHED_JOB_EXPIRY_S) and failed",
            retryable=False,
        )
        self._fail(conn, row, envelope, now, {})
        return True
