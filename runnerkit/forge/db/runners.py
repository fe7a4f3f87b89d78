"""Queries on registered runners: registration, heartbeats, status, and the slots they hold.

Every function runs inside the caller's connection or transaction (:class:`~.interface.Conn`),
in SQLite's dialect (PostgreSQL's connection translates it). Slots are columns of ``jobs``
(``slot_runner``, ``slot_capability``) but answer questions about runners: how busy each
one is, and where its work goes when it registers again under a new id.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .interface import Conn, Row


def insert_runner(conn: Conn, values: Mapping[str, Any]) -> None:
    conn.execute(
        "INSERT INTO runners (id, name, version, document, health_url, base_url, registered_at,"
        " last_heartbeat_at, last_seen, status, heartbeat_interval_ms, reported_active,"
        " token_hash)"
        " VALUES (:id, :name, :version, :document, :health_url, :base_url, :registered_at,"
        " :last_heartbeat_at, :last_seen, :status, :heartbeat_interval_ms, 0, :token_hash)",
        {"token_hash": None, **values},
    )


def get_runner(conn: Conn, runner_id: str) -> Row | None:
    row: Row | None = conn.execute("SELECT * FROM runners WHERE id = ?", (runner_id,)).fetchone()
    return row


def list_runners(
    conn: Conn, *, status: str | None = None, limit: int = 100, offset: int = 0
) -> tuple[list[Row], int]:
    where, args = ("WHERE status = ?", [status]) if status else ("", [])
    total = conn.execute(f"SELECT COUNT(*) FROM runners {where}", args).fetchone()[0]
    rows = conn.execute(
        f"SELECT * FROM runners {where} ORDER BY rowid LIMIT ? OFFSET ?",
        [*args, limit, offset],
    ).fetchall()
    return rows, int(total)


def runner_ids_with_health_url(conn: Conn, health_url: str) -> list[str]:
    rows = conn.execute("SELECT id FROM runners WHERE health_url = ?", (health_url,)).fetchall()
    return [r["id"] for r in rows]


def delete_runner(conn: Conn, runner_id: str) -> bool:
    return conn.execute("DELETE FROM runners WHERE id = ?", (runner_id,)).rowcount > 0


def record_heartbeat(
    conn: Conn,
    runner_id: str,
    *,
    status: str,
    last_heartbeat_at: str,
    last_seen: float,
    reported_active: int,
) -> bool:
    cursor = conn.execute(
        "UPDATE runners SET status = ?, last_heartbeat_at = ?, last_seen = ?, reported_active = ?"
        " WHERE id = ?",
        (status, last_heartbeat_at, last_seen, reported_active, runner_id),
    )
    return cursor.rowcount > 0


def runner_by_token_hash(conn: Conn, token_hash: str) -> Row | None:
    """The runner whose runnerToken has this SHA-256 (hex), if any."""
    row: Row | None = conn.execute(
        "SELECT id, token_hash FROM runners WHERE token_hash = ?", (token_hash,)
    ).fetchone()
    return row


def disable_runner_dispatch(conn: Conn, runner_id: str) -> None:
    """No more work for a runner (until it registers again): it loses its dispatch URL."""
    conn.execute("UPDATE runners SET base_url = '' WHERE id = ?", (runner_id,))


def mark_runner_unreachable(conn: Conn, runner_id: str) -> None:
    """Take a runner out of dispatch until its next heartbeat reports its status again."""
    conn.execute(
        "UPDATE runners SET status = 'unhealthy'"
        " WHERE id = ? AND status IN ('healthy', 'degraded')",
        (runner_id,),
    )


def watched_runners(conn: Conn) -> list[Row]:
    """Runners not offline: id, last_seen and heartbeat_interval_ms, for the sweep."""
    return conn.execute(
        "SELECT id, last_seen, heartbeat_interval_ms FROM runners WHERE status != 'offline'"
    ).fetchall()


def mark_runners_offline(conn: Conn, runner_ids: Sequence[str]) -> None:
    """These runners are offline (inside the sweep's transaction)."""
    conn.executemany(
        "UPDATE runners SET status = 'offline' WHERE id = ? AND status != 'offline'",
        [(runner_id,) for runner_id in runner_ids],
    )


_DISPATCHABLE = (
    "SELECT * FROM runners WHERE status IN ('healthy', 'degraded') AND base_url != ''"
    " ORDER BY rowid"
)
_SLOT_COUNTS = (
    "SELECT slot_runner, slot_capability, COUNT(*) AS n FROM jobs"
    " WHERE slot_runner IS NOT NULL GROUP BY slot_runner, slot_capability"
)


#: PostgreSQL: the dispatchable runners, each with the slots it holds by capability
#: (``[[capability, count], ...]`` or NULL), in one statement: an index search of
#: ``jobs_slot`` per runner.
_DISPATCHABLE_WITH_SLOTS = (
    "SELECT runners.*, (SELECT json_agg(json_build_array(slot_capability, n)) FROM"
    " (SELECT slot_capability, COUNT(*) AS n FROM jobs WHERE slot_runner = runners.id"
    " GROUP BY slot_capability) AS held) AS held_slots"
    " FROM runners WHERE status IN ('healthy', 'degraded') AND base_url != '' ORDER BY seq"
)


def runners_and_slots(conn: Conn) -> tuple[list[Row], dict[tuple[str, str], int]]:
    """The runners the dispatcher may send work to (healthy or degraded, with an HTTP base
    URL), in registration order, and the slots they hold, by (runner id, capability id):
    :func:`slot_counts` for these runners (the only ones matching asks about).

    On PostgreSQL one statement; on SQLite both queries are sent before either is read.
    """
    if conn.postgres:
        runners = conn.execute(_DISPATCHABLE_WITH_SLOTS).fetchall()
        held = {
            (runner["id"], capability): int(count)
            for runner in runners
            for capability, count in runner["held_slots"] or ()
        }
        return runners, held
    cursor = conn.execute(_DISPATCHABLE)
    slots = conn.execute(_SLOT_COUNTS)
    return cursor.fetchall(), _counted(slots.fetchall())


def slot_counts(conn: Conn) -> dict[tuple[str, str], int]:
    """Held runner slots, by (runner id, capability id)."""
    return _counted(conn.execute(_SLOT_COUNTS).fetchall())


def _counted(rows: list[Row]) -> dict[tuple[str, str], int]:
    return {(r["slot_runner"], r["slot_capability"]): int(r["n"]) for r in rows}


def move_slots(conn: Conn, old_runner: str, new_runner: str) -> None:
    """A runner re-registered under a new id: its held slots (and running jobs) follow it."""
    conn.execute("UPDATE jobs SET slot_runner = ? WHERE slot_runner = ?", (new_runner, old_runner))
    conn.execute(
        "UPDATE jobs SET runner_id = ? WHERE runner_id = ? AND status = 'running'",
        (new_runner, old_runner),
    )
