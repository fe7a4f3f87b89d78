"""The durable outbox: calls a job causes after it has been answered, delivered until accepted.

Asynchronous results (``POST /jobs/{id}/result``), progress events and TruthCore assertions
are written to a SQLite table in the instance's state before anyone tries to send them. The
process that wrote a row tries it at once; whatever fails is retried with backoff by the
instance's leader on every lifecycle tick, so a forge outage or a worker restart loses
nothing. A row is leased while it is being sent, so two processes never send it at once.
"""

from __future__ import annotations

import json
import logging
import random
import sqlite3
import time
from dataclasses import dataclass
from typing import Any

import requests

from runnerkit.runner.jobforge import JobForgeClient
from runnerkit.runner.sqlitefile import SQLiteFile
from runnerkit.runner.storage import LedgerIdentity

log = logging.getLogger("runnerkit.outbox")

#: How long a row stays leased to the process sending it.
LEASE_S = 30.0
#: Cap of the delay between two attempts of one row.
MAX_BACKOFF_S = 30.0
#: Messages JobForge accepts only with the runner's own credential (``runnerToken``).
RUNNER_KINDS = frozenset({"result", "event"})


@dataclass
class Message:
    id: int
    kind: str
    url: str
    body: dict[str, Any]
    headers: dict[str, str]
    attempts: int


class Outbox(SQLiteFile):
    """Rows of pending calls in the instance's SQLite file, and their delivery."""

    def __init__(
        self,
        path: str,
        client: JobForgeClient,
        dead_retention_s: float = 86_400,
        identity: LedgerIdentity | None = None,
    ) -> None:
        super().__init__(path, identity)
        self.client = client
        self.dead_retention_s = dead_retention_s
        self._failing = False

    def _setup(self, conn: sqlite3.Connection) -> None:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS outbox ("
            " id INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, url TEXT NOT NULL,"
            " body TEXT NOT NULL, headers TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,"
            " next_attempt_at REAL NOT NULL, leased_until REAL NOT NULL DEFAULT 0,"
            " dead INTEGER NOT NULL DEFAULT 0, created REAL NOT NULL, last_error TEXT)"
        )
        conn.execute("CREATE INDEX IF NOT EXISTS outbox_due ON outbox(dead, next_attempt_at)")

    def add(
        self,
        kind: str,
        url: str,
        body: dict[str, Any],
        headers: dict[str, str] | None = None,
        *,
        send_now: bool = False,
    ) -> bool:
        """Store one call to make; with ``send_now`` also try it at once.

        Returns whether it was delivered now. The row is leased to this process for the first
        try, so the leader does not send it at the same moment.
        """
        now = time.time()
        lease = now + LEASE_S if send_now else 0.0
        with self._transaction() as conn:
            cur = conn.execute(
                "INSERT INTO outbox (kind, url, body, headers, next_attempt_at, leased_until,"
                " created) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (kind, url, json.dumps(body), json.dumps(headers or {}), now, lease, now),
            )
            row_id = int(cur.lastrowid or 0)
        if not send_now:
            return False
        message = self._load(row_id)
        return message is not None and self._deliver(message)

    def deliver_due(self, limit: int = 100) -> int:
        """Lease and send every row whose time has come; returns how many were accepted."""
        now = time.time()
        with self._transaction() as conn:
            rows = conn.execute(
                "SELECT id FROM outbox WHERE dead = 0 AND next_attempt_at <= ?"
                " AND leased_until <= ? ORDER BY id LIMIT ?",
                (now, now, limit),
            ).fetchall()
            ids = [r[0] for r in rows]
            if ids:
                conn.executemany(
                    "UPDATE outbox SET leased_until = ? WHERE id = ?",
                    [(now + LEASE_S, i) for i in ids],
                )
        delivered = 0
        for row_id in ids:
            message = self._load(row_id)
            if message is not None and self._deliver(message):
                delivered += 1
        return delivered

    def pending(self) -> int:
        with self._connection() as conn:
            (count,) = conn.execute("SELECT COUNT(*) FROM outbox WHERE dead = 0").fetchone()
        return int(count)

    def prune(self) -> None:
        with self._transaction() as conn:
            conn.execute(
                "DELETE FROM outbox WHERE dead = 1 AND created < ?",
                (time.time() - self.dead_retention_s,),
            )

    def _load(self, row_id: int) -> Message | None:
        with self._connection() as conn:
            row = conn.execute(
                "SELECT id, kind, url, body, headers, attempts FROM outbox WHERE id = ?",
                (row_id,),
            ).fetchone()
        if row is None:
            return None
        return Message(row[0], row[1], row[2], json.loads(row[3]), json.loads(row[4]), row[5])

    def _deliver(self, message: Message) -> bool:
        try:
            headers = message.headers
            if message.kind in RUNNER_KINDS:  # they speak for the runner: its own credential
                headers = {**headers, **self.client.runner_headers()}
            response = self.client.post(
                message.url, json=message.body, headers=headers, timeout=self.client.timeout
            )
        except requests.RequestException as exc:
            self._retry_later(message, type(exc).__name__)
            return False
        status = response.status_code
        if status < 300:
            with self._transaction() as conn:
                conn.execute("DELETE FROM outbox WHERE id = ?", (message.id,))
            if self._failing:
                self._failing = False
                log.info("outbox delivery works again")
            return True
        if status in (408, 425, 429) or status >= 500:
            self._retry_later(message, f"HTTP {status}")
            return False
        with self._transaction() as conn:
            conn.execute(
                "UPDATE outbox SET dead = 1, leased_until = 0, last_error = ? WHERE id = ?",
                (f"HTTP {status}: {response.text[:200]}", message.id),
            )
        log.error("outbox %s to %s refused with %s; not retried", message.kind, message.url, status)
        return False

    def _retry_later(self, message: Message, error: str) -> None:
        attempts = message.attempts + 1
        delay = min(MAX_BACKOFF_S, 0.25 * 2 ** min(attempts, 16)) * random.uniform(0.5, 1.0)
        with self._transaction() as conn:
            conn.execute(
                "UPDATE outbox SET attempts = ?, next_attempt_at = ?, leased_until = 0,"
                " last_error = ? WHERE id = ?",
                (attempts, time.time() + delay, error, message.id),
            )
        if not self._failing:
            self._failing = True
            log.warning(
                "outbox delivery to %s failing (%s); retrying with backoff", message.url, error
            )
