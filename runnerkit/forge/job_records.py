"""How a change to a job is recorded, whichever part of the job store makes it.

Every status change writes, in its transaction, the job row, a JobEvent
(:meth:`JobRecords._emit`) and a TruthCore assertion (``(jobId, "status", <status>)``, and
``"result"`` for a finished attempt); a job that fails writes its ErrorEnvelope and
JobResult (:meth:`JobRecords._fail`). :class:`JobRecords` holds the store's state and these
writers, the JobResponse everyone outside the forge reads (redacted), the ErrorEnvelopes the
forge makes itself, and :meth:`JobRecords.apart`, which keeps one job's failure from undoing
the others' work in a shared transaction. Every part of :class:`~.job_store.JobStore`
(submission, reads, claims, results, retries, sweep, retention) builds on it, so the records
are written one way whoever changes a job.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from runnerkit._version import __version__
from runnerkit.errors import NotFound, make_envelope
from runnerkit.errors.redaction import redact_job

from . import db, truth
from .jobs import ACTIVE_STATUSES, Clock, Leases, RowLike, Sightings
from .settings import ForgeSettings

if TYPE_CHECKING:
    from .job_submission import _Submission

log = logging.getLogger("runnerkit.forge.jobs")

T = TypeVar("T")

json_string = json.JSONEncoder().encode  # a str as db.dumps writes it

#: The columns that give a job's runner slot back (and drop its lease).
SLOT_FREE: dict[str, Any] = {"slot_runner": None, "slot_capability": None, "lease_until": None}


def error_summary(envelope: Mapping[str, Any]) -> dict[str, Any]:
    """The category, code and message of an ErrorEnvelope, for a JobEvent."""
    return {
        "category": envelope.get("category"),
        "code": envelope.get("code"),
        "message": envelope.get("message"),
    }


class JobRecords:
    """The state of a job store and what every part of it writes a job change with."""

    def __init__(self, database: db.Database, settings: ForgeSettings) -> None:
        self.db = database
        self.settings = settings
        self.service: str = settings.service_name
        self._event_metadata = db.dumps({"service": self.service, "version": __version__})
        self._group: list[_Submission] = []  # submissions waiting for a group commit
        self._group_writing = False
        self._group_lock = threading.Lock()
        self.sightings = Sightings()
        self.leases = Leases()

    # -- documents, events and assertions ------------------------------------------------

    def response(self, row: db.Row) -> dict[str, Any]:
        """The JobResponse of a job row, as everyone outside the forge sees it: secret-like
        values redacted (:func:`redact_job`), in JSON answers and the dashboard alike."""
        body: dict[str, Any] = {
            "id": row["id"],
            "status": row["status"],
            "request": db.loads(row["request"]),
            "updatedAt": row["updated_at"],
        }
        if row["result"] is not None:
            body["result"] = db.loads(row["result"])
        if row["error"] is not None:
            body["error"] = db.loads(row["error"])
        elif row["status"] == "retrying" and row["last_error"] is not None:
            body["error"] = db.loads(row["last_error"])
        return redact_job(body, row["request"], row["result"], row["error"], row["last_error"])

    def _emit(
        self, conn: db.Conn, job_id: str, type_: str, now: Clock, data: Mapping[str, Any]
    ) -> None:
        # db.dumps of the JobEvent, assembled around its data (keys in sorted order).
        event_id = db.time_ordered_id()
        document = (
            f'{{"data":{db.dumps(data)},"id":"{event_id}","jobId":{json_string(job_id)},'
            f'"metadata":{self._event_metadata},"timestamp":"{now.z}","type":{json_string(type_)}}}'
        )
        db.queue_event(conn, event_id, job_id, type_, document)

    def _assert_status(
        self,
        conn: db.Conn,
        job_id: str,
        status: str,
        now: Clock,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        db.queue_assertion(
            conn,
            truth.forge_assertion(
                subject=job_id,
                predicate="status",
                obj=status,
                source=self.service,
                timestamp=now.z,
                ts=now.ms,
                metadata=metadata,
            ),
        )

    def _get(self, conn: db.Conn, job_id: str) -> db.Row:
        row = db.get_job(conn, job_id)
        if row is None:
            raise NotFound(f"No job {job_id}", code="JOB_NOT_FOUND")
        return row

    def envelope(
        self,
        category: str,
        code: str,
        message: str,
        *,
        retryable: bool,
        retry_after: float | None = None,
        correlation_id: str | None = None,
    ) -> dict[str, Any]:
        """An ErrorEnvelope the forge makes itself (network errors, timeouts, expiry)."""
        return make_envelope(
            category,
            code,
            message,
            service=self.service,
            retryable=retryable,
            retry_after=retry_after,
            operation="dispatch",
            correlation_id=correlation_id,
        )

    # -- failing and isolating a job ------------------------------------------------------

    def _fail(
        self,
        conn: db.Conn,
        row: RowLike,
        envelope: Mapping[str, Any],
        now: Clock,
        values: Mapping[str, Any],
        *,
        event: str = "job.failed",
    ) -> None:
        job_id = row["id"]
        attempts = int(row["attempts"])
        update: dict[str, Any] = {
            **values,
            "status": "failed",
            "updated_at": now.z,
            "not_before": None,
            "error": db.dumps(envelope),
        }
        result: dict[str, Any] | None = None
        result_json = ""
        if attempts > 0:  # JobResult.metadata.attempts must be positive
            result = {
                "success": False,
                "error": dict(envelope),
                "metadata": self._result_metadata(row, now, attempts),
            }
            update["result"] = result_json = db.dumps(result)
        db.update_job(conn, job_id, update, attempts=attempts)
        summary = {"attempts": attempts, "error": error_summary(envelope)}
        if event != "job.failed":
            self._emit(conn, job_id, event, now, summary)
        self._emit(conn, job_id, "job.failed", now, summary)
        self._assert_status(conn, job_id, "failed", now, {"attempts": attempts})
        if result is not None:
            self._assert_result(conn, row, result, now, result_json)

    def _result_metadata(self, row: RowLike, now: Clock, attempts: int) -> dict[str, Any]:
        metadata: dict[str, Any] = {"completedAt": now.z, "durationMs": 0.0}
        started = row["first_started_at"]
        if started:
            metadata["startedAt"] = started
            metadata["durationMs"] = round(max(0.0, now.ts - truth.epoch(started)) * 1000.0, 3)
        metadata["attempts"] = max(1, attempts)
        if row["runner_id"]:
            metadata["runnerId"] = row["runner_id"]
        if row["runner_version"]:
            metadata["runnerVersion"] = row["runner_version"]
        return metadata

    def _assert_result(
        self, conn: db.Conn, row: RowLike, result: Mapping[str, Any], now: Clock, result_json: str
    ) -> None:
        db.queue_assertion(
            conn,
            truth.forge_assertion(
                subject=row["id"],
                predicate="result",
                obj=dict(result),
                source=row["runner_name"] or self.service,
                timestamp=now.z,
                ts=now.ms,
                metadata={"recordedBy": self.service, "jobType": row["type"]},
                object_json=result_json,
            ),
        )

    def apart(self, conn: db.Conn, job_id: str, now: Clock, step: Callable[[], T]) -> T | None:
        """Run ``step``, one job's part of a transaction shared with other jobs, in a savepoint.

        Should it raise (anything but a database error, which is the whole transaction's),
        its writes are undone, the error is logged and the job, if it can still move, fails
        with INTERNAL_ERROR: a job the forge cannot handle must neither stop the work for the
        others (housekeeping would fail on it at every tick) nor be left stuck.
        """
        try:
            with conn.savepoint():
                return step()
        except db.DatabaseError:
            raise
        except Exception:
            log.exception("the forge could not handle job %s; it fails", job_id)
        with conn.savepoint():
            row = db.get_job(conn, job_id)
            if row is None:
                return None
            if row["status"] in ACTIVE_STATUSES:
                envelope = self.envelope(
                    "INTERNAL_ERROR",
                    "FORGE_INTERNAL_ERROR",
                    f"The forge could not handle job {job_id} (see the forge's log)",
                    retryable=False,
                )
                self._fail(conn, row, envelope, now, SLOT_FREE)
            elif row["slot_runner"] is not None:
                db.update_job(conn, job_id, SLOT_FREE, attempts=int(row["attempts"]))
        return None
