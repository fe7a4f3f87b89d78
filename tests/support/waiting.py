"""Polling with a bound: the one way tests wait for something to become true."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T],
    timeout: float,
    message: str | Callable[[], str] = "condition not met",
    interval: float = 0.05,
) -> T:
    """Poll ``predicate()`` until truthy; AssertionError with ``message`` after ``timeout`` s.

    ``message`` may be a callable, evaluated only on failure (e.g. to attach a server log).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            raise AssertionError(f"after {timeout}s: {text}")
        time.sleep(interval)
