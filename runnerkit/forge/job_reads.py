"""Reading jobs for the API: one job, a page of them, their events, counts by status,
and which runner a job was sent to (whose credential may report on it).

Everything answered here is redacted as the dashboard shows it
(:meth:`~.job_records.JobRecords.response`). Lists come from a snapshot, so a page and its
total agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from runnerkit.contracts import paginated
from runnerkit.errors import NotFound
from runnerkit.errors.redaction import redact_job

from . import db
from .job_records import JobRecords


class JobReads(JobRecords):
    """The API's reads of jobs and their events."""

    def runner_of(self, job_id: str) -> str | None:
        """The runner the job was last sent to (None: never sent); 404 for an unknown job."""
        with self.db.connection() as conn:
            row = conn.execute("SELECT runner_id FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise NotFound(f"No job {job_id}", code="JOB_NOT_FOUND")
        runner: str | None = row[0]
        return runner

    def get(self, job_id: str) -> dict[str, Any]:
        with self.db.connection() as conn:
            return self.response(self._get(conn, job_id))

    def list(
        self, *, statuses: Sequence[str] = (), job_type: str | None, limit: int, offset: int
    ) -> dict[str, Any]:
        """A PaginatedResponse of JobResponses, newest first."""
        with self.db.snapshot() as conn:
            rows, total = db.list_jobs(
                conn, statuses=statuses, job_type=job_type, limit=limit, offset=offset
            )
        items = [self.response(r) for r in rows]
        return paginated(items, total, limit, offset)

    def events(self, job_id: str, *, limit: int, offset: int) -> dict[str, Any]:
        """A PaginatedResponse of the job's JobEvents, oldest first (redacted as the
        dashboard shows them)."""
        with self.db.snapshot() as conn:
            self._get(conn, job_id)
            rows, total = db.list_events(conn, job_id, limit=limit, offset=offset)
        items = [redact_job(db.loads(r["document"]), r["document"]) for r in rows]
        return paginated(items, total, limit, offset)

    def counts(self) -> dict[str, int]:
        with self.db.connection() as conn:
            return db.count_jobs_by_status(conn)
