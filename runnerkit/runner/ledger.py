"""The idempotency ledger (:class:`Ledger`): which jobs ran, their answers, and the queue.

One row per jobId in ``ledger.sqlite3``, shared by every worker: a finished job's stored
answer is replayed to a redelivery, an asynchronous job's row says where it waits or runs,
and a job whose worker died is found and answered. Signed requests' digests are kept here
too (:mod:`.signed_keys`), so a replayed request is refused.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
from dataclasses import dataclass
from typing import Any

from runnerkit.runner.journal import Journal, Record
from runnerkit.runner.locks import JobLocks
from runnerkit.runner.signed_keys import KNOWN_SIGNED, STORE_DIGEST, SignedKeys
from runnerkit.runner.sqlitefile import CHECKPOINT_EVERY
from runnerkit.runner.storage import LedgerIdentity, LedgerReplaced
from runnerkit.service.process import process_alive, process_start_time

log = logging.getLogger("runnerkit.state")


LEDGER_COLUMNS = frozenset(
    {
        "job_id",
        "state",
        "owner_pid",
        "owner_started",
        "attempt",
        "http_status",
        "response",
        "created",
        "finished",
        "async",
        "correlation_id",
    }
)


#: The rows of jobs not finished yet; the same text in the partial index and its queries, so
#: SQLite can use the index.
_UNFINISHED = "state IN ('running', 'queued')"


@dataclass
class Claim:
    """The ledger's answer to "may this worker run jobId now?"."""

    outcome: str  # "run" | "replay" | "running"
    status: int = 0
    body: dict[str, Any] | None = None
    attempt: int = 1
    #: A "run" claim that wrote a row (asynchronous, or a new attempt); a first synchronous
    #: claim writes nothing, so giving it back (:meth:`Ledger.release`) writes nothing either.
    recorded: bool = False
    #: For a claim given a signed request's key: whether the file holds that key already
    #: (looked for in the claim's own read; :meth:`Ledger.first_sight` takes it from here).
    signed_before: bool | None = None


#: A finished job's answer. Only over an unfinished row of the same owner (the row a claim
#: wrote), never over a finished one: folding a journal twice changes nothing.
_STORE_ANSWER = (
    "INSERT INTO jobs (job_id, state, owner_pid, owner_started, http_status, response,"
    " created, finished) VALUES (?, 'done', ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT(job_id) DO UPDATE SET state = 'done', http_status = excluded.http_status,"
    " response = excluded.response, finished = excluded.finished"
    " WHERE jobs.state != 'done' AND jobs.owner_pid = excluded.owner_pid"
    " AND jobs.owner_started = excluded.owner_started"
)

#: Past its cap the ledger drops its oldest answers down to this share of it, in one go.
#: Their keys (jobIds) are random, so each dropped row changes a random page of the index:
#: dropping a thousand rows at every prune rewrote most of its pages each time (measured
#: in-process at the cap of 100,000: 104 µs of CPU per job in all, 61 below the cap).
PRUNE_TO = 0.9

#: How long a claim waits for another worker's lock on a job before it answers "running": a
#: finished job's lock is held until its journal is folded (:data:`~.journal.FOLD_DELAY_S`).
CLAIM_WAIT_S = 0.05
CLAIM_POLL_S = 0.002


