"""Waking the dispatching forge process from any other: a unix datagram socket.

Every forge process may take ``POST /jobs`` or a result, but only the holder of the
dispatcher lock dispatches. It binds a datagram socket in Linux's abstract namespace, named
for the database file (no file to clean up, no path-length limit; it vanishes with the
process); any process that has news sends it one byte. The dispatcher sleeps in ``select``
on it, so it wakes at once and costs nothing while idle.

The byte goes out on a socket connected to the channel, and the dispatcher drains what
queued, with calls that keep the GIL (:mod:`runnerkit.service.libc_calls`): neither waits
(both sockets never block), and a request thread that gave the GIL up for them would, under
load, wait to get it back (two thread switches per submitted job).

A wake-up already on its way is enough for every job queued before the listener consumes
it, so a sender first reads a mark shared by the host's processes (:class:`PendingMark`,
``<DB_PATH>.wake``): while it says a wake-up waits, the sender sends nothing. Under load the
dispatcher, busy with a tick, then gets one datagram per tick instead of two per job (a
submission's, and its answer's from the send thread).
"""

from __future__ import annotations

import hashlib
import mmap
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from runnerkit.service import libc_calls
from runnerkit.service.process import keep_pid_current
from runnerkit.service.shared_bytes import map_shared

#: How long a pending mark is believed: a listener killed before consuming its wake-up
#: leaves the mark set, and senders then send again after this (a poll's worth) at most.
PENDING_S = 0.1
_MARK_SIZE = 8
#: This process's id, kept current in forked children: the mark is read per submitted job.
_PID = keep_pid_current(globals())


class PendingMark:
    """8 bytes shared by a host's forge processes: when the last wake-up not yet consumed
    was sent (``time.monotonic()`` in ms, one clock for every process of the machine), or 0.

    A sender sets it before sending; the listener clears it after draining its socket and
    before its next look at the database, so a job committed before a sender saw the mark
    set is seen by that look: the mark was set by a send the listener had not consumed
    yet. Both sides pass a full memory barrier between their write and their read (the
    commit's and the look's lock calls), so neither reads a stale value across processes.

    Mapped from ``<DB_PATH>.wake`` (:func:`~runnerkit.service.shared_bytes.map_shared`: a full
    disk fails its making, never a store into the mapping); without it every send goes out.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._map: mmap.mmap | None = None
        self._pid = 0

    def _mapped(self) -> mmap.mmap | None:
        if self._pid != _PID:  # a mapping crosses fork, but made anew is simpler
            self._map, self._pid = map_shared(self.path, _MARK_SIZE, writable=True), _PID
        return self._map

    def pending(self) -> bool:
        """Whether a wake-up sent under :data:`PENDING_S` ago waits for its listener."""
        mapped = self._mapped()
        if mapped is None:
            return False
        stamp = int.from_bytes(mapped[:_MARK_SIZE], "little")
        return stamp != 0 and 0 <= time.monotonic() * 1000.0 - stamp < PENDING_S * 1000.0

    def set(self) -> None:
        mapped = self._mapped()
        if mapped is not None:
            mapped[:_MARK_SIZE] = int(time.monotonic() * 1000.0).to_bytes(_MARK_SIZE, "little")

    def clear(self) -> None:
        mapped = self._mapped()
        if mapped is not None:
            mapped[:_MARK_SIZE] = bytes(_MARK_SIZE)


class Wakeup:
    """The wake-up channel of one forge database, seen from one process."""

    def __init__(self, db_path: str) -> None:
        digest = hashlib.sha256(os.path.realpath(db_path).encode()).hexdigest()[:32]
        self.address = f"\0runnerkit-forge-wake-{digest}"
        self.mark = PendingMark(f"{db_path}.wake")
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._sender: socket.socket | None = None
        self._connected = False  # the sender is connected to a listener (its last one)
        self._drain = libc_calls.ReadBuffer(64)
        self._pid = 0
        #: Whether the last :meth:`send` found a listener on this host (None: none sent yet).
        self.heard: bool | None = None

    def _own(self) -> None:
        """Sockets do not cross fork: a child makes its own."""
        if self._pid != os.getpid():
            self._listener = self._sender = None
            self._connected = False
            self._pid = os.getpid()

    def listen(self) -> bool:
        """Bind the channel (the dispatching process only); False while another still has it."""
        with self._lock:
            self._own()
            if self._listener is not None:
                return True
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            listener.setblocking(False)
            try:
                listener.bind(self.address)
            except OSError:
                listener.close()
                return False
            self._listener = listener
            self.mark.clear()  # one a killed listener left
            return True

    def close(self) -> None:
        """Stop listening (the dispatcher lock is being given up)."""
        with self._lock:
            self._own()
            listener, self._listener = self._listener, None
        if listener is not None:
            self.mark.clear()
            listener.close()

    def send(self) -> bool:
        """Wake whichever process listens; nothing happens when none does (its poll will).

        True when a process of this host listens (the dispatcher, which binds the channel
        only while it holds the dispatcher lock): it has the news, so nobody else needs
        telling. A full queue counts: the listener has wake-ups waiting already, and so does
        a pending mark (:class:`PendingMark`), which spares the datagram.
        """
        mark = self.mark
        if mark.pending():
            self.heard = True
            return True
        mark.set()
        for _attempt in range(2):
            fd = self._connect()
            if fd < 0:  # nobody listening (ECONNREFUSED): no error, its poll will see
                mark.clear()
                self.heard = False
                return False
            try:
                libc_calls.send(fd, b"!", socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            except OSError:
                # The listener it was connected to has closed (the lock moved): connect to
                # whichever listens now, once.
                with self._lock:
                    self._connected = False
                continue
            break
        else:
            mark.clear()
            self.heard = False
            return False
        self.heard = True
        return True

    def _connect(self) -> int:
        """The sender's descriptor, connected to the channel's listener; -1 when none."""
        with self._lock:
            self._own()
            if self._sender is None:
                self._sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._sender.setblocking(False)
            if not self._connected:
                try:
                    self._sender.connect(self.address)
                except OSError:
                    return -1
                self._connected = True
            return self._sender.fileno()

    def wait(self, timeout: float, also: Callable[[], int | None] | None = None) -> bool:
        """Sleep until a wake-up arrives or ``timeout`` passes; True when woken.

        Every wake-up queued meanwhile is consumed, and the pending mark cleared before the
        caller looks at the database: one tick serves them all. ``also`` gives
        one more descriptor to wake on (the PostgreSQL dispatcher lock's connection, where
        other forge instances' NOTIFYs arrive); the caller reads it.
        """
        listener = self._listener
        if listener is None:
            return False
        watched: list[Any] = [listener]
        extra = also() if also is not None else None
        if extra is not None:
            watched.append(extra)
        try:
            readable, _, _ = select.select(watched, [], [], max(0.0, timeout))
        except (OSError, ValueError):  # closed under us by close()
            return False
        if listener not in readable:
            return bool(readable)
        try:
            fd = listener.fileno()
            while self._drain.read(fd):
                pass
        except OSError:  # BlockingIOError once drained
            pass
        self.mark.clear()
        return True
