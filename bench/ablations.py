"""Stand-ins that take one step of the runner's ``/execute`` path away, for measuring its cost.

Each is a context manager patching runnerkit in the current process only (runnerkit itself is
not changed); they size costs, they are not proposals to drop a step. ``bench.inprocess``
times them one at a time in one process; ``bench.apps.runner_app`` applies them all under
gunicorn (``BENCH_ECHO_STRIPPED=1``) for the ceiling contender of ``bench.http_bench``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

from runnerkit import Runner
from runnerkit.runner import (
    deadlines,
    execution,
    job_answers,
    job_running,
    job_threads,
    ledger,
    locks,
)
from runnerkit.service import http


@contextlib.contextmanager
def patched(target: Any, name: str, value: Any) -> Iterator[None]:
    old = getattr(target, name)
    setattr(target, name, value)
    try:
        yield
    finally:
        setattr(target, name, old)


class _NoMetric:
    def labels(self, *args: Any) -> _NoMetric:
        return self

    def inc(self, *args: Any) -> None:
        pass

    def dec(self, *args: Any) -> None:
        pass

    def observe(self, *args: Any) -> None:
        pass

    def set(self, *args: Any) -> None:
        pass


class _NoMetrics:
    def __getattr__(self, name: str) -> _NoMetric:
        return _NoMetric()


@contextlib.contextmanager
def no_ledger() -> Iterator[None]:
    with (
        patched(ledger.Ledger, "claim", lambda self, job_id, **kw: ledger.Claim("run")),
        patched(ledger.Ledger, "complete", lambda self, *a, **kw: None),
    ):
        yield


class _InTime:
    """A deadline watch that never fires."""

    def end(self) -> bool:
        return True


@contextlib.contextmanager
def no_job_thread() -> Iterator[None]:
    """No answer at the deadline: no job thread (off the lane) and no deadline watch (the
    lane under gunicorn runs the code on the request's thread, watched)."""
    with (
        patched(job_threads.JobThread, "start", lambda self: self._run()),
        patched(deadlines.Deadlines, "watch", lambda self, deadline, call: _InTime()),
    ):
        yield


@contextlib.contextmanager
def no_job_log() -> Iterator[None]:
    logger = logging.getLogger("runnerkit.job")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def no_metrics() -> Iterator[None]:
    none = _NoMetrics()
    with (
        patched(execution, "metrics", lambda: none),
        patched(job_running, "metrics", lambda: none),
        patched(job_answers, "metrics", lambda: none),
        patched(http, "metrics", lambda: none),
        patched(execution, "labelled", lambda metric, *values: metric),
        patched(job_running, "labelled", lambda metric, *values: metric),
        patched(job_answers, "labelled", lambda metric, *values: metric),
        patched(http, "labelled", lambda metric, *values: metric),
    ):
        yield


@contextlib.contextmanager
def no_slots() -> Iterator[None]:
    with (
        patched(locks.SlotTable, "acquire", lambda self, cap: locks.Slot(cap, 0)),
        patched(locks.SlotTable, "release", lambda self, slot: None),
    ):
        yield


@contextlib.contextmanager
def no_marshmallow(runner: Runner) -> Iterator[None]:
    def load_request(body: dict[str, Any]) -> dict[str, Any]:
        return {"timeoutMs": 30000, **body, "metadata": body.get("metadata", {})}

    capability = runner.capabilities["echo"]
    with (
        patched(execution, "load_execution_request", load_request),
        patched(capability, "load_input", lambda payload: dict(payload)),
        patched(capability, "dump_output", lambda result: dict(result)),
    ):
        yield


@contextlib.contextmanager
def no_output_reload(runner: Runner) -> Iterator[None]:
    """dump_output dumps through Output and then loads the dump again to check it."""
    capability = runner.capabilities["echo"]
    out = capability._output_schema
    with patched(capability, "dump_output", lambda result: out.dump(result)):
        yield


@contextlib.contextmanager
def cached_runner_id(runner: Runner) -> Iterator[None]:
    """Runner.runner_id is recomputed (uuid5, or an identity file stat) for every answer."""
    value = runner.runner_id
    with patched(type(runner), "runner_id", property(lambda self: value)):
        yield


@contextlib.contextmanager
def everything_off(runner: Runner) -> Iterator[None]:
    with (
        no_ledger(),
        no_job_thread(),
        no_job_log(),
        no_metrics(),
        no_slots(),
        no_marshmallow(runner),
        cached_runner_id(runner),
    ):
        yield


@contextlib.contextmanager
def no_hmac() -> Iterator[None]:
    """A signed runner that takes every signature as valid: no HMAC, no age check (the
    request's key is still made, and recorded when the job runs)."""
    with patched(execution, "verify", lambda *args, **kwargs: ""):
        yield


@contextlib.contextmanager
def no_replay_record() -> Iterator[None]:
    """A signed runner that records no signed request's key (nor looks for it)."""
    with patched(ledger.Ledger, "first_sight", lambda self, *args: True):
        yield


def steps(runner: Runner) -> dict[str, Callable[[], contextlib.AbstractContextManager[None]]]:
    """Each promise's step by its short name, as ``BENCH_ECHO_WITHOUT`` takes them away
    (the last two only mean something with signing on)."""
    return {
        "ledger": no_ledger,
        "job-thread": no_job_thread,
        "slot": no_slots,
        "validation": lambda: no_marshmallow(runner),
        "log-line": no_job_log,
        "metrics": no_metrics,
        "hmac": no_hmac,
        "replay-record": no_replay_record,
    }


def variants(runner: Runner) -> dict[str, Callable[[], contextlib.AbstractContextManager[None]]]:
    """Each measured variant of ``runner``'s path by name ("baseline": nothing taken away)."""
    return {
        "baseline": contextlib.nullcontext,
        "no idempotency ledger": no_ledger,
        "no job thread (run inline)": no_job_thread,
        "no job log line": no_job_log,
        "no metrics": no_metrics,
        "no concurrency slot locks": no_slots,
        "no marshmallow at all": lambda: no_marshmallow(runner),
        "no output re-load (dump only)": lambda: no_output_reload(runner),
        "runner_id computed once": lambda: cached_runner_id(runner),
        "all of the above off": lambda: everything_off(runner),
    }
