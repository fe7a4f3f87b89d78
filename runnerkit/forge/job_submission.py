"""Submitting and cancelling jobs: what a client asks of the queue (``POST /jobs``,
``POST /jobs/<id>/cancel``).

A new job is queued (a ``job.created`` and a ``job.queued`` event, a ``queued`` assertion);
the same request again answers the stored job, another request with its id is a 409.
``POST /jobs`` requests arriving together in one process share one transaction (a group
commit, :meth:`JobSubmission._commit_submissions`): under load they would otherwise queue on
the database's write lock one by one.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Mapping
from typing import Any

from runnerkit.errors import Conflict
from runnerkit.errors.redaction import might_hold_secrets, redact

from . import db, truth
from .db.postgres import PgConn
from .job_records import JobRecords, json_string
from .jobs import ACTIVE_STATUSES, FINAL_STATUSES, Clock

log = logging.getLogger("runnerkit.forge.jobs")

#: A submission and its answer: (status, JobResponse JSON) or the error to raise.
_Answer = tuple["_Submission", tuple[int, str] | None, Exception | None]


class _Submission:
    """One ``POST /jobs`` waiting for its group commit."""

    __slots__ = ("answer", "done", "error", "lead", "notify", "now", "values")

    def __init__(self, values: dict[str, Any], now: Clock, notify: str | None) -> None:
        self.values = values
        self.now = now
        self.notify = notify
        # Held until the submission is written (or it is to lead): a follower waits by
        # taking it, and it is given back once. A lock, not an Event: one a submission, and
        # an Event is a Condition and a lock to make and to set.
        self.done = threading.Lock()
        self.done.acquire()
        self.lead = False  # set before ``done`` is given back: write the waiting group
        self.answer: tuple[int, str] | None = None
        self.error: Exception | None = None


class JobSubmission(JobRecords):
    """Queue new jobs (many to a transaction) and cancel them."""

    def submit(self, request: Mapping[str, Any], notify: str | None = None) -> tuple[int, str]:
        """Queue a loaded JobRequest: (202, JobResponse); the same request again → (200, ...).

        The JobResponse comes as JSON text: a new job's is written around the request
        document just stored, without encoding the request again.

        The same id with a different request is a 409 RESOURCE_CONFLICT. Submissions arriving
        together in this process share one transaction (see :meth:`_commit_submissions`).
        ``notify``: a channel the transaction NOTIFYs when it queues a job (PostgreSQL).
        """
        metadata = request["metadata"]
        now = Clock()
        scheduled = metadata.get("scheduledAt")
        expires = metadata.get("expiresAt")
        document = db.dumps(request)
        item = _Submission(
            {
                "id": request["id"],
                "type": request["type"],
                "priority": request["priority"],
                "status": "queued",
                "request": document,
                "submitted": now.ts,
                "updated_at": now.z,
                "not_before": truth.epoch(scheduled) if scheduled else None,
                "expires": truth.epoch(expires) if expires else None,
                "timeout_ms": float(request["timeoutMs"]),
            },
            now,
            notify,
        )
        self._commit_submissions(item)
        if item.error is not None:
            raise item.error
        assert item.answer is not None
        return item.answer

    def _commit_submissions(self, item: _Submission) -> None:
        """Group commit: the first waiting thread writes every queued submission at once.

        Under load several request threads submit at the same moment; rather than queue on
        the database lock one transaction each, they queue here and one of them (the leader)
        writes them all in one transaction. A leader writes one group, then hands the lead
        to the oldest submission still waiting, so no request waits for more than the group
        ahead of it. Alone, a submission is its own leader and waits for nothing.
        """
        with self._group_lock:
            self._group.append(item)
            lead = not self._group_writing
            self._group_writing = True
        if not lead:
            item.done.acquire()  # given back by the leader that wrote it, or handed the lead
            if not item.lead:
                return
        with self._group_lock:
            group, self._group = self._group, []
        try:
            self._write_submissions(group)
        finally:
            for waiting in group:
                if waiting.answer is None and waiting.error is None:
                    waiting.error = RuntimeError("the submission was not written")
                if waiting is not item:  # every other one waits for its ``done``
                    waiting.done.release()
            with self._group_lock:
                if self._group:
                    successor = self._group[0]
                    successor.lead = True
                    successor.done.release()
                else:
                    self._group_writing = False

    def _write_submissions(self, group: list[_Submission]) -> None:
        """One transaction for ``group``; if it fails, one transaction per submission."""
        answers: list[tuple[_Submission, tuple[int, str] | None, Exception | None]]
        try:
            answers = self._write_at_once(group) if self.db.postgres else self._write_in_tx(group)
        except Exception as exc:  # noqa: BLE001 - each request gets its own error
            if len(group) == 1:
                group[0].error = exc
                return
            log.warning("writing %d submissions together failed; one at a time", len(group))
            for item in group:
                self._write_submissions([item])
            return
        for item, answer, error in answers:
            item.answer, item.error = answer, error

    def _write_in_tx(self, group: list[_Submission]) -> list[_Answer]:
        """``group`` in one write transaction (SQLite): each job inserted, and its records
        queued, in its turn."""
        answers: list[_Answer] = []
        with self.db.tx() as conn:
            for item in group:
                if db.insert_job(conn, item.values).rowcount > 0:
                    self._queue_records(conn, item)
                    answers.append((item, self._new_answer(item), None))
                else:
                    answers.append(self._existing_answer(conn, item))
        return answers

    def _write_at_once(self, group: list[_Submission]) -> list[_Answer]:
        """``group`` in one statement (PostgreSQL): the jobs, their events and assertions.

        A statement is a transaction of its own, so this needs neither ``BEGIN``/``COMMIT``
        nor the writers' turn: it only adds rows (an id already taken adds nothing), which
        no other writer reads, decides on and changes meanwhile. One statement instead of
        six: psycopg's Python costs tens of microseconds a statement.
        """
        firsts: dict[str, _Submission] = {}
        for item in group:  # a second submission of an id in the group finds the first's
            firsts.setdefault(item.values["id"], item)
        with self.db.connection() as conn:
            assert isinstance(conn, PgConn)
            for item in firsts.values():
                self._queue_records(conn, item)
            channel = next((item.notify for item in group if item.notify), None)
            inserted = conn.insert_jobs([item.values for item in firsts.values()], channel)
            answers: list[_Answer] = []
            for item in group:
                job_id = item.values["id"]
                if firsts[job_id] is item and job_id in inserted:
                    answers.append((item, self._new_answer(item), None))
                else:
                    answers.append(self._existing_answer(conn, item))
        return answers

    def _existing_answer(self, conn: db.Conn, item: _Submission) -> _Answer:
        """A submission whose id is taken: the stored job (200) if it is the same request,
        else a 409 (nothing was written for it)."""
        job_id = item.values["id"]
        existing = self._get(conn, job_id)
        if existing["request"] != item.values["request"]:
            conflict = Conflict(
                f"Job {job_id} was already submitted with a different request",
                code="JOB_ID_CONFLICT",
                details=[{"message": "A different job has this id", "path": ["id"]}],
            )
            return item, None, conflict
        return item, (200, json.dumps(self.response(existing), separators=(",", ":"))), None

    def _queue_records(self, conn: db.Conn, item: _Submission) -> None:
        """A new job's ``job.created`` and ``job.queued`` events and ``queued`` assertion."""
        values, now = item.values, item.now
        job_id = values["id"]
        created = {"type": values["type"], "priority": values["priority"]}
        self._emit(conn, job_id, "job.created", now, created)
        self._emit(conn, job_id, "job.queued", now, {"status": "queued"})
        self._assert_status(conn, job_id, "queued", now)

    def _new_answer(self, item: _Submission) -> tuple[int, str]:
        """What ``GET /jobs/<id>`` answers for the row just written (the request as stored)."""
        values, now = item.values, item.now
        job_id = values["id"]
        if might_hold_secrets(values["request"]):
            body = {"id": job_id, "status": "queued", "request": db.loads(values["request"])}
            body["updatedAt"] = now.z
            return 202, json.dumps(redact(body), separators=(",", ":"))
        answer = (
            f'{{"id":{json_string(job_id)},"status":"queued","request":{values["request"]},'
            f'"updatedAt":"{now.z}"}}'
        )
        return 202, answer

    def cancel(self, job_id: str) -> dict[str, Any]:
        """queued/retrying/running → cancelled; cancelling a cancelled job changes nothing.

        A completed or failed job is a 409 RESOURCE_CONFLICT.
        """
        with self.db.tx() as conn:
            now = Clock()
            row = self._get(conn, job_id)
            if row["status"] == "cancelled":
                return self.response(row)
            if row["status"] in FINAL_STATUSES:
                raise Conflict(
                    f"Job {job_id} is already {row['status']} and cannot be cancelled",
                    code="JOB_FINISHED",
                )
            db.update_job(
                conn,
                job_id,
                {"status": "cancelled", "updated_at": now.z, "not_before": None},
                statuses=ACTIVE_STATUSES,
            )
            self._emit(conn, job_id, "job.cancelled", now, {"previousStatus": row["status"]})
            self._assert_status(conn, job_id, "cancelled", now)
            return self.response(self._get(conn, job_id))
