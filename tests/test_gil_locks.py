"""GILLock: a mutex taken only by a thread holding the GIL (real threads, switched often)."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator

import pytest

from runnerkit.service.gil_locks import GILLock, take


@pytest.fixture
def frequent_switches() -> Iterator[None]:
    """Make the interpreter take the GIL from a thread every 10 us, inside sections too."""
    saved = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        yield
    finally:
        sys.setswitchinterval(saved)


def test_one_thread_at_a_time_inside_the_section(frequent_switches: None) -> None:
    lock = GILLock()
    state = {"count": 0, "inside": 0, "overlaps": 0}

    def work() -> None:
        for _ in range(2000):
            with lock:
                state["inside"] += 1
                if state["inside"] != 1:
                    state["overlaps"] += 1
                value = state["count"]
                if value % 97 == 0:
                    time.sleep(0)  # gives the GIL up inside the section
                state["count"] = value + 1
                state["inside"] -= 1

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert state == {"count": 16000, "inside": 0, "overlaps": 0}
    assert not lock.locked()


def test_a_thread_that_found_it_taken_gets_it_once_released() -> None:
    lock = GILLock()
    lock.acquire()
    got = threading.Event()

    def take() -> None:
        with lock:
            got.set()

    taker = threading.Thread(target=take)
    taker.start()
    time.sleep(0.05)  # it keeps trying, pausing up to LONGEST_PAUSE_S between tries
    assert not got.is_set() and lock.locked()
    lock.release()
    taker.join(10)
    assert got.is_set() and not lock.locked()


def test_releasing_a_free_lock_is_an_error() -> None:
    with pytest.raises(RuntimeError):
        GILLock().release()


def test_a_conditions_lock_taken_that_way_while_its_thread_waits_on_it(
    frequent_switches: None,
) -> None:
    """``take`` on the lock of a Condition a thread of its own waits on (the deadline
    watcher's): the waiter is woken under it, and every section stays one thread's."""
    lock = threading.Lock()
    condition = threading.Condition(lock)
    state = {"count": 0, "inside": 0, "overlaps": 0, "woken": 0}
    done = threading.Event()

    def waiter() -> None:
        with condition:
            while not done.is_set():
                condition.wait(1.0)
                state["woken"] += 1

    def work() -> None:
        for index in range(1000):
            take(lock)
            try:
                state["inside"] += 1
                if state["inside"] != 1:
                    state["overlaps"] += 1
                state["count"] += 1
                if index % 100 == 0:
                    condition.notify()
                state["inside"] -= 1
            finally:
                lock.release()

    watcher = threading.Thread(target=waiter)
    watcher.start()
    threads = [threading.Thread(target=work) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    done.set()
    take(lock)
    condition.notify()
    lock.release()
    watcher.join(10)
    assert not watcher.is_alive()
    assert state["count"] == 6000 and state["overlaps"] == 0
    assert state["woken"] >= 1
    assert not lock.locked()
