"""Queries on JobEvents: queued for commit, stored, listed in time order, and asked about.

A job's events are ordered by their own timestamps, not their arrival: a runner's progress
comes through its outbox and may land after the job's end. The few statements that read
inside the JSON documents are written once per dialect (``conn.postgres``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .codec import dumps
from .interface import INSERT_EVENT, Conn, Row


def queue_event(conn: Conn, event_id: str, job_id: str, type_: str, document: str) -> None:
    """Write a JobEvent (its ``dumps`` document) when the transaction commits."""
    conn.queued_events.append((event_id, job_id, type_, document))


def insert_event(conn: Conn, event: Mapping[str, Any]) -> bool:
    """Store a JobEvent document; False when an event with its id is already stored."""
    cursor = conn.execute(INSERT_EVENT, (event["id"], event["jobId"], event["type"], dumps(event)))
    return cursor.rowcount > 0


def list_events(conn: Conn, job_id: str, *, limit: int, offset: int) -> tuple[list[Row], int]:
    total = conn.execute("SELECT COUNT(*) FROM events WHERE job_id = ?", (job_id,)).fetchone()[0]
    # Oldest first by when each happened (its own timestamp), not by when it arrived: a
    # runner's progress comes through its outbox and may land after the job's end.
    rows = conn.execute(
        f"SELECT * FROM events WHERE job_id = ? ORDER BY {_event_time(conn)}, seq LIMIT ? OFFSET ?",
        (job_id, limit, offset),
    ).fetchall()
    return rows, int(total)


def _event_time(conn: Conn) -> str:
    """An event's own timestamp as a value that orders by time, in the store's dialect."""
    if conn.postgres:
        return "CAST(document::jsonb ->> 'timestamp' AS timestamptz)"
    return "julianday(json_extract(document, '$.timestamp'))"


def attempt_at(conn: Conn, job_id: str, timestamp: str) -> int | None:
    """The attempt of ``job_id`` that was running at ``timestamp``: the last one whose
    ``job.started`` event is not later (None when none is, a runner's clock being behind)."""
    if conn.postgres:
        attempt, at = (
            "CAST(document::jsonb #>> '{data,attempt}' AS integer)",
            "CAST(? AS timestamptz)",
        )
    else:
        attempt, at = "json_extract(document, '$.data.attempt')", "julianday(?)"
    row = conn.execute(
        f"SELECT MAX({attempt}) FROM events WHERE job_id = ? AND type = 'job.started'"
        f" AND {_event_time(conn)} <= {at}",
        (job_id, timestamp),
    ).fetchone()
    return None if row is None or row[0] is None else int(row[0])


def runner_was_sent(conn: Conn, job_id: str, runner_id: str) -> bool:
    """Whether an attempt of the job was ever sent to ``runner_id`` (its job.started events)."""
    runner = (
        "document::jsonb #>> '{data,runnerId}'"
        if conn.postgres
        else "json_extract(document, '$.data.runnerId')"
    )
    row = conn.execute(
        f"SELECT 1 FROM events WHERE job_id = ? AND type = 'job.started' AND {runner} = ? LIMIT 1",
        (job_id, runner_id),
    ).fetchone()
    return row is not None
