"""Jobs: submission, status, cancellation, attempts and their outcomes, events.

The state machine (every change happens in one transaction that also writes a JobEvent and
a TruthCore assertion ``(jobId, "status", <status>)``; the dispatcher records answers and
claims jobs many to a transaction, and ``POST /jobs`` requests arriving together share one)::

    queued ──dispatch──▶ running ──success──▶ completed
    running ──failure, policy says retry──▶ retrying ──next attempt time──▶ running
    running ──failure, no retry / retries used up──▶ failed
    running ──refused (the runner did not run it)──▶ retrying (the attempt is given back)
    running ──runner offline or gone──▶ retrying (counted as an attempt, eligible at once)
    queued/retrying past metadata.expiresAt ──▶ failed (TIMEOUT / JOB_EXPIRED)
    queued UNMATCHED_JOB_EXPIRY_S, no runner lists the type ──▶ failed (NO_RUNNER_FOR_TYPE)
    queued/retrying/running ──cancel──▶ cancelled

A status change is stamped (its events, assertions and ``updated_at``) once its transaction
holds the writers' turn, not before it waited for it: write transactions take turns, so the
forge's records are in the order the changes happened, and a job started in a slot another
job freed is never recorded as starting before that job ended.

A job that is sent to a runner holds one of that runner's capability slots (``slot_runner``)
until the attempt's answer arrives, the runner goes offline, or the attempt's lease passes.
A cancelled job keeps its slot while the runner is still working on it, so ``maxConcurrency``
counts what runners really run.

A refusal (:func:`is_refusal`: the runner runs this job already, is at capacity, is busy or
shutting down, or answered 429) is not a failed attempt: the runner did not run the job. The
attempt is given back and the job waits the retryAfter the runner asked for (capped by
RETRY_AFTER_CAP_S), at least its policy's backoff, then is sent again; for
``JOB_ALREADY_RUNNING`` the next delivery finds the job's answer stored (a replay) or the
job still running. So that a runner refusing for ever cannot hold a job for ever, refusals
are free only within the job's own time budget, ``(maxRetries + 1) * (timeoutMs +
DISPATCH_MARGIN_MS)`` from its first start; later ones spend attempts like any failure.

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
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from runnerkit._version import __version__
from runnerkit.contracts import format_timestamp
from runnerkit.errors import (
    Conflict,
    NotFound,
    ValidationFailed,
    make_envelope,
    retry_delay,
    should_retry,
)
from runnerkit.errors.redaction import might_hold_secrets, redact, redact_job

from . import db, truth, violations
from .settings import ForgeSettings

log = logging.getLogger("runnerkit.forge.jobs")

T = TypeVar("T")

#: Statuses a job can still leave.
ACTIVE_STATUSES = ("pending", "queued", "retrying", "running")
#: Statuses a job never leaves.
FINAL_STATUSES = ("completed", "failed", "cancelled")

#: The most finished jobs one housekeeping pass deletes (a pass is one transaction).
PRUNE_BATCH = 1000

#: The longest wait the forge schedules (100 years): a retry delay, a lease, a read timeout.
#: The contract bounds none of timeoutMs, backoffMs or maxBackoffMs; longer values are cut to
#: this, which every clock, timestamp and socket timeout here can still represent.
MAX_WAIT_MS = 100 * 365.25 * 24 * 3600 * 1000.0

_string = json.JSONEncoder().encode  # a str as db.dumps writes it

_SLOT_FREE: dict[str, Any] = {"slot_runner": None, "slot_capability": None, "lease_until": None}

#: Error codes with which runnerkit runners refuse a job without running it.
REFUSAL_CODES = frozenset(
    {"JOB_ALREADY_RUNNING", "CAPACITY_EXCEEDED", "QUEUE_FULL", "WORKER_BUSY", "SHUTTING_DOWN"}
)

#: A job row, or a copy of one with some columns replaced.
RowLike = db.Row | Mapping[str, Any]


def is_refusal(envelope: Mapping[str, Any]) -> bool:
    """Whether a runner's error says it did not run the job (it may be sent again as it was).

    runnerkit's own refusal codes, and any RATE_LIMITED answer (HTTP 429 means the request
    was not processed).
    """
    return envelope.get("code") in REFUSAL_CODES or envelope.get("category") == "RATE_LIMITED"


class Clock:
    """One instant as epoch seconds, a contract timestamp and a monotonic reading.

    ``ts`` and ``z`` are what the forge stores and shows (wall-clock time, for people and the
    contracts); ``mono`` (``time.monotonic()``, one clock for every process of the machine)
    is what the forge measures intervals with, so a step of the system clock neither stops
    its housekeeping nor makes every runner look silent. An instant given as ``ts`` is as
    far from now on the monotonic clock as on the wall clock.
    """

    __slots__ = ("mono", "ms", "ts", "z")

    def __init__(self, ts: float | None = None) -> None:
        if ts is None:
            self.ts, self.mono = time.time(), time.monotonic()
        else:
            self.ts, self.mono = ts, time.monotonic() + (ts - time.time())
        moment = datetime.fromtimestamp(self.ts, UTC)
        self.z = format_timestamp(moment)
        #: ``z`` read back as epoch seconds (whole milliseconds, as ``truth.epoch(z)``).
        self.ms = moment.replace(microsecond=moment.microsecond // 1000 * 1000).timestamp()


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as handle:
            return handle.read().strip()
    except OSError:
        return ""


#: This machine's boot: ``time.monotonic()`` readings of two processes compare only within
#: one ('' where the system does not say, and then never).
BOOT_ID = _boot_id()


def monotonic_of(record: Mapping[str, Any]) -> float | None:
    """The ``mono`` reading of a record another process wrote with its ``boot``, if it was
    taken on this machine since it started (so comparable with ``time.monotonic()``)."""
    mono = record.get("mono")
    if not BOOT_ID or record.get("boot") != BOOT_ID or isinstance(mono, bool):
        return None
    if not isinstance(mono, int | float) or not 0 <= mono <= time.monotonic():
        return None
    return float(mono)


class Sightings:
    """When this process saw each runner's latest heartbeat, on the monotonic clock.

    A heartbeat is stored with its wall-clock time (``last_seen``), which a clock step moves.
    The sweep notes the monotonic time at which it first sees each new ``last_seen`` and
    counts a runner's silence from there: a heartbeat is seen within one sweep of its
    arrival, and a runner seen for the first time (just registered, or the dispatcher just
    took over) gets a full window.
    """

    def __init__(self) -> None:
        self._seen: dict[str, tuple[float, float]] = {}  # id → (last_seen, monotonic then)

    def silent(
        self, runners: Sequence[db.Row], now: Clock, grace_from: float, missed: int
    ) -> list[str]:
        """Ids of ``runners`` silent for more than ``missed`` heartbeat intervals, counted
        from ``grace_from`` (monotonic) at the earliest."""
        seen: dict[str, tuple[float, float]] = {}
        silent: list[str] = []
        for runner in runners:
            runner_id, stored = runner["id"], float(runner["last_seen"])
            previous = self._seen.get(runner_id)
            at = previous[1] if previous is not None and previous[0] == stored else now.mono
            seen[runner_id] = (stored, at)
            window = float(runner["heartbeat_interval_ms"]) * missed / 1000.0
            if now.mono - max(at, grace_from) > window:
                silent.append(runner_id)
        self._seen = seen
        return silent


class Leases:
    """Each attempt's lease on this process's monotonic clock.

    The database keeps a lease as wall-clock time (``lease_until``: a forge that restarts
    finds it there, and people read it). This process counts a lease from when it wrote it,
    or else from when it first read it, for at most one lease length: a forward step of the
    clock does not expire every lease at once, and a backward one does not stretch them.
    """

    def __init__(self) -> None:
        self._due: dict[tuple[str, int, float], float] = {}  # (job, attempt, lease) → due

    def note(self, job_id: str, attempt: int, until: float, due_mono: float) -> None:
        """A lease this process just wrote: ``until`` (stored) is due at ``due_mono``."""
        self._due[(job_id, attempt, until)] = due_mono

    def passed(self, row: RowLike, now: Clock, longest_s: float) -> bool:
        """Whether the lease of ``row`` (holding one) has passed."""
        until = float(row["lease_until"])
        key = (row["id"], int(row["attempts"]), until)
        due = self._due.get(key)
        if due is None:
            due = now.mono + min(max(0.0, until - now.ts), longest_s)
            self._due[key] = due
        return now.mono > due

    def keep(self, job_ids: set[str]) -> None:
        """Forget the leases of jobs that hold no slot any more."""
        if len(self._due) > len(job_ids):
            self._due = {k: v for k, v in self._due.items() if k[0] in job_ids}


@dataclass
class Outcome:
    """What one attempt produced, whichever way it arrived."""

    success: bool
    data: Any = None
    has_data: bool = False
    error: dict[str, Any] | None = None
    execution_ms: float | None = None
    #: The runner answered 202: the job runs on and its result will be POSTed later.
    accepted: bool = False


#: What the dispatcher picked for one job: (job row, runner row, capability id).
Pick = tuple[db.Row, db.Row, str]


@dataclass(frozen=True)
class Claim:
    """One attempt the dispatcher has taken: everything needed to send it."""

    job_id: str
    attempt: int
    request: dict[str, Any]
    runner_id: str
    runner_name: str
    base_url: str
    capability_id: str
    asynchronous: bool
    correlation_id: str


Claims = list[Claim]


class _Submission:
    """One ``POST /jobs`` waiting for its group commit."""

    __slots__ = ("answer", "done", "error", "lead", "now", "values")

    def __init__(self, values: dict[str, Any], now: Clock) -> None:
        self.values = values
        self.now = now
        self.done = threading.Event()
        self.lead = False  # set with ``done``: write the waiting group instead
        self.answer: tuple[int, str] | None = None
        self.error: Exception | None = None


def correlation_id_for(job_id: str, request: Mapping[str, Any]) -> str:
    """The job's own correlationId, else a uuid derived from its id (stable across retries)."""
    given = request.get("metadata", {}).get("correlationId")
    return str(given) if given else str(uuid.uuid5(uuid.NAMESPACE_URL, f"jobforge:job:{job_id}"))


