"""The ledger's record of signed requests that reached a run (:class:`SignedKeys`).

A signed request is refused when its key (:func:`runnerkit.service.signing.replay_key`: the
signed timestamp, then the digest of what the signature covers) is recorded already. Keys
are kept in ``signed_requests`` of the ledger's file for as long as a signature is valid;
led by their timestamp, they arrive in about ascending order (an insert at the end of the
table's B-tree) and are forgotten as one range of it. An older runnerkit kept the digest
alone: while such rows may remain, each look is for both.
"""

from __future__ import annotations

import sqlite3
import time
from typing import Any

from runnerkit.runner.journal import Journal
from runnerkit.runner.sqlitefile import SQLiteFile

#: Default memory of signed requests' digests: beyond the 300 s age and 60 s future window.
EVENT_MEMORY_S = 900.0

STORE_DIGEST = "INSERT OR IGNORE INTO signed_requests (digest, seen) VALUES (?, ?)"
#: Whether a signed request's key is recorded; the second, while an older runnerkit's
#: digests may be there too (an ``IN`` list costs SQLite an ephemeral table per read).
_SIGNED_SEEN = (
    "SELECT 1 FROM signed_requests WHERE digest = ?",
    "SELECT 1 FROM signed_requests WHERE digest IN (?, ?)",
)
#: A signed job's claim, in one read: whether the job is known, whether its request is.
KNOWN_SIGNED = (
    "SELECT EXISTS (SELECT 1 FROM jobs WHERE job_id = ?),"
    " EXISTS (SELECT 1 FROM signed_requests WHERE digest = ?)",
    "SELECT EXISTS (SELECT 1 FROM jobs WHERE job_id = ?),"
    " EXISTS (SELECT 1 FROM signed_requests WHERE digest IN (?, ?))",
)

#: Every key of :func:`~runnerkit.service.signing.replay_key` sorts below this (its
#: timestamp below 2**44 ms, the year 2527); an older runnerkit's bare SHA-256 digests are
#: spread over every value, so all but one in a million of them sort at or above it.
_LEGACY_FROM = bytes([0, 0, 0x10])


class SignedKeys(SQLiteFile):
    """The part of the ledger's file that remembers signed requests (see the module)."""

    #: This process's records on their way into the file (set up by the ledger).
    journal: Journal

    def _keys_init(self) -> None:
        #: How long a signed request's key is remembered: past a signature's validity.
        self.event_memory_s = EVENT_MEMORY_S
        #: Whether signed_requests may hold an older runnerkit's keys; until the file is set
        #: up (on the first read, after the key was chosen), it may.
        self._legacy_digests = True

    def _keys_setup(self, conn: sqlite3.Connection) -> None:
        # Older ledgers keyed signed requests on the unsigned event id.
        conn.execute("DROP TABLE IF EXISTS events")
        conn.execute(
            "CREATE TABLE IF NOT EXISTS signed_requests"
            " (digest BLOB PRIMARY KEY, seen REAL NOT NULL) WITHOUT ROWID"
        )
        # Pruned by key (see _keys_prune): an index of ``seen`` cost every signed job a
        # second B-tree insert.
        conn.execute("DROP INDEX IF EXISTS signed_requests_seen")
        self._legacy_digests = _has_legacy_digests(conn)

    def _keys_prune(self, conn: sqlite3.Connection) -> None:
        """Forget keys signed before the memory's start (a range of the primary key), then an
        older runnerkit's digests recorded before it (a range too)."""
        forgotten = time.time() - self.event_memory_s
        conn.execute(
            "DELETE FROM signed_requests WHERE digest < ?",
            (int(max(0.0, forgotten) * 1000).to_bytes(8, "big"),),
        )
        conn.execute(
            "DELETE FROM signed_requests WHERE digest >= ? AND seen < ?",
            (_LEGACY_FROM, forgotten),
        )
        self._legacy_digests = _has_legacy_digests(conn)

    def _signed_read(
        self, sql: tuple[str, str], key: bytes, *before: Any
    ) -> tuple[str, tuple[Any, ...]]:
        """A read looking for a signed request's ``key`` (after the parameters ``before``):
        ``sql``'s first text, or, while the file may hold an older runnerkit's records, its
        second, which looks for what that recorded too: the key's digest alone."""
        if not self._legacy_digests:
            return sql[0], (*before, key)
        return sql[1], (*before, key, key[8:])

    def first_sight(self, digest: bytes, job_id: str, in_file: bool | None = None) -> bool:
        """Record a signed request's key (:func:`runnerkit.service.signing.replay_key`) for
        ``job_id``, whose lock this process holds; False if it was recorded before.

        ``in_file``: whether the file holds the key, as the job's claim found it
        (``Claim.signed_before``); None looks now. Recorded in the journal, so ``job_id``'s
        lock stays held until the digest is in the file: a copy of the request sent to
        another worker meanwhile waits for it there.
        """
        digest_hex = digest.hex()
        if self.journal.saw(digest_hex):
            return False
        if in_file is None:
            in_file = self._read_one(*self._signed_read(_SIGNED_SEEN, digest)) is not None
        if in_file:
            return False
        now = time.time()
        try:
            self.journal.append(["seen", job_id, digest_hex, now])
            return True
        except OSError:
            return self._write_one(STORE_DIGEST, (digest, now)) > 0


def _has_legacy_digests(conn: sqlite3.Connection) -> bool:
    """Whether ``signed_requests`` holds digests of an older runnerkit (one index probe)."""
    row = conn.execute(
        "SELECT 1 FROM signed_requests WHERE digest >= ? LIMIT 1", (_LEGACY_FROM,)
    ).fetchone()
    return row is not None