class Ledger(SignedKeys):
    """The idempotency ledger: one row per jobId, shared by every worker through SQLite.

    A finished job's answer is replayed when it was a success or a failure that a retry
    cannot change; after a retryable failure a new delivery is a new attempt and runs again.
    A job whose owner process died mid-run is taken over by the next delivery.
    """

    def __init__(
        self,
        path: str,
        retention_s: float,
        max_entries: int = 100_000,
        identity: LedgerIdentity | None = None,
    ) -> None:
        super().__init__(path, identity)
        self.running = JobLocks(os.path.splitext(path)[0] + ".running.lock")
        #: This process's answers and digests on their way here (see :mod:`.journal`).
        self.journal = Journal(os.path.splitext(path)[0] + ".journal", self._fold, self.running)
        self.retention_s = retention_s
        self._keys_init()
        self.max_entries = max_entries
        self._me = (0, 0.0)
        self._since_prune = 0
        self._folded = 0

    def _setup(self, conn: sqlite3.Connection) -> None:
        columns = {row[1] for row in conn.execute("PRAGMA table_info(jobs)")}
        if columns and not columns >= LEDGER_COLUMNS:
            # A ledger from an older runnerkit: its rows only serve replays, start afresh.
            conn.execute("DROP TABLE jobs")
        conn.execute(
            "CREATE TABLE IF NOT EXISTS jobs ("
            " job_id TEXT PRIMARY KEY, state TEXT NOT NULL, owner_pid INTEGER,"
            " owner_started REAL, attempt INTEGER NOT NULL DEFAULT 1, http_status INTEGER,"
            " response TEXT, created REAL NOT NULL, finished REAL,"
            " async INTEGER NOT NULL DEFAULT 0, correlation_id TEXT, capability TEXT,"
            " queue_seq INTEGER)"
        )
        # Where an asynchronous job stands in its capability's line for a slot (see
        # :meth:`ahead`); added to a ledger of an older runnerkit, whose rows are kept.
        columns = {row[1] for row in conn.execute("PRAGMA table_info(jobs)")}
        for column, kind in (("capability", "TEXT"), ("queue_seq", "INTEGER")):
            if column not in columns:
                conn.execute(f"ALTER TABLE jobs ADD COLUMN {column} {kind}")
        conn.execute("CREATE INDEX IF NOT EXISTS jobs_finished ON jobs(finished)")
        # Signed requests that reached a run, for as long as a signature is valid.
        self._keys_setup(conn)
        # Only unfinished (asynchronous) jobs, a handful: housekeeping looks for orphans among
        # them twice a second, which must not cost a scan of every answer kept.
        conn.execute(
            f"CREATE INDEX IF NOT EXISTS jobs_unfinished ON jobs(state) WHERE {_UNFINISHED}"
        )
        # One row, rewritten by :meth:`probe` to learn whether writes work again.
        conn.execute("CREATE TABLE IF NOT EXISTS probe (id INTEGER PRIMARY KEY, at REAL)")
        self._me = (os.getpid(), process_start_time(os.getpid()) or 0.0)

    def claim(
        self,
        job_id: str,
        *,
        queued: bool = False,
        correlation_id: str = "",
        capability: str = "",
        signed: bytes = b"",
    ) -> Claim:
        """Decide whether this process runs ``job_id``; a "run" claim holds its job lock
        until :meth:`complete` or :meth:`release`.

        ``signed``: the key of the signed request that carries the job
        (:func:`runnerkit.service.signing.replay_key`), looked for in the same read as the
        job, for :meth:`first_sight` later (``Claim.signed_before``). Only a request with the
        same body has that key, so the same job: no other process can record it meanwhile,
        the job's lock held from here on.

        The job lock (:class:`JobLocks`) settles who runs it; the rows settle what happened
        before. A synchronous job never seen before, the common case, costs one read here
        and one write at :meth:`complete`. ``queued`` records an asynchronous job that waits
        for a slot of ``capability`` before it runs: its row exists from now on, for
        recovery and counting, and takes the next place in the instance's line for that
        capability's slots (:meth:`ahead`).
        """
        if self.identity is not None and self.identity.broken:
            raise LedgerReplaced(self.identity.broken)
        if not self._lock_job(job_id):
            return Claim("running")
        try:
            # With the lock: a worker that held it and died has left it free, its journal too.
            self.journal.fold_dead()
            claim = self._claim_locked(job_id, queued, correlation_id, capability, signed)
            failure = self.journal.failure
            if claim.outcome == "run" and failure is not None and not self.journal.fold_or_fail():
                # Answers already wait for the file: take no job whose answer would join them.
                raise sqlite3.OperationalError(f"the ledger cannot be written: {failure}")
        except BaseException:
            self.running.release(job_id)
            raise
        if claim.outcome != "run":
            self.running.release(job_id)
        return claim

    def _lock_job(self, job_id: str) -> bool:
        """Take ``job_id``'s lock. Held by this process for an answer not folded yet: fold
        now and take it. Held elsewhere: wait up to :data:`CLAIM_WAIT_S`, as long as another
        worker takes to fold a finished job's answer; a job that still runs keeps it."""
        if self.running.acquire(job_id):
            return True
        if self.journal.holds(job_id):
            self.journal.flush()
            return self.running.acquire(job_id)
        deadline = time.monotonic() + CLAIM_WAIT_S
        while time.monotonic() < deadline:
            time.sleep(CLAIM_POLL_S)
            if self.running.acquire(job_id):
                return True
        return False

    def _claim_locked(
        self, job_id: str, queued: bool, correlation_id: str, capability: str, signed: bytes
    ) -> Claim:
        # A queued claim writes its row whatever it finds; a synchronous one only for a job
        # the file knows (a new attempt), which the one read below tells.
        known, signed_before = True, None
        if signed:
            row = self._read_one(*self._signed_read(KNOWN_SIGNED, signed, job_id))
            known, signed_before = bool(row[0]), bool(row[1])
        elif not queued:
            known = self._read_one("SELECT 1 FROM jobs WHERE job_id = ?", (job_id,)) is not None
        if not queued and not known:
            return Claim("run", signed_before=signed_before)
        claim = self._claim_written(job_id, queued, correlation_id, capability)
        claim.signed_before = signed_before
        return claim

    def _claim_written(
        self, job_id: str, queued: bool, correlation_id: str, capability: str
    ) -> Claim:
        now = time.time()
        state = "queued" if queued else "running"
        with self._transaction() as conn:
            pid, started = self._me
            # The line's next place, in the writers' turn: one order for every process. Only
            # unfinished rows are looked at (the partial index), the line is made of them.
            seq = None
            if queued:
                (last,) = conn.execute(
                    f"SELECT MAX(queue_seq) FROM jobs WHERE {_UNFINISHED}"
                ).fetchone()
                seq = int(last or 0) + 1
            row = conn.execute(
                "SELECT state, owner_pid, owner_started, attempt, http_status, response"
                " FROM jobs WHERE job_id = ?",
                (job_id,),
            ).fetchone()
            if row is None:
                values = (job_id, state, pid, started, now, int(queued), correlation_id)
                conn.execute(
                    "INSERT INTO jobs (job_id, state, owner_pid, owner_started, created, async,"
                    " correlation_id, capability, queue_seq) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (*values, capability, seq),
                )
                return Claim("run", recorded=True)
            _, owner_pid, owner_started, attempt, http_status, response = row
            if row[0] in ("running", "queued") and process_alive(owner_pid, owner_started):
                # The job lock is ours, so nobody runs the job: the row is one whose answer
                # (or release) could not be written, e.g. on a full disk. Left alone, it
                # would answer 409 for as long as its worker lives; it is a new attempt.
                log.warning(
                    "job %s: its %s entry of live pid %s has no answer; running it again "
                    "as attempt %s",
                    job_id,
                    row[0],
                    owner_pid,
                    attempt + 1,
                )
            if row[0] == "done":
                body = json.loads(response)
                if body.get("success") or not (body.get("error") or {}).get("retryable"):
                    return Claim("replay", http_status, body, attempt)
            conn.execute(
                "UPDATE jobs SET state = ?, owner_pid = ?, owner_started = ?, async = ?,"
                " correlation_id = ?, attempt = attempt + 1, http_status = NULL,"
                " response = NULL, finished = NULL, capability = ?, queue_seq = ?"
                " WHERE job_id = ?",
                (state, pid, started, int(queued), correlation_id, capability, seq, job_id),
            )
            return Claim("run", attempt=attempt + 1, recorded=True)

    def release(self, job_id: str, *, recorded: bool = True) -> None:
        """Forget a claim that never ran (rejected before the capability started).

        ``recorded=False`` (``Claim.recorded``) frees only the job lock: a first synchronous
        claim wrote no row, and a runner refusing jobs at capacity (429) should not queue in
        the writers' turn to delete nothing.
        """
        if not recorded:
            self.unlock(job_id)
            return
        try:
            with self._transaction() as conn:
                conn.execute(
                    "DELETE FROM jobs WHERE job_id = ? AND state IN ('running', 'queued')"
                    " AND owner_pid = ?",
                    (job_id, self._me[0]),
                )
        finally:
            self.unlock(job_id)

    def unlock(self, job_id: str) -> None:
        """Free ``job_id``'s lock, unless records of it wait in the journal: the fold frees
        it then (a signed request's digest must be in the file before anyone may claim it)."""
        if self.journal.release(job_id):
            self.running.release(job_id)

    def start(self, job_id: str) -> None:
        """A queued asynchronous job got its slot and runs now."""
        self._write_one("UPDATE jobs SET state = 'running' WHERE job_id = ?", (job_id,))

    def ahead(self, job_id: str, capability: str) -> int:
        """How many asynchronous jobs wait for a slot of ``capability`` ahead of ``job_id``
        (accepted before it by any worker of the instance), not counting those of dead
        workers (their orphaned rows are the leader's to answer). A waiting job takes a free
        slot only when fewer jobs are ahead of it than slots are free: first come, first
        served across the instance, whichever worker accepted each job."""
        with self._connection() as conn:
            rows = conn.execute(
                f"SELECT owner_pid, owner_started FROM jobs WHERE {_UNFINISHED}"
                " AND state = 'queued' AND capability = ? AND queue_seq <"
                " (SELECT queue_seq FROM jobs WHERE job_id = ?)",
                (capability, job_id),
            ).fetchall()
        alive = {(self._me[0], self._me[1]): True}  # a few workers own them all
        for owner in rows:
            if owner not in alive:
                alive[owner] = process_alive(*owner)
        return sum(1 for owner in rows if alive[owner])

    def queued(self, wait: float | None = None) -> int:
        """Asynchronous jobs accepted but still waiting for a slot (``wait``: see
        :meth:`~.sqlitefile.SQLiteFile._connection`)."""
        with self._connection(wait) as conn:
            (count,) = conn.execute(
                f"SELECT COUNT(*) FROM jobs WHERE {_UNFINISHED} AND state = 'queued'"
            ).fetchone()
        return int(count)

    def orphans(self) -> list[tuple[str, bool, str, int]]:
        """Unfinished jobs whose owner has died: ``(jobId, async, correlationId, ownerPid)``.

        A dead owner's journal is folded first: its finished jobs are not orphans."""
        self.journal.fold_dead()
        with self._connection() as conn:
            rows = conn.execute(
                "SELECT job_id, async, owner_pid, owner_started, correlation_id FROM jobs"
                f" WHERE {_UNFINISHED}"
            ).fetchall()
        return [
            (job_id, bool(is_async), correlation or "", pid)
            for job_id, is_async, pid, started, correlation in rows
            if not process_alive(pid, started)
        ]

    def complete(self, job_id: str, http_status: int, body_json: str) -> bool:
        """Store the answer of a finished job, as the JSON text sent, then free its job lock.

        In that order: a redelivery that gets the lock next is sure to find the answer. The
        answer goes to this process's journal, and its lock is freed once the journal is
        folded into the file; when the journal cannot be written, straight into the file.
        True when it went straight into the file (a write that succeeded there).
        """
        now = time.time()
        pid, started = self._me
        record = ["answer", job_id, pid, started, http_status, body_json, now]
        try:
            self.journal.append(record)
            return False
        except OSError:
            pass
        try:
            self._write_one(_STORE_ANSWER, (job_id, pid, started, http_status, body_json, now, now))
        finally:
            self.unlock(job_id)
        return True

    def _fold(self, records: list[Record]) -> None:
        """Write journal records into the file, in one transaction (see :mod:`.journal`)."""
        statements = [
            (_STORE_ANSWER, (r[1], r[2], r[3], r[4], r[5], r[6], r[6]))
            if r[0] == "answer"
            else (STORE_DIGEST, (bytes.fromhex(r[2]), r[3]))
            for r in records
        ]
        self._write_many(statements)
        answers = sum(1 for r in records if r[0] == "answer")
        # As the job path's own writes do (see SQLiteFile._write_one): without it, the WAL of
        # a ledger written by several workers without a pause is never started over.
        self._folded += len(records)
        if self._folded >= CHECKPOINT_EVERY and self._checkpoint():
            self._folded = 0
        self._since_prune += answers
        if self._since_prune >= 1000:
            self.prune()

    def forget(self, job_id: str, owner_pid: int) -> None:
        """Drop an orphaned synchronous claim: its caller saw the connection fail.

        Only while the dead owner still holds it: a redelivery may have claimed it meanwhile.
        """
        with self._transaction() as conn:
            conn.execute(
                "DELETE FROM jobs WHERE job_id = ? AND state != 'done' AND owner_pid = ?",
                (job_id, owner_pid),
            )

    def fail_orphan(
        self, job_id: str, owner_pid: int, http_status: int, body: dict[str, Any]
    ) -> bool:
        """Store a failure for a job whose owner died, unless someone else took it since."""
        with self._transaction() as conn:
            cur = conn.execute(
                "UPDATE jobs SET state = 'done', http_status = ?, response = ?, finished = ?"
                " WHERE job_id = ? AND state != 'done' AND owner_pid = ?",
                (http_status, json.dumps(body), time.time(), job_id, owner_pid),
            )
        return cur.rowcount > 0

    def probe(self) -> None:
        """One tiny write: raises when the ledger cannot be written (disk full, I/O error)."""
        with self._write() as conn:
            conn.execute("INSERT OR REPLACE INTO probe (id, at) VALUES (1, ?)", (time.time(),))

    def prune(self) -> int:
        """Drop finished entries past retention and, beyond ``max_entries``, the oldest down
        to :data:`PRUNE_TO` of it."""
        self._since_prune = 0
        with self._transaction() as conn:
            self._keys_prune(conn)
            cur = conn.execute(
                "DELETE FROM jobs WHERE state = 'done' AND finished < ?",
                (time.time() - self.retention_s,),
            )
            removed = cur.rowcount
            (count,) = conn.execute("SELECT COUNT(*) FROM jobs").fetchone()
            if count > self.max_entries:
                cur = conn.execute(
                    "DELETE FROM jobs WHERE job_id IN (SELECT job_id FROM jobs"
                    " WHERE state = 'done' ORDER BY finished LIMIT ?)",
                    (count - int(self.max_entries * PRUNE_TO),),
                )
                removed += cur.rowcount
        return int(removed)

    def completed_since(self, since: float, wait: float | None = None) -> int:
        """Jobs finished after the wall-clock time ``since`` (for jobThroughput; ``wait``: see
        :meth:`~.sqlitefile.SQLiteFile._connection`)."""
        with self._connection(wait) as conn:
            (count,) = conn.execute(
                "SELECT COUNT(*) FROM jobs WHERE state = 'done' AND finished >= ?", (since,)
            ).fetchone()
        return int(count)

    def size(self) -> int:
        with self._connection() as conn:
            (count,) = conn.execute("SELECT COUNT(*) FROM jobs").fetchone()
        return int(count)
