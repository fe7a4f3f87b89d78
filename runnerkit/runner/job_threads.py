"""The threads capability code runs on, so a request can answer at a job's deadline.

:class:`JobThreads` is a small pool of reusable daemon threads (the lifecycle's scheduler runs
on one too); :class:`JobThread` runs one job's code on it and lets the request thread wait
for it with a timeout, then walk away while the code runs on. Kept apart from the
``/execute`` pipeline because nothing here knows about jobs, ledgers or answers.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from runnerkit.service.afterfork import PerProcess


class JobThreads:
    """Reusable daemon threads for capability code (a new thread per job costs more than a
    small job itself).

    Daemon threads, unlike ``concurrent.futures``' workers, never hold a process's exit
    hostage to a capability that ignores its deadline; gunicorn's graceful timeout bounds the
    drain. Each submitted call either reuses an idle thread or starts a new one.
    """

    def __init__(self, name: str = "runnerkit-job") -> None:
        self._calls: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0
        self._name = name

    def submit(self, call: Callable[[], None]) -> None:
        with self._lock:
            reuse = self._idle > 0
            if reuse:
                self._idle -= 1
        if not reuse:
            threading.Thread(target=self._work, name=self._name, daemon=True).start()
        self._calls.put(call)

    def _work(self) -> None:
        while True:
            self._calls.get()()
            with self._lock:
                self._idle += 1


#: The process's job threads (made anew after fork: threads do not survive it).
_job_pool = PerProcess(JobThreads)


class JobThread:
    """Runs one capability call on a job thread so the request can answer at the deadline.

    Python cannot kill a thread: when the deadline passes the request answers ``TIMEOUT`` and
    the thread runs on until the code returns. ``on_done`` fires only then, which is what keeps
    a concurrency slot honestly occupied and the ledger entry ``running``.
    """

    def __init__(self, target: Callable[[], Any], on_done: Callable[[], None]) -> None:
        self._target = target
        self._on_done = on_done
        # Held until the code returns: the request thread waits by acquiring it, one C-level
        # call (an Event would add a Condition and its own lock per job).
        self._running = threading.Lock()
        self._running.acquire()
        self._finished = False
        self._lock = threading.Lock()
        self._after_abandoned: Callable[[], None] | None = None
        self.result: Any = None
        self.error: BaseException | None = None
        self.finished_at = 0.0

    def start(self) -> None:
        _job_pool().submit(self._run)

    def run_here(self) -> None:
        """Run on the calling thread (``isolation = "inline"``): no hand-off, and no answer
        before the code returns; an answer that comes late is still a ``TIMEOUT``."""
        self._run()

    def _run(self) -> None:
        try:
            self.result = self._target()
        except BaseException as exc:  # noqa: BLE001 - every failure becomes an envelope
            self.error = exc
        finally:
            self.finished_at = time.monotonic()
            # The slot is free before the request answers, so a caller that sends its next
            # job on the answer never finds this one's slot still taken.
            self._on_done()
            with self._lock:
                self._finished = True
                after = self._after_abandoned
            self._running.release()
            if after is not None:
                after()

    def wait(self, timeout_s: float) -> bool:
        if self._running.acquire(timeout=max(0.0, timeout_s)):
            self._running.release()
            return True
        return False

    def abandon(self, after: Callable[[], None]) -> bool:
        """Stop waiting: ``after`` runs when the code finally returns. False if it already has."""
        with self._lock:
            if self._finished:
                return False
            self._after_abandoned = after
            return True
