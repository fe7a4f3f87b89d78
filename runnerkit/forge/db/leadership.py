"""The dispatcher's leadership and wake-up channel over PostgreSQL (:class:`PgLeadership`).

On PostgreSQL one process of every forge instance on the database dispatches: the one
holding a session-level advisory lock on a connection of its own. The same connection
listens for the NOTIFYs every forge process sends when new work arrives, so the leader
wakes at once instead of on its next poll. Kept apart from :mod:`.postgres` (the store's
pool and transactions): this is one long-lived connection outside the pool, with its own
life (lost when the server goes, taken again later).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import time
from typing import Any

import psycopg

from .postgres import PostgresDB

log = logging.getLogger("runnerkit.forge.postgres")

#: After its lock connection is lost, a process leaves the lock to the others this long
#: (two of their polls, ``dispatcher.FOLLOWER_POLL_S``): it learns of the loss first and
#: would take the lock straight back, though its own connection may be what failed.
LOST_PAUSE_S = 0.5


class PgLeadership:
    """The dispatcher's leadership over every forge process and instance on one database.

    A session-level advisory lock (``pg_try_advisory_lock``) held on a connection of its
    own, outside the pool: the process that holds it dispatches, sweeps and prunes; when its
    connection ends (the process exits or is killed, the server restarts, the network
    drops) PostgreSQL frees the lock and the next process to try takes it. A lost connection
    is lost leadership: :attr:`held` turns false and the dispatcher stops ticking until it
    takes the lock again. The same connection ``LISTEN``\\ s on the database's wake-up
    channel, where every forge process ``NOTIFY``\\ s new jobs and results (:meth:`notify`).
    Same interface as :class:`runnerkit.service.filelocks.FileLock` (``held``, ``acquire``,
    ``release``).
    """

    def __init__(self, database: PostgresDB, notify_gap_s: float = 0.0) -> None:
        self.database = database
        #: At most one NOTIFY per this many seconds from this process (see :meth:`notify`).
        self.notify_gap_s = notify_gap_s
        #: When this process last sent a NOTIFY (or let a write carry one), monotonic.
        self.last_notify = float("-inf")
        self._conn: psycopg.Connection[Any] | None = None
        self._pid = 0
        self._held = False
        self._failing = False
        #: No try for the lock before this (monotonic): see :data:`LOST_PAUSE_S`.
        self._pause_until = 0.0
        self._key = 0
        self.channel = ""
        #: Notifications received by this process while it held the lock.
        self.notified = 0
        self._wanted = threading.Condition()
        self._notify_wanted = False
        self._notifier_pid = 0

    def _names(self) -> None:
        if self.channel:
            return
        with self.database.connection() as conn:
            where = conn.execute("SELECT current_database(), current_schema()").fetchone()
        digest = hashlib.sha256(f"runnerkit-dispatcher:{where[0]}:{where[1]}".encode()).digest()
        self._key = int.from_bytes(digest[:8], "big", signed=True)
        self.channel = f"runnerkit_forge_{digest[8:20].hex()}"

    @property
    def held(self) -> bool:
        conn = self._conn
        if not self._held or conn is None or self._pid != os.getpid():
            return False
        if conn.closed or conn.broken:
            self._lost()
            return False
        return True

    def acquire(self) -> bool:
        """Take the lock if free (never waits); True while this process holds it."""
        if self.held:
            return True
        if time.monotonic() < self._pause_until:
            return False
        try:
            self._names()
            if self._conn is None or self._pid != os.getpid() or self._conn.closed:
                self._conn = None  # a parent's connection is the parent's: never used here
                self._conn = psycopg.connect(
                    self.database.url,
                    autocommit=True,
                    connect_timeout=max(1, round(self.database.connect_timeout_s)),
                )
                self._pid = os.getpid()
            row = self._conn.execute("SELECT pg_try_advisory_lock(%s)", (self._key,)).fetchone()
            self._failing = False
            if not row or not row[0]:
                return False
            self._conn.execute(f"LISTEN {self.channel}")
        except psycopg.Error as exc:
            if not self._failing:  # once per outage, not once per poll
                log.warning("the dispatcher lock cannot be taken: %s", str(exc).strip())
            self._failing = True
            self._drop()
            return False
        self._held = True
        return True

    def _lost(self) -> None:
        log.warning("the dispatcher lock's connection to PostgreSQL is lost: leadership lost")
        self._pause_until = time.monotonic() + LOST_PAUSE_S
        self._drop()

    def _drop(self) -> None:
        conn, self._conn, self._held = self._conn, None, False
        if conn is not None and self._pid == os.getpid():
            with contextlib.suppress(Exception):
                conn.close()

    def release(self) -> None:
        """Give the lock up (closing its connection frees it)."""
        if self._pid == os.getpid():
            self._drop()
        else:
            self._conn, self._held = None, False

    def fileno(self) -> int | None:
        """The lock connection's socket while held (readable: a notification, or its end)."""
        if not self.held:
            return None
        assert self._conn is not None
        return int(self._conn.pgconn.socket)

    def consume(self) -> int:
        """Read what arrived on the lock connection; how many notifications (a lost
        connection loses the lock)."""
        conn = self._conn
        if conn is None or not self.held:
            return 0
        count = 0
        try:
            conn.pgconn.consume_input()
            while conn.pgconn.notifies() is not None:
                count += 1
        except psycopg.Error:
            self._lost()
            return count
        if conn.pgconn.status != psycopg.pq.ConnStatus.OK:
            self._lost()
        self.notified += count
        return count

    def carried(self) -> str | None:
        """The channel a write may NOTIFY itself (no transaction of its own), or None when
        this process sent one less than :attr:`notify_gap_s` ago: the caller then asks
        :meth:`notify` once its write is committed, which sends when the gap ends."""
        if not self.channel:
            return None
        now = time.monotonic()
        if now - self.last_notify < self.notify_gap_s:
            return None
        self.last_notify = now
        return self.channel

    def notify(self) -> None:
        """Wake the dispatcher, whichever forge instance it runs in, without waiting.

        This process's notifier thread sends the NOTIFY: requests made while it is not yet
        sending are served by its next one (what they announce is committed before they
        ask), so under load one round trip wakes the dispatcher for many submissions
        instead of one each, and no request waits for it. It sends at most one per
        :attr:`notify_gap_s` (counting those writes carried): each costs the server a
        transaction and the dispatcher a wake-up, and under load the dispatcher ticks on
        anyway, as answers arrive. Errors are only logged: the dispatcher's poll finds the
        work anyway.
        """
        pid = os.getpid()
        if self._notifier_pid != pid:  # no notifier yet, or the parent's before a fork
            # Made anew: a parent's condition could be held by a thread that did not fork.
            self._wanted = threading.Condition()
            self._notifier_pid = pid
            threading.Thread(
                target=self._notifier, name="runnerkit-forge-notify", daemon=True
            ).start()
        with self._wanted:
            self._notify_wanted = True
            self._wanted.notify()

    def _notifier(self) -> None:
        while True:
            wanted = self._wanted
            with wanted:
                while not self._notify_wanted:
                    wanted.wait()
            pause = self.last_notify + self.notify_gap_s - time.monotonic()
            if pause > 0:
                time.sleep(pause)  # the requests made meanwhile ride on this NOTIFY too
            with wanted:
                self._notify_wanted = False
            self.notify_now()

    def notify_now(self) -> None:
        """Send one NOTIFY on the dispatcher's channel, from this thread."""
        self.last_notify = time.monotonic()
        try:
            self._names()
            with self.database.connection() as conn:
                conn.raw.execute("SELECT pg_notify(%s, '')", (self.channel,))
        except psycopg.Error as exc:
            log.warning("NOTIFY to the dispatcher failed: %s", str(exc).strip())
