"""A worker's request threads: short requests share the core threads, long jobs get more.

gthread's executor started a thread whenever none was idle at that instant, so a runner's
pool grew to one thread per connection and every one of them fought for the GIL;
``RequestThreads`` keeps short requests queued for ``core`` threads and grows only when the
queue stops moving (the threads are held by long jobs), up to the ceiling a runner fits to
its capabilities.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from runnerkit.service.request_threads import RequestThreads, Task
from tests.support.waiting import wait_until


class Jobs:
    """Blocking calls that record which thread ran them, released together."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.started: list[int] = []
        self._lock = threading.Lock()

    def hold(self, tag: int) -> int:
        with self._lock:
            self.started.append(threading.get_ident())
        assert self.release.wait(30), "never released"
        return tag

    def quick(self, tag: int) -> tuple[int, int]:
        return tag, threading.get_ident()


@pytest.fixture
def jobs() -> Iterator[Jobs]:
    held = Jobs()
    yield held
    held.release.set()


@pytest.fixture
def make_pool(jobs: Jobs) -> Iterator[Callable[..., RequestThreads]]:
    """Pools shut down after the test, passed or failed (their threads hold the exit)."""
    pools: list[RequestThreads] = []

    def make(*args: Any, **kwargs: Any) -> RequestThreads:
        pools.append(RequestThreads(*args, **kwargs))
        return pools[-1]

    yield make
    jobs.release.set()
    for pool in pools:
        pool.shutdown(cancel_futures=True)


def test_short_requests_queue_for_the_core_threads_instead_of_adding_threads(
    make_pool: Callable[..., RequestThreads], jobs: Jobs
) -> None:
    # A long stall time: only a queue that stops moving for 5 s could grow the pool.
    pool = make_pool(2, 20, stall_s=5.0)
    futures = [pool.submit(jobs.quick, n) for n in range(300)]
    results = [f.result(timeout=10) for f in futures]

    assert [tag for tag, _ in results] == list(range(300))
    assert len({ident for _, ident in results}) <= 2
    assert pool.threads <= 2
    pool.shutdown()


def test_requests_behind_long_jobs_get_threads_up_to_the_ceiling(
    make_pool: Callable[..., RequestThreads], jobs: Jobs
) -> None:
    pool = make_pool(2, 5, stall_s=0.01)
    held = [pool.submit(jobs.hold, n) for n in range(7)]

    # The two core threads are taken; the queue stops moving, so the pool grows to its
    # ceiling: five jobs run at once, the other two wait for a thread.
    wait_until(lambda: len(jobs.started) == 5, 10, lambda: f"{len(jobs.started)} started")
    assert pool.threads == 5
    assert not any(f.done() for f in held)

    jobs.release.set()
    assert [f.result(timeout=10) for f in held] == list(range(7))
    assert len(jobs.started) == 7
    # Threads that ran long jobs leave once the pool is over its core.
    wait_until(lambda: pool.threads == 2, 10, lambda: f"{pool.threads} threads")
    pool.shutdown()


def test_a_raised_ceiling_is_used_by_the_next_stall(
    make_pool: Callable[..., RequestThreads], jobs: Jobs
) -> None:
    pool = make_pool(1, 1, stall_s=0.01)
    held = [pool.submit(jobs.hold, n) for n in range(3)]
    wait_until(lambda: len(jobs.started) == 1, 10)
    # What a runner's worker does once its app is loaded (fit_threads).
    pool.max_workers = 3
    pool.submit(jobs.quick, 99)  # a new request finds the pool full and starts the watch

    wait_until(lambda: len(jobs.started) == 3, 10, lambda: f"{len(jobs.started)} started")
    jobs.release.set()
    assert [f.result(timeout=10) for f in held] == [0, 1, 2]
    pool.shutdown()


def test_idle_threads_beyond_the_core_leave(
    make_pool: Callable[..., RequestThreads], jobs: Jobs
) -> None:
    pool = make_pool(1, 3, stall_s=0.01, idle_s=0.05)
    long = pool.submit(jobs.hold, 0)
    wait_until(lambda: jobs.started, 10)
    # The core thread is held: this one waits for the watcher's new thread, which then idles.
    assert pool.submit(jobs.quick, 1).result(timeout=10)[0] == 1
    wait_until(lambda: pool.threads == 1, 10, lambda: f"{pool.threads} threads")

    jobs.release.set()
    assert long.result(timeout=10) == 0
    # The thread that ran the long job is the core now: it stays.
    assert pool.submit(jobs.quick, 2).result(timeout=10)[0] == 2
    assert pool.threads == 1
    pool.shutdown()


def test_an_exception_reaches_the_future_and_the_thread_serves_on(
    make_pool: Callable[..., RequestThreads],
) -> None:
    pool = make_pool(1)

    def fail() -> None:
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        pool.submit(fail).result(timeout=10)
    assert pool.submit(lambda: 7).result(timeout=10) == 7
    assert pool.threads == 1
    pool.shutdown()


def test_shutdown_runs_queued_requests_then_ends_every_thread(
    make_pool: Callable[..., RequestThreads], jobs: Jobs
) -> None:
    pool = make_pool(1, stall_s=0.01)
    held = pool.submit(jobs.hold, 0)
    wait_until(lambda: jobs.started, 10)
    queued = pool.submit(jobs.quick, 1)
    pool.shutdown(wait=False)

    with pytest.raises(RuntimeError):
        pool.submit(jobs.quick, 2)
    jobs.release.set()
    assert held.result(timeout=10) == 0
    assert queued.result(timeout=10)[0] == 1
    wait_until(lambda: pool.threads == 0, 10, lambda: f"{pool.threads} threads")