def _error_summary(envelope: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "category": envelope.get("category"),
        "code": envelope.get("code"),
        "message": envelope.get("message"),
    }


class JobStore:
    """Every job operation of the forge, shared by the HTTP API and the dispatcher."""

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

    # -- documents -------------------------------------------------------------------------

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
            f'{{"data":{db.dumps(data)},"id":"{event_id}","jobId":{_string(job_id)},'
            f'"metadata":{self._event_metadata},"timestamp":"{now.z}","type":{_string(type_)}}}'
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

    # -- the API ---------------------------------------------------------------------------

    def submit(self, request: Mapping[str, Any]) -> tuple[int, str]:
        """Queue a loaded JobRequest: (202, JobResponse); the same request again → (200, ...).

        The JobResponse comes as JSON text: a new job's is written around the request
        document just stored, without encoding the request again.

        The same id with a different request is a 409 RESOURCE_CONFLICT. Submissions arriving
        together in this process share one transaction (see :meth:`_commit_submissions`).
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
            item.done.wait()
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
                waiting.done.set()
            with self._group_lock:
                if self._group:
                    successor = self._group[0]
                    successor.lead = True
                    successor.done.set()
                else:
                    self._group_writing = False

    def _write_submissions(self, group: list[_Submission]) -> None:
        """One transaction for ``group``; if it fails, one transaction per submission."""
        answers: list[tuple[_Submission, tuple[int, str] | None, Exception | None]]
        answers = []
        try:
            with self.db.tx() as conn:
                for item in group:
                    try:
                        answers.append((item, self._insert(conn, item), None))
                    except Conflict as exc:  # nothing was written for it
                        answers.append((item, None, exc))
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

    def _insert(self, conn: db.Conn, item: _Submission) -> tuple[int, str]:
        values, now = item.values, item.now
        job_id = values["id"]
        if not db.insert_job(conn, values):
            existing = self._get(conn, job_id)
            if existing["request"] != values["request"]:
                raise Conflict(
                    f"Job {job_id} was already submitted with a different request",
                    code="JOB_ID_CONFLICT",
                    details=[{"message": "A different job has this id", "path": ["id"]}],
                )
            return 200, json.dumps(self.response(existing), separators=(",", ":"))
        created = {"type": values["type"], "priority": values["priority"]}
        self._emit(conn, job_id, "job.created", now, created)
        self._emit(conn, job_id, "job.queued", now, {"status": "queued"})
        self._assert_status(conn, job_id, "queued", now)
        # What GET /jobs/<id> answers for the row just written (the request as stored).
        if might_hold_secrets(values["request"]):
            body = {"id": job_id, "status": "queued", "request": db.loads(values["request"])}
            body["updatedAt"] = now.z
            return 202, json.dumps(redact(body), separators=(",", ":"))
        answer = (
            f'{{"id":{_string(job_id)},"status":"queued","request":{values["request"]},'
            f'"updatedAt":"{now.z}"}}'
        )
        return 202, answer

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
        return {
            "items": items,
            "total": total,
            "limit": limit,
            "offset": offset,
            "hasMore": offset + len(items) < total,
        }

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
            now = Clock()  # once this change has its turn (see the module docstring)
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
                    db.update_job(conn, job_id, _SLOT_FREE, attempts=row["attempts"])
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

    def _within_refusal_budget(self, row: RowLike, now: Clock) -> bool:
        """Whether a refusal may still be free (see the module docstring)."""
        started = row["first_started_at"]
        if not started:
            return True
        policy = db.loads(row["request"])["retryPolicy"]
        per_attempt_ms = float(row["timeout_ms"]) + float(self.settings.dispatch_margin_ms)
        budget_s = (int(policy["maxRetries"]) + 1) * per_attempt_ms / 1000.0
        return now.ts - truth.epoch(started) < budget_s

    def _retry_delay_ms(self, delay_ms: float, envelope: Mapping[str, Any]) -> float:
        """How long before a job is sent again: the policy's ``delay_ms``, or the runner's
        ``retryAfter`` when that is longer (capped by RETRY_AFTER_CAP_S), at most MAX_WAIT_MS."""
        retry_after = envelope.get("retryAfter")
        if isinstance(retry_after, int | float) and not isinstance(retry_after, bool):
            capped = min(float(retry_after), float(self.settings.retry_after_cap_s))
            delay_ms = max(delay_ms, capped * 1000.0)
        return min(delay_ms, MAX_WAIT_MS)

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
                **_SLOT_FREE,
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
            "error": _error_summary(envelope),
        }
        self._emit(conn, job_id, "job.retrying", now, retrying)
        self._assert_status(conn, job_id, "retrying", now, {"attempts": attempts - 1})

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

    def events(self, job_id: str, *, limit: int, offset: int) -> dict[str, Any]:
        """A PaginatedResponse of the job's JobEvents, oldest first (redacted as the
        dashboard shows them)."""
        with self.db.snapshot() as conn:
            self._get(conn, job_id)
            rows, total = db.list_events(conn, job_id, limit=limit, offset=offset)
        items = [redact_job(db.loads(r["document"]), r["document"]) for r in rows]
        return {
            "items": items,
            "total": total,
            "limit": limit,
            "offset": offset,
            "hasMore": offset + len(items) < total,
        }

    def counts(self) -> dict[str, int]:
        with self.db.connection() as conn:
            return db.count_jobs_by_status(conn)

    # -- the dispatcher's side -------------------------------------------------------------

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
        for row, runner, capability_id in picks:
            timeout_ms = float(row["timeout_ms"])
            asynchronous = timeout_ms > threshold
            lease_ms = min(timeout_ms + margin * (2 if asynchronous else 1), MAX_WAIT_MS)
            lease_until = now.ts + lease_ms / 1000.0
            attempt = int(row["attempts"]) + 1
            taken = db.update_job(
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
            if not taken:
                continue
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
    ) -> str:
        """:meth:`finish` inside the caller's transaction."""
        row = db.get_job(conn, job_id)
        if row is None:
            return "ignored"
        if row["status"] != "running" or int(row["attempts"]) != attempt:
            if row["status"] in ACTIVE_STATUSES and self._late_result(row, outcome):
                # The answer of an earlier attempt (or one requeued meanwhile): the result.
                self._apply(conn, self._as_run_by(conn, row, runner_id), outcome, now, late=True)
                return "recorded"
            if row["slot_runner"] is not None and int(row["attempts"]) == attempt:
                db.update_job(conn, job_id, _SLOT_FREE, attempts=attempt)
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
        slot = {} if late and row["status"] == "running" else _SLOT_FREE
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
                "error": _error_summary(envelope),
            }
            self._emit(conn, job_id, "job.retrying", now, retrying)
            self._assert_status(conn, job_id, "retrying", now, {"attempts": attempts})
            return "retrying"
        self._fail(conn, row, envelope, now, values)
        return "failed"

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
        summary = {"attempts": attempts, "error": _error_summary(envelope)}
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
                self._fail(conn, row, envelope, now, _SLOT_FREE)
            elif row["slot_runner"] is not None:
                db.update_job(conn, job_id, _SLOT_FREE, attempts=int(row["attempts"]))
        return None

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
                db.update_job(conn, row["id"], _SLOT_FREE, attempts=attempt)
                return None
            envelope = self.envelope(
                "NETWORK_ERROR",
                "RUNNER_OFFLINE" if runner_status == "offline" else "RUNNER_GONE",
                f"Runner {row['runner_id']} {gone} while running attempt {attempt}",
                retryable=True,
            )
            self._retry_or_fail(conn, row, envelope, now, _SLOT_FREE, immediate=True)
            return "requeued"
        if self._lease_passed(row, now) and not waiting_here:
            if not running:
                db.update_job(conn, row["id"], _SLOT_FREE, attempts=attempt)
                return None
            envelope = self.envelope(
                "TIMEOUT",
                "RESULT_OVERDUE",
                f"No result for attempt {attempt} within {row['timeout_ms']:g} ms "
                "(plus the dispatch margin)",
                retryable=True,
            )
            self._retry_or_fail(conn, row, envelope, now, _SLOT_FREE)
            return "overdue"
        return None

    def _sweep_due(self, row: db.Row, in_flight: Mapping[str, int], now: Clock) -> bool:
        """Whether housekeeping has anything to do for this job holding a slot (``sweep``)."""
        if in_flight.get(row["id"]) == int(row["attempts"]):
            # This process still waits for the runner's answer; only "offline" overrides that.
            return bool(row["runner_status"] == "offline")
        return row["runner_status"] in ("offline", None) or self._lease_passed(row, now)

    def _lease_passed(self, row: db.Row, now: Clock) -> bool:
        if row["lease_until"] is None:
            return False
        margin = float(self.settings.dispatch_margin_ms)
        longest_ms = min(float(row["timeout_ms"]) + 2 * margin, MAX_WAIT_MS)
        return self.leases.passed(row, now, longest_ms / 1000.0)
