"""A worker's request threads: a few kept busy, more started only when the work stalls.

gthread hands each request to a ``ThreadPoolExecutor`` as large as the worker's ``threads``,
and a runner sizes that to its capabilities (:mod:`runnerkit.runner.thread_fitting`): 66
threads for one capability of ``maxConcurrency`` 64. The executor starts a thread whenever no
thread is idle at that instant, so under load the pool grows to one thread per open
connection, and every one of them competes for the GIL: each release of it (a socket write,
a lock, a log line) hands it to another thread, a context switch and a cold cache. Measured
at 64 connections against an echo capability: 655 µs of CPU per request with the fitted
pool, 412 µs with 10 threads, where requests queue for a thread instead.

:class:`RequestThreads` keeps the short-request case on ``core`` threads (gunicorn's
``threads`` before a runner fits it) and still gives every admitted job a thread of its own:

- A request waits in a queue while ``core`` threads are busy, and an idle thread takes the
  next request from it (the most recently idle thread first, so spare ones stay asleep and
  retire after :data:`IDLE_S`).
- A watcher wakes every :data:`STALL_S` while requests wait. If no request was taken from the
  queue in that time, the busy threads are blocked in long jobs (or a slow body read), and
  it starts threads until ``core`` of them are free of such work, up to ``max_workers``. A
  job within ``maxConcurrency`` therefore waits for a thread at most about 2 x STALL_S.
- A thread whose request ran longer than :data:`STALL_S` leaves the pool when it is done if
  the pool is over ``core`` and no request waits: it was probably replaced meanwhile.

The interface is the part of ``concurrent.futures.Executor`` gthread uses (``submit`` returns
a ``Future``; ``shutdown``), plus ``max_workers``, which a runner's worker raises once its app
is loaded. The worker itself hands requests over as a :class:`Task` (:meth:`RequestThreads.put`):
what gthread reads of a ``Future`` (``result``, ``cancelled``) and the one callback it adds,
given when the task is made. A ``Future`` makes a ``Condition`` (a lock and a Python object
around it) and takes it five times a request; a task takes no lock of its own.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

#: How long queued requests may go without one being taken before the pool grows (seconds).
#: Short against a job's timeout (a job within maxConcurrency waits about twice this at
#: most), long against a short request (ms), so a busy pool of short requests never grows.
STALL_S = 0.02
#: How long a thread beyond ``core`` may stay idle before it ends (seconds).
IDLE_S = 10.0

_names = itertools.count()
log = logging.getLogger("runnerkit.threads")


class Task:
    """One request for a thread: ``fn(arg)``, then ``then(task)`` on that thread once it has
    run (or been cancelled at shutdown), whose ``result()`` returns or raises what ``fn`` did.

    ``then`` is given at the start, so it never races the thread that runs the task (the
    reason a ``Future`` locks around its callbacks); a failing ``then`` is logged, as a
    ``Future``'s callback is.
    """

    __slots__ = ("_cancelled", "arg", "error", "fn", "then", "value")

    def __init__(self, fn: Callable[[Any], Any], arg: Any, then: Callable[[Task], Any]) -> None:
        self.fn = fn
        self.arg = arg
        self.then = then
        self.value: Any = None
        self.error: BaseException | None = None
        self._cancelled = False

    def run(self) -> None:
        try:
            self.value = self.fn(self.arg)
        except BaseException as exc:  # noqa: BLE001 - handed to result()
            self.error = exc
        self._done()

    def cancel(self) -> None:
        """Never to run (the pool shut down with it queued)."""
        self._cancelled = True
        self._done()

    def _done(self) -> None:
        try:
            self.then(self)
        except Exception:
            log.exception("the callback of a request thread's task failed")

    def cancelled(self) -> bool:
        return self._cancelled

    def result(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.value


def _into_future(future: Future[Any], fn: Callable[..., Any], args: tuple[Any, ...]) -> Task:
    """A task that runs ``fn(*args)`` for ``future`` (``submit``'s, the executor interface)."""

    def call(_arg: Any) -> None:
        if future.set_running_or_notify_cancel():
            try:
                result = fn(*args)
            except BaseException as exc:  # noqa: BLE001 - handed to the future
                future.set_exception(exc)
            else:
                future.set_result(result)

    def then(task: Task) -> None:
        if task.cancelled():
            future.cancel()

    return Task(call, None, then)


class _Idle:
    """An idle thread: blocked on ``wake`` until a request is handed to it in ``item``."""

    __slots__ = ("item", "wake")

    def __init__(self) -> None:
        self.wake = threading.Lock()
        self.wake.acquire()
        self.item: Task | None = None


class RequestThreads:
    """``core`` threads kept hot, up to ``max_workers`` when requests stall (module docstring)."""

    def __init__(
        self,
        core: int,
        max_workers: int | None = None,
        *,
        name: str = "request",
        stall_s: float = STALL_S,
        idle_s: float = IDLE_S,
    ) -> None:
        if core < 1:
            raise ValueError("core must be at least 1")
        self.core = core
        self.max_workers = max(core, max_workers or core)
        self.stall_s = stall_s
        self.idle_s = idle_s
        self._name = f"{name}-{next(_names)}"
        self._lock = threading.Lock()
        self._queue: deque[Task] = deque()
        self._idle: list[_Idle] = []  # a stack: the most recently idle thread is woken first
        self._threads = 0
        #: Requests taken from the queue so far: the watcher's measure of progress.
        self._taken = 0
        #: Each busy thread's start of its current request (monotonic), by thread ident.
        self._busy_since: dict[int, float] = {}
        self._watching = False
        self._watch = threading.Lock()
        self._watch.acquire()
        self._watcher: threading.Thread | None = None
        self._shutdown = False

    @property
    def threads(self) -> int:
        """Threads in the pool now (busy or idle)."""
        return self._threads

    # -- the executor's interface -------------------------------------------------------

    def submit(self, fn: Callable[..., Any], /, *args: Any) -> Future[Any]:
        future: Future[Any] = Future()
        self.put(_into_future(future, fn, args))
        return future

    def put(self, item: Task) -> None:
        """Hand ``item`` to a thread: an idle one now, else the queue (module docstring)."""
        start = watch = False
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new work after shutdown")
            if self._idle:
                idle = self._idle.pop()
                idle.item = item
            else:
                idle = None
                self._queue.append(item)
                if self._threads < self.core:
                    self._threads += 1
                    start = True
                elif self._threads < self.max_workers and not self._watching:
                    self._watching = watch = True
        if idle is not None:
            idle.wake.release()
        elif start and not self._start_thread():
            # No thread for it now (the system's limit): the watcher tries again each stall.
            with self._lock:
                watch = not self._watching
                self._watching = True
        if watch:
            self._start_watching()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Take no more work; idle threads end now, busy ones after their request. Queued
        requests still run unless ``cancel_futures``. ``wait`` is accepted and not honoured:
        gthread calls this with ``wait=False`` (the interpreter joins the threads at exit)."""
        with self._lock:
            self._shutdown = True
            cancelled = list(self._queue) if cancel_futures else []
            if cancel_futures:
                self._queue.clear()
            idle, self._idle = self._idle, []
            # A parked watcher is woken to end; a watching one ends after its sleep.
            wake_watcher = self._watcher is not None and not self._watching
            self._watching = True
        for item in cancelled:
            item.cancel()
        for each in idle:
            each.wake.release()  # with no item: the thread ends
        if wake_watcher:
            self._watch.release()

    # -- the threads --------------------------------------------------------------------

    def _start_thread(self) -> bool:
        # Not daemons, like the executor's: a process that exits waits for the requests in
        # flight (gunicorn's graceful timeout bounds that), and threads a request starts
        # (an asynchronous job's) inherit the flag.
        try:
            threading.Thread(target=self._work, name=self._name, daemon=False).start()
        except RuntimeError as exc:  # can't start new thread: the process's or system's limit
            with self._lock:
                self._threads -= 1
            log.warning("cannot start a request thread (%s); %d running", exc, self._threads)
            return False
        return True

    def _work(self) -> None:
        ident = threading.get_ident()
        busy = self._busy_since
        lock = self._lock
        queue = self._queue
        idle = _Idle()
        while True:
            with lock:
                if queue:
                    item = queue.popleft()
                    self._taken += 1
                elif self._shutdown:
                    self._threads -= 1
                    return
                else:
                    item = None
                    self._idle.append(idle)
            if item is None:
                item = self._wait(idle)
                if item is None:
                    return
            started = busy[ident] = time.monotonic()
            item.run()
            del busy[ident]
            del item
            if time.monotonic() - started >= self.stall_s and self._threads > self.core:
                with lock:
                    # Never with requests waiting: with the pool at its ceiling nothing else
                    # would start a thread for them.
                    if self._threads > self.core and not queue:
                        self._threads -= 1
                        return

    def _wait(self, idle: _Idle) -> Task | None:
        """Sleep until a request is handed over (None: leave the pool)."""
        while True:
            if idle.wake.acquire(timeout=self.idle_s):
                item, idle.item = idle.item, None
                if item is None:  # shut down
                    with self._lock:
                        self._threads -= 1
                return item
            with self._lock:
                if idle in self._idle:
                    if self._threads > self.core or self._shutdown:
                        self._idle.remove(idle)
                        self._threads -= 1
                        return None
                    continue
            # Handed a request just as the wait timed out: the release is on its way.

    # -- growing when the work stalls ---------------------------------------------------

    def _start_watching(self) -> None:
        if self._watcher is not None:
            self._watch.release()
            return
        self._watcher = threading.Thread(
            target=self._watch_stalls, name=f"{self._name}-watch", daemon=True
        )
        try:
            self._watcher.start()
        except RuntimeError as exc:  # the next request that finds the pool full tries again
            with self._lock:
                self._watcher, self._watching = None, False
            log.warning("cannot start the request threads' watcher (%s)", exc)

    def _watch_stalls(self) -> None:
        while True:
            taken = self._taken
            time.sleep(self.stall_s)
            with self._lock:
                if self._shutdown:
                    return
                if not self._queue or self._threads >= self.max_workers:
                    self._watching = False
                    grow = 0
                elif self._taken != taken:
                    continue
                else:
                    grow = self._to_start()
                    self._threads += grow
            for _ in range(grow):
                self._start_thread()
            if not self._watching:
                self._watch.acquire()  # until submit finds the pool full again
                if self._shutdown:
                    return

    def _to_start(self) -> int:
        """How many threads to start (holding the lock): enough that ``core`` threads are
        free of requests older than a stall, for as many requests as wait."""
        now = time.monotonic()
        stuck = sum(1 for since in list(self._busy_since.values()) if now - since >= self.stall_s)
        free = self._threads - stuck
        return max(0, min(len(self._queue), self.core - free, self.max_workers - self._threads))
