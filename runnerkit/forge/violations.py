"""The forge's record of what runners sent that broke a contract (the ``violations`` table).

Kept small on purpose: the last :data:`KEPT_PER_RUNNER` violations of each runner (those of
its execution answers name the job and attempt too), the last :data:`KEPT_UNATTRIBUTED` the
forge could tie to no runner, and a count per runner (``runners.violations``) that is never
cut. A refused heartbeat also leaves its reason on the runner's row (``runners.refusal``),
shown until the runner's next accepted heartbeat. What is checked and when is
:mod:`.referee`'s business; this module only stores and reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from . import db

#: Violations kept per runner (the newest), and of senders the forge could not identify.
KEPT_PER_RUNNER = 50
KEPT_UNATTRIBUTED = 50
#: Violations recorded from one document at most (one more line says how many were left out).
MAX_PER_DOCUMENT = 10
#: Characters of a message or a path kept (a value quoted in it included).
MAX_TEXT = 300


@dataclass(frozen=True)
class Violation:
    """One way a document broke its contract: the contract, the path in it, what is wrong."""

    contract: str
    path: str
    message: str


def _cut(text: str) -> str:
    return text if len(text) <= MAX_TEXT else text[: MAX_TEXT - 1] + "…"


def record(
    conn: db.Conn,
    violations: Sequence[Violation],
    *,
    runner_id: str | None,
    source: str,
    at: str,
    ts: float,
    job_id: str | None = None,
    attempt: int | None = None,
    unrecorded: int = 0,
) -> None:
    """Store ``violations`` (inside the caller's transaction) and cut the runner's history.

    ``runner_id`` None: a sender the forge could not identify, named by ``source``.
    ``unrecorded``: earlier violations left unrecorded by the rate limit, added to the count.
    """
    shown = list(violations[:MAX_PER_DOCUMENT])
    if len(violations) > len(shown):
        first = violations[0]
        left = len(violations) - len(shown)
        shown.append(Violation(first.contract, "", f"and {left} more in the same document"))
    conn.executemany(
        "INSERT INTO violations (runner_id, job_id, attempt, source, contract, path, message,"
        " at, ts) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            (
                runner_id,
                job_id,
                attempt,
                _cut(source),
                v.contract,
                _cut(v.path),
                _cut(v.message),
                at,
                ts,
            )
            for v in shown
        ],
    )
    if runner_id is None:
        conn.execute(
            "DELETE FROM violations WHERE runner_id IS NULL AND seq <= (SELECT seq FROM"
            " violations WHERE runner_id IS NULL ORDER BY seq DESC LIMIT 1 OFFSET ?)",
            (KEPT_UNATTRIBUTED,),
        )
        count = db.get_meta(conn, "unattributed_violations") or 0
        db.set_meta(conn, "unattributed_violations", int(count) + len(violations) + unrecorded)
        return
    conn.execute(
        "DELETE FROM violations WHERE runner_id = ? AND seq <= (SELECT seq FROM violations"
        " WHERE runner_id = ? ORDER BY seq DESC LIMIT 1 OFFSET ?)",
        (runner_id, runner_id, KEPT_PER_RUNNER),
    )
    conn.execute(
        "UPDATE runners SET violations = violations + ? WHERE id = ?",
        (len(violations) + unrecorded, runner_id),
    )


def note_refusal(conn: db.Conn, runner_id: str, message: str, ts: float) -> None:
    """Why the runner's latest heartbeat was refused (shown until one is accepted)."""
    conn.execute(
        "UPDATE runners SET refusal = ?, refusal_ts = ? WHERE id = ?",
        (_cut(message), ts, runner_id),
    )


def current_refusal(row: db.Row) -> str | None:
    """The runner's refused heartbeat, if none was accepted after it."""
    refusal = row["refusal"]
    if not refusal or row["refusal_ts"] is None:
        return None
    return str(refusal) if float(row["refusal_ts"]) >= float(row["last_seen"]) else None


def offline_reason(conn: db.Conn, runner_id: str) -> str:
    """`` (heartbeat refused: …)`` when the runner's latest heartbeat was refused, else ''."""
    row = conn.execute(
        "SELECT refusal, refusal_ts, last_seen FROM runners WHERE id = ?", (runner_id,)
    ).fetchone()
    refusal = None if row is None else current_refusal(row)
    return f" ({refusal})" if refusal else ""


def move(conn: db.Conn, old_runner: str, new_runner: str) -> None:
    """A runner re-registered under a new id: its violations and count follow it."""
    conn.execute(
        "UPDATE violations SET runner_id = ? WHERE runner_id = ?", (new_runner, old_runner)
    )
    conn.execute(
        "UPDATE runners SET violations = violations + COALESCE((SELECT violations FROM runners"
        " WHERE id = ?), 0) WHERE id = ?",
        (old_runner, new_runner),
    )


def forget(conn: db.Conn, runner_id: str) -> None:
    """A runner deregistered: its violations go with it."""
    conn.execute("DELETE FROM violations WHERE runner_id = ?", (runner_id,))


def _rows(conn: db.Conn, where: str, args: Sequence[Any], limit: int) -> list[dict[str, Any]]:
    rows = conn.execute(
        "SELECT runner_id, job_id, attempt, source, contract, path, message, at FROM violations"
        f" WHERE {where} ORDER BY seq DESC LIMIT ?",
        [*args, limit],
    ).fetchall()
    return [
        {
            "runnerId": row["runner_id"],
            "jobId": row["job_id"],
            "attempt": row["attempt"],
            "source": row["source"],
            "contract": row["contract"],
            "path": row["path"],
            "message": row["message"],
            "at": row["at"],
        }
        for row in rows
    ]


def of_runner(conn: db.Conn, runner_id: str, limit: int = KEPT_PER_RUNNER) -> list[dict[str, Any]]:
    """The runner's kept violations, newest first."""
    return _rows(conn, "runner_id = ?", (runner_id,), limit)


def of_job(conn: db.Conn, job_id: str, limit: int = KEPT_PER_RUNNER) -> list[dict[str, Any]]:
    """The kept violations of the job's answers, newest first."""
    return _rows(conn, "job_id = ?", (job_id,), limit)


def unattributed(conn: db.Conn, limit: int = KEPT_UNATTRIBUTED) -> tuple[list[dict[str, Any]], int]:
    """Violations tied to no runner, newest first, and how many there have been."""
    count = db.get_meta(conn, "unattributed_violations") or 0
    return _rows(conn, "runner_id IS NULL", (), limit), int(count)
