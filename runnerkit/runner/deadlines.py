"""Jobs' deadlines, watched by one thread per process, so a job can run on its request's thread.

Handing every job to a thread of its own, so the request thread can stop waiting at the
deadline, costs two thread switches per job, and under load each one is a GIL hand-over to
whichever thread wants it next: about as much CPU as the rest of a trivial job's path. With a
server that lets an answer be written while the request is still in the app (gunicorn's
``write`` callable), the code runs on the request's thread instead and :class:`Deadlines` acts
only when a deadline passes first: it calls the job's ``at_deadline``, which answers
``TIMEOUT`` at once, while the code runs on.

A job costs a heap push and a lock to watch and one lock when it ends; the thread wakes only
for deadlines, not for each job: a job that ends first is dropped from the heap when its
deadline comes up, and a new deadline wakes the thread only when it is sooner than the one
it sleeps towards. It sleeps :data:`SLACK_S` past the soonest deadline, so one wake settles
every deadline of that span: waking for each (nearly always one of a job that had long
ended) was a thread switch and a GIL hand-over per job under load.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable

from runnerkit.service.afterfork import PerProcess
from runnerkit.service.gil_locks import take

log = logging.getLogger("runnerkit.job")

_RUNNING, _ENDED, _FIRED = 0, 1, 2

#: How long after a deadline its ``at_deadline`` may be called: the watcher's wakes are this
#: far apart at most once per span, whatever the rate of jobs (10 ms: 2 % of a 500 ms timeout).
SLACK_S = 0.01


def _nothing() -> None:
    """What an ended watch would do at its deadline (it is never called)."""


class Watch:
    """One job's deadline; :meth:`end` it when the code returns."""

    __slots__ = ("_at_deadline", "_deadlines", "_settled", "_state")

    def __init__(self, deadlines: Deadlines, at_deadline: Callable[[], None]) -> None:
        self._deadlines = deadlines
        self._at_deadline = at_deadline
        self._state = _RUNNING
        #: Held while ``at_deadline`` runs (made only for a watch that fires).
        self._settled: threading.Lock | None = None

    def end(self) -> bool:
        """The code returned: True if that was before the deadline fired, else False once
        ``at_deadline`` has finished (its answer is sent: the request may end now)."""
        lock = self._deadlines._lock
        take(lock)
        try:
            if self._state == _RUNNING:
                self._state = _ENDED
                # The watch stays in the heap until its deadline: it must not keep the
                # job's request, payload and answer alive that long (the cyclic GC walks
                # every object alive, and under load that was seconds of requests).
                self._at_deadline = _nothing
                return True
            settled = self._settled
        finally:
            lock.release()
        if settled is not None:
            with settled:
                pass
        return False


class Deadlines:
    """The process's deadline watcher (see the module docstring)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._heap: list[tuple[float, int, Watch]] = []
        self._order = itertools.count()
        #: When the thread wakes next (monotonic), ``inf`` while it waits for a first watch.
        self._waking_at = float("inf")
        self._thread: threading.Thread | None = None
        #: How many times the thread has woken (what :data:`SLACK_S` keeps down).
        self.wakes = 0

    def watch(self, deadline: float, at_deadline: Callable[[], None]) -> Watch:
        """Call ``at_deadline`` (on the watcher's thread) at ``deadline`` (monotonic) unless the
        returned watch has ended by then."""
        watch = Watch(self, at_deadline)
        lock = self._lock
        take(lock)
        try:
            heapq.heappush(self._heap, (deadline, next(self._order), watch))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="runnerkit-deadlines", daemon=True
                )
                self._thread.start()
            elif deadline + SLACK_S < self._waking_at:
                self._wake.notify()
        finally:
            lock.release()
        return watch

    def _run(self) -> None:
        heap = self._heap
        while True:
            with self._lock:
                while True:
                    now = time.monotonic()
                    if heap and heap[0][0] <= now:
                        _, _, watch = heapq.heappop(heap)
                        if watch._state == _RUNNING:
                            break
                        continue  # ended in time: nothing to do
                    # Towards the soonest deadline, ended or not: dropping ended watches
                    # before their deadline emptied the heap after each short job, and the
                    # next job's watch then woke the thread again.
                    self._waking_at = heap[0][0] + SLACK_S if heap else float("inf")
                    self._wake.wait(None if not heap else self._waking_at - now)
                    self.wakes += 1
                watch._state = _FIRED
                watch._settled = settled = threading.Lock()
                settled.acquire()
            try:
                watch._at_deadline()
            except Exception:  # one job's failed answer must not stop the watch
                log.exception("answering a job at its deadline failed")
            finally:
                settled.release()


#: The process's watcher (made anew after fork: its thread does not survive it).
deadlines = PerProcess(Deadlines)