def test_shutdown_can_cancel_queued_requests(
    make_pool: Callable[..., RequestThreads], jobs: Jobs
) -> None:
    pool = make_pool(1, stall_s=5.0)
    held = pool.submit(jobs.hold, 0)
    wait_until(lambda: jobs.started, 10)
    queued = pool.submit(jobs.quick, 1)
    pool.shutdown(cancel_futures=True)

    assert queued.cancelled()
    jobs.release.set()
    assert held.result(timeout=10) == 0
    wait_until(lambda: pool.threads == 0, 10, lambda: f"{pool.threads} threads")


def test_an_idle_pool_ends_its_threads_on_shutdown(
    make_pool: Callable[..., RequestThreads],
) -> None:
    pool = make_pool(3)
    assert [pool.submit(lambda n=n: n).result(timeout=10) for n in range(3)] == [0, 1, 2]
    pool.shutdown()
    wait_until(lambda: pool.threads == 0, 10, lambda: f"{pool.threads} threads")


def test_threads_a_request_starts_are_not_daemons(make_pool: Callable[..., RequestThreads]) -> None:
    # An asynchronous job's thread is started by its request's thread and must hold the
    # worker's exit until the job is done: it inherits the daemon flag of its creator.
    pool = make_pool(1)
    assert pool.submit(lambda: threading.Thread(target=int).daemon).result(timeout=10) is False


def test_a_thread_done_with_a_long_job_serves_a_waiting_request_before_it_leaves(
    make_pool: Callable[..., RequestThreads],
) -> None:
    # The pool is at its ceiling, every thread held by a long job, a request waits: the first
    # thread whose job ends takes it, though the pool is over its core.
    pool = make_pool(1, 3, stall_s=0.01)
    releases = [threading.Event() for _ in range(3)]
    started: list[int] = []

    def hold(n: int) -> int:
        started.append(n)
        assert releases[n].wait(30)
        return n

    held = [pool.submit(hold, n) for n in range(3)]
    wait_until(lambda: len(started) == 3, 10, lambda: f"{started} started")
    waiting = pool.submit(lambda: "served")
    releases[0].set()
    assert held[0].result(timeout=10) == 0
    assert waiting.result(timeout=10) == "served"
    for release in releases:
        release.set()
    assert [f.result(timeout=10) for f in held] == [0, 1, 2]


def test_a_thread_that_cannot_start_is_tried_again_not_counted(
    make_pool: Callable[..., RequestThreads], monkeypatch: pytest.MonkeyPatch
) -> None:
    # At the system's thread limit Thread.start raises: the request stays queued, the pool
    # does not count a thread it has not got, and the next try (the watcher's) serves it.
    start = threading.Thread.start
    refusals = [1]

    def start_or_refuse(thread: threading.Thread) -> None:
        if refusals and thread.name.startswith("request-") and "watch" not in thread.name:
            refusals.pop()
            raise RuntimeError("can't start new thread")
        start(thread)

    monkeypatch.setattr(threading.Thread, "start", start_or_refuse)
    pool = make_pool(1, 2, stall_s=0.01)
    future = pool.submit(lambda: "served")
    assert refusals == []
    assert future.result(timeout=10) == "served"
    assert pool.threads == 1


def test_a_task_calls_back_once_on_its_thread_with_what_it_returned_or_raised(
    make_pool: Callable[..., RequestThreads], jobs: Jobs
) -> None:
    """The worker's hand-over (no Future): ``then`` runs once per task, after the task, on
    the thread that ran it; ``result()`` gives back the value or raises the error."""
    pool = make_pool(2)
    done: list[tuple[Task, int]] = []
    finished = threading.Semaphore(0)

    def then(task: Task) -> None:
        done.append((task, threading.get_ident()))
        finished.release()

    def fail(_arg: Any) -> None:
        raise ValueError("boom")

    tasks = [Task(jobs.quick, n, then) for n in range(50)] + [Task(fail, None, then)]
    for task in tasks:
        pool.put(task)
    for _ in tasks:
        assert finished.acquire(timeout=10)
    assert sorted(id(task) for task, _ in done) == sorted(id(task) for task in tasks)
    for task, ident in done:
        if task is tasks[-1]:
            continue
        tag, ran_on = task.result()
        assert ran_on == ident and tag == task.arg and not task.cancelled()
    with pytest.raises(ValueError, match="boom"):
        tasks[-1].result()
    pool.shutdown()


def test_a_failing_callback_is_logged_and_the_thread_serves_on(
    make_pool: Callable[..., RequestThreads], jobs: Jobs, caplog: pytest.LogCaptureFixture
) -> None:
    pool = make_pool(1)

    def broken(_task: Task) -> None:
        raise RuntimeError("callback broke")

    pool.put(Task(jobs.quick, 1, broken))
    assert pool.submit(jobs.quick, 2).result(timeout=10)[0] == 2
    assert pool.threads == 1
    wait_until(lambda: "callback of a request thread's task failed" in caplog.text, 10)


def test_shutdown_cancels_queued_tasks_through_their_callback(
    make_pool: Callable[..., RequestThreads], jobs: Jobs
) -> None:
    pool = make_pool(1, 1)
    pool.put(Task(jobs.hold, 0, lambda task: None))
    wait_until(lambda: jobs.started, 10)
    told: list[Task] = []
    queued = Task(jobs.quick, 1, told.append)
    pool.put(queued)
    pool.shutdown(cancel_futures=True)
    assert told == [queued] and queued.cancelled()
    assert queued.value is None, "a cancelled task never ran"
