"""Dependency health checks, each run with a timeout, combined into the HealthCheck contract."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

log = logging.getLogger("runnerkit.health")

#: What a check may return: None/True (healthy), False (unhealthy), a status string, or
#: ``(status, message)``.
CheckResult = bool | str | tuple[str, str] | None
CheckFunction = Callable[[], CheckResult]

_STATUSES = ("healthy", "degraded", "unhealthy")
_RANK = {"healthy": 0, "degraded": 1, "unhealthy": 2}


class HealthChecks:
    """The checks an author registers with ``@runner.health_check``.

    A check that raises is ``unhealthy`` with the exception's type in its message; one that
    takes longer than the timeout is ``unhealthy`` and is not started again while it still
    hangs, so a stuck dependency cannot pile up threads.
    """

    def __init__(self) -> None:
        self._checks: dict[str, CheckFunction] = {}
        self._pending: dict[str, Future[CheckResult]] = {}
        self._pending_pid = os.getpid()
        self._lock = threading.Lock()

    def add(self, name: str, check: CheckFunction) -> None:
        if not name or name in self._checks:
            raise ValueError(f"health check name {name!r} is empty or already registered")
        self._checks[name] = check

    @property
    def names(self) -> list[str]:
        return list(self._checks)

    def run(self, timeout_ms: float) -> list[dict[str, Any]]:
        """Run every check concurrently; one result per check, in registration order."""
        if not self._checks:
            return []
        started = time.monotonic()
        deadline = started + timeout_ms / 1000.0
        futures: dict[str, Future[CheckResult] | None] = {}
        with self._lock:
            if self._pending_pid != os.getpid():
                # Forked (gunicorn): a check the parent was running has no thread here.
                self._pending, self._pending_pid = {}, os.getpid()
            for name, check in self._checks.items():
                previous = self._pending.get(name)
                if previous is not None and not previous.done():
                    futures[name] = None
                    continue
                future = _start(name, check)
                self._pending[name] = future
                futures[name] = future
        results = []
        for name, maybe_future in futures.items():
            if maybe_future is None:
                results.append(_item(name, "unhealthy", 0.0, "previous run has not finished"))
                continue
            try:
                value = maybe_future.result(timeout=max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                elapsed = (time.monotonic() - started) * 1000.0
                results.append(
                    _item(name, "unhealthy", elapsed, f"timed out after {timeout_ms:g} ms")
                )
                continue
            except Exception as exc:  # noqa: BLE001 - a failing check is a status, not a crash
                log.warning("health check %s failed: %s", name, type(exc).__name__)
                elapsed = (time.monotonic() - started) * 1000.0
                results.append(_item(name, "unhealthy", elapsed, f"raised {type(exc).__name__}"))
                continue
            elapsed = (time.monotonic() - started) * 1000.0
            results.append(_interpret(name, value, elapsed))
        return results


def _start(name: str, check: CheckFunction) -> Future[CheckResult]:
    """Run ``check`` on a daemon thread of its own.

    Not a ``ThreadPoolExecutor``: the interpreter joins its threads at exit, so one check stuck
    on a dead dependency would hold a worker's shutdown (and the instance's deregistration)
    for as long as it hangs. A daemon thread is simply left behind. A check still running is
    never started again (see :meth:`HealthChecks.run`), so these threads cannot pile up.
    """
    future: Future[CheckResult] = Future()

    def work() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(check())
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting request
            future.set_exception(exc)

    threading.Thread(target=work, name=f"runnerkit-health-{name}", daemon=True).start()
    return future


def overall_status(checks: list[dict[str, Any]]) -> str:
    """The worst status among the checks; healthy when there are none."""
    worst = "healthy"
    for check in checks:
        if _RANK.get(check["status"], 2) > _RANK[worst]:
            worst = check["status"]
    return worst


def _item(name: str, status: str, elapsed_ms: float, message: str | None = None) -> dict[str, Any]:
    item: dict[str, Any] = {
        "name": name,
        "status": status,
        "responseTimeMs": round(max(0.0, elapsed_ms), 3),
    }
    if message:
        item["message"] = message
    return item


def _interpret(name: str, value: CheckResult, elapsed_ms: float) -> dict[str, Any]:
    if value is None or value is True:
        return _item(name, "healthy", elapsed_ms)
    if value is False:
        return _item(name, "unhealthy", elapsed_ms)
    if isinstance(value, str) and value in _STATUSES:
        return _item(name, value, elapsed_ms)
    if (
        isinstance(value, tuple)
        and len(value) == 2
        and value[0] in _STATUSES
        and isinstance(value[1], str)
    ):
        return _item(name, value[0], elapsed_ms, value[1])
    return _item(
        name, "unhealthy", elapsed_ms, f"check returned an unusable {type(value).__name__}"
    )
