"""``GUNICORN_PIN_WORKERS``: a worker pinned to one CPU, round robin; nothing when not asked.

Each case runs in a forked child, so the test process itself is never pinned.
"""

from __future__ import annotations

import multiprocessing
import os
from typing import Any

import pytest

from runnerkit.service.affinity import pin_requested, pin_worker

_FORK = multiprocessing.get_context("fork")


def _pin_in_child(age: int, environ: dict[str, str]) -> tuple[int | None, list[int]]:
    def child(queue: Any) -> None:
        cpu = pin_worker(age, environ)
        queue.put((cpu, sorted(os.sched_getaffinity(0))))

    queue: Any = _FORK.Queue()
    proc = _FORK.Process(target=child, args=(queue,))
    proc.start()
    result: tuple[int | None, list[int]] = queue.get(timeout=10)
    proc.join(10)
    return result


@pytest.mark.parametrize("value", ["1", "true", "YES", " on "])
def test_pinning_is_asked_for_with_a_yes(value: str) -> None:
    assert pin_requested({"GUNICORN_PIN_WORKERS": value})


@pytest.mark.parametrize("value", ["", "0", "false", "no", "2"])
def test_pinning_is_off_unless_asked_for(value: str) -> None:
    assert not pin_requested({"GUNICORN_PIN_WORKERS": value})
    assert not pin_requested({})


def test_an_unpinned_worker_keeps_every_cpu() -> None:
    allowed = sorted(os.sched_getaffinity(0))

    cpu, affinity = _pin_in_child(1, {})

    assert cpu is None
    assert affinity == allowed


def test_workers_are_pinned_to_one_cpu_each_round_robin() -> None:
    allowed = sorted(os.sched_getaffinity(0))
    seen = []
    for age in range(1, len(allowed) + 2):
        cpu, affinity = _pin_in_child(age, {"GUNICORN_PIN_WORKERS": "1"})
        assert affinity == [cpu]
        assert cpu == allowed[age % len(allowed)]
        seen.append(cpu)
    assert set(seen) == set(allowed), "round robin must reach every allowed CPU"
