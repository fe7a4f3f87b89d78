"""Queries on TruthCore assertions: written (now or at commit), read, searched and pruned.

Pruning walks the ``assertions_expires`` and ``assertions_ts`` indexes, a bounded batch at a
time; searches return unexpired assertions newest first.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .interface import INSERT_ASSERTION, Conn, Row


def insert_assertion(conn: Conn, values: Mapping[str, Any]) -> None:
    conn.execute(INSERT_ASSERTION, dict(values))


def queue_assertion(conn: Conn, values: dict[str, Any]) -> None:
    """Write an assertion row when the transaction commits (see :class:`Conn`)."""
    conn.queued_assertions.append(values)


def get_assertion(conn: Conn, assertion_id: str) -> Row | None:
    row: Row | None = conn.execute(
        "SELECT * FROM assertions WHERE id = ?", (assertion_id,)
    ).fetchone()
    return row


def prune_assertions(conn: Conn, *, before: float | None, now: float, limit: int) -> int:
    """Delete up to ``limit`` assertions timestamped before ``before`` (None: none by age) or
    whose ``expiresAt`` has passed; how many were deleted. Both along their own index."""
    deleted = conn.execute(
        "DELETE FROM assertions WHERE seq IN (SELECT seq FROM assertions"
        " INDEXED BY assertions_expires WHERE expires IS NOT NULL AND expires <= ? LIMIT ?)",
        (now, limit),
    ).rowcount
    if before is not None and deleted < limit:
        deleted += conn.execute(
            "DELETE FROM assertions WHERE seq IN (SELECT seq FROM assertions"
            " INDEXED BY assertions_ts WHERE ts < ? LIMIT ?)",
            (before, limit - deleted),
        ).rowcount
    return int(deleted)


def query_assertions(
    conn: Conn,
    *,
    now: float,
    subject: str | None = None,
    predicate: str | None = None,
    object_json: str | None = None,
    min_confidence: float = 0.0,
    sources: Sequence[str] | None = None,
    before: float | None = None,
    after: float | None = None,
    limit: int = 100,
    offset: int = 0,
) -> tuple[list[Row], int]:
    """Unexpired assertions matching the pattern and filters, newest first."""
    clauses = ["(expires IS NULL OR expires > ?)", "confidence >= ?"]
    args: list[Any] = [now, min_confidence]
    for column, value in (("subject", subject), ("predicate", predicate), ("object", object_json)):
        if value is not None:
            clauses.append(f"{column} = ?")
            args.append(value)
    if sources:
        clauses.append(f"source IN ({', '.join('?' * len(sources))})")
        args.extend(sources)
    if before is not None:
        clauses.append("ts < ?")
        args.append(before)
    if after is not None:
        clauses.append("ts > ?")
        args.append(after)
    where = " AND ".join(clauses)
    total = conn.execute(f"SELECT COUNT(*) FROM assertions WHERE {where}", args).fetchone()[0]
    rows = conn.execute(
        f"SELECT document FROM assertions WHERE {where} ORDER BY ts DESC, seq DESC"
        " LIMIT ? OFFSET ?",
        [*args, limit, offset],
    ).fetchall()
    return rows, int(total)
