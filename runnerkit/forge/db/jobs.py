"""Queries on jobs: insertion, the dispatch order, transitions, sweeps, pruning, deliveries.

Every function runs inside the caller's connection or transaction (:class:`~.interface.Conn`).
A transition sets only :data:`JOB_COLUMNS`, and only while the job is still in the status
(and attempt) it was read in. Waiting jobs are read along ``jobs_wait``, one ordered walk per
status and job type; on PostgreSQL, a claim in a write transaction locks what it reads
(``FOR UPDATE SKIP LOCKED``) so two forge instances never take one job.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .codec import loads
from .interface import Conn, Row
from .pg_rows import CLAIM_JOBS, claim_parameters

#: Job columns a transition may set (``update_job`` refuses anything else).
JOB_COLUMNS = frozenset(
    {
        "status",
        "updated_at",
        "not_before",
        "attempts",
        "runner_id",
        "runner_name",
        "runner_version",
        "capability_id",
        "first_started_at",
        "attempt_started_at",
        "slot_runner",
        "slot_capability",
        "lease_until",
        "async",
        "result",
        "error",
        "last_error",
    }
)


def insert_job(conn: Conn, values: Mapping[str, Any]) -> Any:
    """Insert a job; its cursor's ``rowcount`` is 0 (and nothing written) when a job with
    its id exists. In a pipeline (PostgreSQL) the count is known once the block ends."""
    return conn.execute(
        "INSERT INTO jobs (id, type, priority, status, request, submitted, updated_at,"
        " not_before, expires, timeout_ms)"
        " VALUES (:id, :type, :priority, :status, :request, :submitted, :updated_at,"
        " :not_before, :expires, :timeout_ms) ON CONFLICT (id) DO NOTHING",
        values,
    )


#: The finished jobs a prune deletes, oldest first: along the ``jobs_finished`` partial index
#: (its condition repeated word for word, and named: left to itself the planner may walk
#: ``jobs_slot`` for ``slot_runner IS NULL``, nearly every job, and sort them all).
PRUNE_QUERY = (
    "SELECT seq, id FROM jobs INDEXED BY jobs_finished"
    " WHERE status IN ('completed', 'failed', 'cancelled')"
    " AND updated_at < ? AND slot_runner IS NULL ORDER BY updated_at LIMIT ?"
)


def prune_finished_jobs(conn: Conn, *, before: str, limit: int) -> int:
    """Delete up to ``limit`` finished jobs last updated before ``before`` (a Z timestamp),
    oldest first, with their events and delivery records; how many were deleted.

    A cancelled job whose runner has not answered yet still holds its slot
    (``slot_runner``): it stays until the answer frees it.
    """
    rows = conn.execute(PRUNE_QUERY, (before, limit)).fetchall()
    ids = [(row["id"],) for row in rows]
    conn.executemany("DELETE FROM events WHERE job_id = ?", ids)
    conn.executemany("DELETE FROM deliveries WHERE job_id = ?", ids)
    conn.executemany("DELETE FROM jobs WHERE seq = ?", [(row["seq"],) for row in rows])
    return len(rows)


def queued_types(conn: Conn) -> list[str]:
    """The job types of queued jobs (one walk of ``jobs_wait``'s ``queued`` range)."""
    return [r[0] for r in conn.execute("SELECT DISTINCT type FROM jobs WHERE status = 'queued'")]


def taken_types(conn: Conn) -> set[str]:
    """Every job type some registered runner that is not offline lists."""
    types: set[str] = set()
    for row in conn.execute("SELECT document FROM runners WHERE status != 'offline'"):
        for capability in loads(row[0]).get("capabilities", []):
            types.update(capability.get("supportedJobTypes", []))
    return types


def queued_since(conn: Conn, job_type: str, *, before: float, limit: int) -> list[Row]:
    """Jobs of ``job_type`` queued (never sent) since before ``before`` (epoch seconds)."""
    return conn.execute(
        "SELECT * FROM jobs WHERE status = 'queued' AND type = ? AND submitted <= ?"
        " ORDER BY seq LIMIT ?",
        (job_type, before, limit),
    ).fetchall()


def get_job(conn: Conn, job_id: str) -> Row | None:
    row: Row | None = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
    return row


def get_jobs(conn: Conn, job_ids: Sequence[str]) -> dict[str, Row]:
    """The rows of ``job_ids`` that exist, by id: one query, not one per job."""
    found: dict[str, Row] = {}
    for start in range(0, len(job_ids), 500):  # SQLite's bound on parameters is far above
        chunk = job_ids[start : start + 500]
        sql = f"SELECT * FROM jobs WHERE id IN ({', '.join('?' * len(chunk))})"
        for row in conn.execute(sql, chunk):
            found[row["id"]] = row
    return found


def list_jobs(
    conn: Conn,
    *,
    statuses: Sequence[str] = (),
    job_type: str | None = None,
    limit: int = 50,
    offset: int = 0,
) -> tuple[list[Row], int]:
    clauses: list[str] = []
    args: list[Any] = []
    if statuses:
        clauses.append(f"status IN ({', '.join('?' * len(statuses))})")
        args.extend(statuses)
    if job_type is not None:
        clauses.append("type = ?")
        args.append(job_type)
    where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
    total = conn.execute(f"SELECT COUNT(*) FROM jobs {where}", args).fetchone()[0]
    rows = conn.execute(
        f"SELECT * FROM jobs {where} ORDER BY seq DESC LIMIT ? OFFSET ?", [*args, limit, offset]
    ).fetchall()
    return rows, int(total)


def eligible_jobs(
    conn: Conn, *, now: float, limit: int, types: Sequence[str] | None = None
) -> list[Row]:
    """Jobs waiting for a runner, in dispatch order: priority desc, then age.

    ``types`` limits the answer to job types some runner can take right now. With types,
    each (status, type) is one ordered walk of the ``jobs_wait`` index that stops after
    ``limit`` rows, however long the history of the type.
    """
    if types is None:
        sql = (
            "SELECT * FROM jobs WHERE status IN ('queued', 'retrying')"
            " AND (not_before IS NULL OR not_before <= ?) AND (expires IS NULL OR expires > ?)"
            " ORDER BY priority DESC, seq ASC LIMIT ?"
        )
        return conn.execute(sql, (now, now, limit)).fetchall()
    # In a write transaction on PostgreSQL the rows are claimed as they are read: another
    # forge instance's claim skips them instead of waiting (or taking them twice).
    return waiting_jobs(conn, now=now, limits=[(job_type, limit) for job_type in types])[:limit]


def waiting_jobs(conn: Conn, *, now: float, limits: Sequence[tuple[str, int]]) -> list[Row]:
    """Jobs waiting for a runner, at most ``limit`` of each (job type, limit), in dispatch
    order (priority desc, then age).

    Each (status, type) is one ordered walk of the ``jobs_wait`` index that stops after its
    limit. Every query is sent before any is read: in a pipeline (PostgreSQL) they all cost
    one round trip.
    """
    # In a write transaction on PostgreSQL the rows are claimed as they are read: another
    # forge instance's claim skips them instead of waiting (or taking them twice).
    if conn.postgres and conn.writing:
        # Both statuses' walks in one statement; the rows they find are locked as read.
        sent = [
            (limit, [conn.execute(_WAITING_FOR_CLAIM, (job_type, now, now, limit) * 2)])
            for job_type, limit in limits
        ]
    else:
        sent = [
            (limit, [conn.execute(_WAITING, (s, job_type, now, now, limit)) for s in _WAITS])
            for job_type, limit in limits
        ]
    rows: list[Row] = []
    for limit, cursors in sent:
        of_type = [row for cursor in cursors for row in cursor]
        of_type.sort(key=_dispatch_order)
        rows.extend(of_type[:limit])
    rows.sort(key=_dispatch_order)
    return rows


_WAITS = ("queued", "retrying")


_WAITING = (
    "SELECT * FROM jobs WHERE status = ? AND type = ?"
    " AND (not_before IS NULL OR not_before <= ?) AND (expires IS NULL OR expires > ?)"
    " ORDER BY priority DESC, seq ASC LIMIT ?"
)
_WAITING_SEQ = (
    "SELECT seq FROM jobs WHERE status = '{}' AND type = ?"
    " AND (not_before IS NULL OR not_before <= ?) AND (expires IS NULL OR expires > ?)"
    " ORDER BY priority DESC, seq ASC LIMIT ?"
)
#: PostgreSQL, claiming: each status's ordered walk, stopped at the limit, in one statement;
#: another forge instance's transaction holding a row makes this one skip it, never wait.
#: ``= ANY(ARRAY(...))``, not ``IN (...)``: a prepared statement's generic plan cannot know
#: the limit, and for ``IN`` it would scan every job to join the few found.
_WAITING_FOR_CLAIM = (
    f"SELECT * FROM jobs WHERE seq = ANY(ARRAY(({_WAITING_SEQ.format('queued')}) UNION ALL"
    f" ({_WAITING_SEQ.format('retrying')}))) FOR UPDATE SKIP LOCKED"
)


def _dispatch_order(row: Row) -> tuple[int, int]:
    return -int(row["priority"]), int(row["seq"])


def expired_jobs(conn: Conn, *, now: float) -> list[Row]:
    """Waiting jobs whose ``expiresAt`` has passed."""
    return conn.execute(
        "SELECT * FROM jobs WHERE status IN ('pending', 'queued', 'retrying')"
        " AND expires IS NOT NULL AND expires <= ?",
        (now,),
    ).fetchall()


def shift_waits(conn: Conn, step_s: float) -> None:
    """Move the forge's own wall-clock marks by ``step_s`` (the clock stepped): queued jobs'
    submission times, retries' due times and attempts' leases."""
    conn.execute("UPDATE jobs SET submitted = submitted + ? WHERE status = 'queued'", (step_s,))
    conn.execute(
        "UPDATE jobs SET not_before = not_before + ? WHERE status = 'retrying'"
        " AND not_before IS NOT NULL",
        (step_s,),
    )
    conn.execute(
        "UPDATE jobs SET lease_until = lease_until + ? WHERE seq IN"
        " (SELECT seq FROM jobs WHERE slot_runner IS NOT NULL) AND lease_until IS NOT NULL",
        (step_s,),
    )


def retries_due_after(conn: Conn, when: float) -> list[Row]:
    """Jobs waiting to be retried that are not due before ``when``."""
    return conn.execute(
        "SELECT * FROM jobs WHERE status = 'retrying' AND not_before > ?", (when,)
    ).fetchall()


def jobs_holding_slots(conn: Conn) -> list[Row]:
    """Running jobs and jobs that still hold a runner slot, with their runner's status.

    ``runner_status`` is NULL when the runner is no longer registered.
    """
    # Two index searches, not a scan of every job ever submitted (this runs every sweep).
    return conn.execute(
        "SELECT jobs.*, runners.status AS runner_status FROM jobs"
        " LEFT JOIN runners ON runners.id = COALESCE(jobs.slot_runner, jobs.runner_id)"
        " WHERE jobs.seq IN (SELECT seq FROM jobs WHERE status = 'running'"
        " UNION SELECT seq FROM jobs WHERE slot_runner IS NOT NULL)"
    ).fetchall()


def update_job(
    conn: Conn,
    job_id: str,
    values: Mapping[str, Any],
    *,
    statuses: Iterable[str] | None = None,
    attempts: int | None = None,
) -> bool:
    """Set ``values`` on a job, only while it is in one of ``statuses`` / at ``attempts``;
    whether it was. Inside a pipeline (PostgreSQL) that answer is not known yet: there it
    is always False, so only a caller that does not read it may update there. In a
    pipelined transaction the update waits for the next statement, and updates of one
    shape next to each other go out as one (:meth:`.interface.QueuedWrites.update_later`)."""
    unknown = set(values) - JOB_COLUMNS
    if unknown:
        raise ValueError(f"not job columns: {sorted(unknown)}")
    wanted = None if statuses is None else tuple(statuses)
    if conn.update_later(job_id, values, wanted, attempts):
        return False  # sent with the next statement, as in a pipeline
    assignments = ", ".join(f'"{k}" = ?' for k in values)
    sql = f"UPDATE jobs SET {assignments} WHERE id = ?"
    args: list[Any] = [*values.values(), job_id]
    if wanted is not None:
        sql += f" AND status IN ({', '.join('?' * len(wanted))})"
        args.extend(wanted)
    if attempts is not None:
        sql += " AND attempts = ?"
        args.append(attempts)
    return conn.execute(sql, args).rowcount > 0


def claim_jobs(conn: Conn, claims: Sequence[Mapping[str, Any]]) -> set[str]:
    """Start the next attempt of each claimed job still waiting (``queued``/``retrying``) at
    the attempt before it; the ids taken.

    A claim holds ``id``, ``seq``, ``attempts`` (the new attempt's number), ``updated_at`` (also the
    attempt's start), ``runner_id``/``slot_runner``, ``runner_name``, ``runner_version``,
    ``capability_id``/``slot_capability``, ``first_started_at``, ``lease_until``, ``async``.
    On PostgreSQL all of them are one statement (:data:`.pg_rows.CLAIM_JOBS`).
    """
    if conn.postgres:
        cursor = conn.execute(CLAIM_JOBS, claim_parameters(claims))
        return {row[0] for row in cursor.fetchall()}
    taken: set[str] = set()
    for claim in claims:
        values = {
            "status": "running",
            "updated_at": claim["updated_at"],
            "attempts": claim["attempts"],
            "not_before": None,
            "runner_id": claim["runner_id"],
            "runner_name": claim["runner_name"],
            "runner_version": claim["runner_version"],
            "capability_id": claim["capability_id"],
            "first_started_at": claim["first_started_at"],
            "attempt_started_at": claim["updated_at"],
            "slot_runner": claim["runner_id"],
            "slot_capability": claim["capability_id"],
            "lease_until": claim["lease_until"],
            "async": claim["async"],
        }
        statuses = ("queued", "retrying")
        if update_job(conn, claim["id"], values, statuses=statuses, attempts=claim["attempts"] - 1):
            taken.add(claim["id"])
    return taken


def count_jobs_by_status(conn: Conn) -> dict[str, int]:
    rows = conn.execute("SELECT status, COUNT(*) AS n FROM jobs GROUP BY status").fetchall()
    return {r["status"]: int(r["n"]) for r in rows}


def record_delivery(conn: Conn, job_id: str, digest: str, received: float) -> bool:
    """Remember one delivered result; False when this exact delivery was seen before."""
    cursor = conn.execute(
        "INSERT OR IGNORE INTO deliveries (job_id, digest, received) VALUES (?, ?, ?)",
        (job_id, digest, received),
    )
    return cursor.rowcount > 0
