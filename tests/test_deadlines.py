"""The process's deadline watcher: it acts only for a job still running at its deadline.

No timing asserts: what is checked is which callbacks ran, in which order, and that a job's
``end`` waits for a callback that has started.
"""

from __future__ import annotations

import gc
import threading
import time
import weakref

from runnerkit.runner.deadlines import Deadlines
from tests.helpers import run_in_threads


def test_a_watch_ended_in_time_never_fires() -> None:
    watcher = Deadlines()
    fired: list[str] = []
    watch = watcher.watch(time.monotonic() + 0.05, lambda: fired.append("late"))
    assert watch.end() is True
    marker = threading.Event()
    watcher.watch(time.monotonic() + 0.1, marker.set)
    assert marker.wait(10), "the watcher never fired the later deadline"
    assert fired == []


def test_a_running_job_is_answered_at_its_deadline_and_its_end_waits_for_that() -> None:
    watcher = Deadlines()
    inside, finish = threading.Event(), threading.Event()
    order: list[str] = []

    def at_deadline() -> None:
        inside.set()
        finish.wait(10)
        order.append("answered")

    watch = watcher.watch(time.monotonic() + 0.01, at_deadline)
    assert inside.wait(10), "the deadline never fired"
    ended: list[bool] = []
    ender = threading.Thread(target=lambda: ended.append(watch.end()))
    ender.start()
    ender.join(0.2)
    assert ender.is_alive(), "end() returned while the answer was still being sent"
    finish.set()
    ender.join(10)
    assert ended == [False]
    order.append("ended")
    assert order == ["answered", "ended"]


def test_a_sooner_deadline_wakes_the_watcher_sleeping_towards_a_later_one() -> None:
    watcher = Deadlines()
    fired: list[str] = []
    soon = threading.Event()
    late = watcher.watch(time.monotonic() + 60, lambda: fired.append("late"))
    time.sleep(0.05)  # the watcher now sleeps towards the 60 s deadline

    def first() -> None:
        fired.append("soon")
        soon.set()

    watcher.watch(time.monotonic() + 0.05, first)
    assert soon.wait(10), "the sooner deadline waited for the later one"
    assert late.end() is True
    assert fired == ["soon"]


def test_a_failing_answer_does_not_stop_the_watcher() -> None:
    watcher = Deadlines()
    done = threading.Event()

    def broken() -> None:
        raise OSError("the client is gone")

    first = watcher.watch(time.monotonic() + 0.01, broken)
    watcher.watch(time.monotonic() + 0.05, done.set)
    assert done.wait(10), "the watcher stopped after a failed answer"
    assert first.end() is False


def test_every_watch_either_ends_in_time_or_fires_once_from_many_threads() -> None:
    """Eight threads watch and end jobs whose deadlines fall around the moment they end,
    with thread switches forced every 10 µs. Each watch is settled exactly one way: ended in
    time (never fired), or fired once and ``end`` returning only after the callback
    finished."""
    watcher = Deadlines()
    fired: dict[tuple[int, int], int] = {}
    finished: set[tuple[int, int]] = set()
    wrong: list[str] = []

    def job(thread: int) -> None:
        for index in range(400):
            key = (thread, index)

            def at_deadline(key: tuple[int, int] = key) -> None:
                fired[key] = fired.get(key, 0) + 1
                time.sleep(0.0005)
                finished.add(key)

            watch = watcher.watch(time.monotonic() + 0.0005 * (index % 3), at_deadline)
            if index % 2:
                time.sleep(0.0005)
            if watch.end():
                if key in fired:
                    wrong.append(f"{key} ended in time but fired")
            elif key not in finished:
                wrong.append(f"{key}: end returned before its callback finished")

    run_in_threads(job, 8, switch_interval=1e-5)
    assert wrong == []
    assert all(count == 1 for count in fired.values())
    assert fired, "no deadline fired: the test exercised only one side"
    assert len(fired) < 8 * 400, "every deadline fired: the test exercised only one side"


def test_a_watch_ended_in_time_lets_go_of_its_job_before_its_deadline() -> None:
    """The heap keeps an ended watch until its deadline; the job's objects (request,
    payload, answer: whatever ``at_deadline`` holds) must not live on with it."""

    class Job:
        pass

    watcher = Deadlines()
    job = Job()
    gone = weakref.ref(job)
    watch = watcher.watch(time.monotonic() + 3600, lambda job=job: None)
    del job
    gc.collect()
    assert gone() is not None  # held while the job runs
    assert watch.end() is True
    gc.collect()
    assert gone() is None


def test_one_wake_settles_every_deadline_of_its_span() -> None:
    """Jobs ending in time, one per millisecond: the watcher must not wake for each of their
    deadlines (under load that was a thread switch and a GIL hand-over per job)."""
    watcher = Deadlines()
    done = threading.Event()
    for _ in range(300):
        watcher.watch(time.monotonic() + 0.05, lambda: None).end()
        time.sleep(0.001)  # the watcher has time to run between two jobs
    watcher.watch(time.monotonic() + 0.05, done.set)
    assert done.wait(10), "the last, running, watch never fired"
    # 300 deadlines over 0.3 s or more: a wake per 10 ms span (SLACK_S), not one per job.
    assert watcher.wakes < 100, f"{watcher.wakes} wakes for 300 deadlines"
