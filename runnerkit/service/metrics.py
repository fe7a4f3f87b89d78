"""Metric values in plain memory, and their publication by each process for the instance.

These are the multiprocess plumbing under every metric of the runner and the forge: families
and their labelled series (:func:`family`), the process's snapshot of them, the instance's
directory and the thread that publishes the snapshot there. Adding them up for a scrape is
:mod:`runnerkit.service.metrics_exposition`; the metrics the runner defines are
:mod:`runnerkit.service.metric_families`.

Counting is plain memory: each process keeps its counters, gauges and histogram buckets in
Python objects, and an update is an addition under one process-wide lock (no file, no
syscall). A daemon thread per process publishes the process's values once a second (and at
exit) as ``<metrics dir>/<pid>-<start>.json``: an ordinary write to a temporary file and an
``os.replace``. A failed write (a full disk, a read-only or broken state directory) is
counted, logged at most once a minute, noted for readiness (``state.STORAGE``: the runner is
not ready while its state directory cannot be written) and tried again a second later; it
never reaches the code that counted. Nothing is memory-mapped: prometheus-client's
multiprocess mode kept each value in an mmap'd file, whose pages a full disk turned into
SIGBUS for every worker.

The directory is one per runner instance, ``<state dir>/metrics/<owner pid>-<start>``;
directories of instances whose owner is gone are removed when a new instance starts, so a
restart counts from zero. Until a directory is chosen a scrape shows this process only.
"""

from __future__ import annotations

import atexit
import bisect
import contextlib
import functools
import json
import logging
import math
import os
import shutil
import threading
import time
from collections.abc import Sequence
from typing import Any

from runnerkit.service.process import process_alive, process_start_time
from runnerkit.service.write_failures import STORAGE

log = logging.getLogger("runnerkit.metrics")

#: prometheus-client's default histogram buckets.
DEFAULT_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    math.inf,
)
#: Seconds between two publications of a process's values.
PUBLISH_EVERY_S = 1.0
#: A failing publication is logged at most this often.
FAILURE_LOG_EVERY_S = 60.0


#: Every update takes this lock (made anew in a forked child: a thread of the parent may
#: have held it at the fork).
_LOCK = threading.Lock()


# --------------------------------------------------------------------------- values


class CounterChild:
    """One labelled series of a counter."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        with _LOCK:
            self.value += amount


class GaugeChild(CounterChild):
    """One labelled series of a gauge: a counter that may also go down or be set."""

    __slots__ = ()

    def dec(self, amount: float = 1.0) -> None:
        with _LOCK:
            self.value -= amount

    def set(self, value: float) -> None:
        with _LOCK:
            self.value = float(value)


class HistogramChild:
    """One labelled series of a histogram: a count per bucket (not cumulative) and the sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * len(bounds)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        index = bisect.bisect_left(self.bounds, value)  # "le": a bound counts values equal to it
        if index == len(self.bounds):
            index -= 1  # NaN sorts past +Inf
        with _LOCK:
            self.counts[index] += 1
            self.sum += value


Child = CounterChild | GaugeChild | HistogramChild


class Family:
    """A metric: name, help, label names, and its series in this process.

    ``labels(*values)`` returns the series (created on first use); a family without labels
    is its own single series (``inc``/``dec``/``set``/``observe`` go to it).
    """

    def __init__(
        self,
        kind: str,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        *,
        buckets: Sequence[float] = DEFAULT_BUCKETS,
        mode: str = "livesum",
    ) -> None:
        self.kind = kind
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        bounds = sorted(float(b) for b in buckets)
        if not bounds or bounds[-1] != math.inf:
            bounds.append(math.inf)
        self.bounds = tuple(bounds)
        #: How the gauge of several live processes is combined: "livesum" or "max".
        self.mode = mode
        self.children: dict[tuple[str, ...], Child] = {}
        self._solo = None if self.labelnames else self._make(())

    def _make(self, values: tuple[str, ...]) -> Child:
        child: Child
        if self.kind == "counter":
            child = CounterChild()
        elif self.kind == "gauge":
            child = GaugeChild()
        else:
            child = HistogramChild(self.bounds)
        with _LOCK:
            self.children[values] = child
        return child

    def labels(self, *values: str) -> Any:
        """The series for these label values (as strings), created on first use."""
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {values}")
        PUBLISHER.ensure_running()
        key = tuple(str(v) for v in values)
        child = self.children.get(key)
        return child if child is not None else self._make(key)

    def _only(self) -> Any:
        if self._solo is None:
            raise ValueError(f"{self.name} has labels {self.labelnames}: call labels() first")
        PUBLISHER.ensure_running()
        return self._solo

    def inc(self, amount: float = 1.0) -> None:
        self._only().inc(amount)

    def dec(self, amount: float = 1.0) -> None:
        self._only().dec(amount)

    def set(self, value: float) -> None:
        self._only().set(value)

    def observe(self, value: float) -> None:
        self._only().observe(value)

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "help": self.documentation,
            "labels": list(self.labelnames),
            "buckets": [_bound_text(b) for b in self.bounds] if self.kind == "histogram" else [],
            "mode": self.mode,
        }

    def series(self) -> list[list[Any]]:
        """``[labels, value]`` (or ``[labels, counts, sum]``) per series; call under _LOCK."""
        out: list[list[Any]] = []
        for key, child in self.children.items():
            if isinstance(child, HistogramChild):
                out.append([list(key), list(child.counts), child.sum])
            else:
                out.append([list(key), child.value])
        return out


def _bound_text(bound: float) -> str:
    return "+Inf" if bound == math.inf else repr(float(bound))


#: Every family of this process, by name, in the order they were made.
_FAMILIES: dict[str, Family] = {}
_FAMILIES_LOCK = threading.Lock()


def family(
    kind: str,
    name: str,
    documentation: str,
    labelnames: Sequence[str] = (),
    **options: Any,
) -> Family:
    """The process's family ``name``, made on first call (a second maker gets the same one)."""
    with _FAMILIES_LOCK:
        existing = _FAMILIES.get(name)
        if existing is not None:
            if existing.kind != kind or existing.labelnames != tuple(labelnames):
                raise ValueError(f"metric {name} exists already as another {existing.kind}")
            return existing
        made = Family(kind, name, documentation, labelnames, **options)
        _FAMILIES[name] = made
        return made


def snapshot() -> dict[str, Any]:
    """This process's values, as published: ``{"families": {name: {...,"series": [...]}}}``."""
    with _FAMILIES_LOCK:
        families = list(_FAMILIES.values())
    with _LOCK:
        series = {f.name: f.series() for f in families}
    return {"families": {f.name: {**f.describe(), "series": series[f.name]} for f in families}}


# --------------------------------------------------------------------------- the directory

_DIR: str | None = None


def snapshot_dir() -> str | None:
    """The instance's metrics directory, or None while none is chosen."""
    return _DIR


def prepare_snapshot_dir(root: str, instance: tuple[int, float]) -> str | None:
    """Publish into a fresh ``root/<pid>-<start>`` of ``instance``; the first choice stays.

    Directories left by earlier instances (whose owner process is gone) are removed, so a
    restart starts counting from zero instead of adding to a dead instance's totals. A
    directory that cannot be made (a full disk) is only logged: the publisher makes it when
    it can, and until then a scrape shows this process's values.
    """
    global _DIR
    if _DIR is not None:
        return _DIR
    path = os.path.join(root, f"{instance[0]}-{instance[1]:.2f}")
    try:
        os.makedirs(root, mode=0o700, exist_ok=True)
        for entry in os.listdir(root):
            pid, _, started = entry.partition("-")
            if pid.isdigit() and not process_alive(int(pid), _float(started)):
                shutil.rmtree(os.path.join(root, entry), ignore_errors=True)
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        log.warning(
            "metrics: cannot prepare %s (%s); values stay in memory until it can", path, exc
        )
    _DIR = path
    return path


def _float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


# --------------------------------------------------------------------------- publishing


class Publisher:
    """Writes this process's values to its file in the metrics directory, once a second.

    Started by the first series a process uses (so a gunicorn master that only imported the
    app, or a forked child that never counts, writes nothing), made anew after fork.
    """

    def __init__(self) -> None:
        #: Whether this process's thread runs (false again in a forked child).
        self.running = False
        self._identity = (0, "")
        self._last: bytes | None = None
        self._wake = threading.Event()
        self._guard = threading.Lock()
        #: One publication at a time (the thread's and the one at exit share a temporary file).
        self._writing = threading.Lock()
        #: Publications that failed (also the ``runnerkit_metrics_publish_failures_total``).
        self.failures = 0
        self._logged_at = -math.inf

    @property
    def identity(self) -> str:
        """``<pid>-<start>`` of this process: its file's name without ``.json``."""
        pid = os.getpid()
        if self._identity[0] != pid:
            self._identity = (pid, f"{pid}-{process_start_time(pid) or 0.0:.2f}")
        return self._identity[1]

    def ensure_running(self) -> None:
        """Start this process's thread unless it runs (one attribute test when it does)."""
        if self.running:
            return
        with self._guard:
            if self.running:
                return
            self._last = None
            self._wake = threading.Event()
            threading.Thread(
                target=self._loop, args=(self._wake,), name="runnerkit-metrics", daemon=True
            ).start()
            self.running = True

    def _loop(self, wake: threading.Event) -> None:
        while not wake.wait(PUBLISH_EVERY_S):
            self.publish()

    def publish(self) -> bool:
        """Write the file now if the values changed; False if that failed. Never raises."""
        directory = _DIR
        if directory is None:
            return True
        with self._writing:
            return self._publish(directory)

    def _publish(self, directory: str) -> bool:
        try:
            data = json.dumps(snapshot(), separators=(",", ":")).encode()
            if data == self._last:
                return True
            name = self.identity
            target = os.path.join(directory, f"{name}.json")
            temporary = os.path.join(directory, f".{name}.tmp")
            try:
                os.makedirs(directory, mode=0o700, exist_ok=True)
                with open(temporary, "wb") as handle:
                    handle.write(data)
                os.replace(temporary, target)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(temporary)
                raise
            self._last = data
            STORAGE.recovered("metrics")
            return True
        except Exception as exc:  # noqa: BLE001 - a metric must never hurt its process
            self._failed(exc)
            return False

    def _failed(self, exc: Exception) -> None:
        self.failures += 1
        failures.inc()
        STORAGE.failed("metrics", exc)
        now = time.monotonic()
        if now - self._logged_at >= FAILURE_LOG_EVERY_S:
            self._logged_at = now
            log.warning(
                "metrics: could not publish this process's values (%s: %s); %d failures so "
                "far, retrying every %.0f s",
                type(exc).__name__,
                exc,
                self.failures,
                PUBLISH_EVERY_S,
            )

    def after_fork(self) -> None:
        """In a forked child: no thread yet, nothing written, no failures."""
        self.running = False
        self._last = None
        self.failures = 0
        self._guard = threading.Lock()
        self._writing = threading.Lock()
        self._wake = threading.Event()


PUBLISHER = Publisher()


def publish() -> bool:
    """Publish this process's values now (tests; the thread does it every second)."""
    return PUBLISHER.publish()


@atexit.register
def _publish_at_exit() -> None:
    """A process that exits publishes its last values (its counters stay in the totals)."""
    if PUBLISHER.running:
        PUBLISHER.publish()


def _after_fork_in_child() -> None:
    """A forked child counts from zero: its parent's values are the parent's to publish."""
    global _LOCK, _FAMILIES_LOCK
    _LOCK = threading.Lock()
    _FAMILIES_LOCK = threading.Lock()
    for made in _FAMILIES.values():
        for child in made.children.values():
            if isinstance(child, HistogramChild):
                child.counts = [0] * len(child.counts)
                child.sum = 0.0
            else:
                child.value = 0.0
    PUBLISHER.after_fork()
    labelled.cache_clear()  # the next lookup starts the child's publisher


os.register_at_fork(after_in_child=_after_fork_in_child)


#: Publications of a process's metric values that failed (a full or broken state directory).
failures = family(
    "counter",
    "runnerkit_metrics_publish_failures",
    "Failed writes of a process's metric values to the state directory",
)


@functools.lru_cache(maxsize=4096)
def labelled(metric: Any, *values: str) -> Any:
    """``metric.labels(*values)``, remembered: the lookup costs more than the increment.

    The label values come from bounded sets (capability ids, statuses, error codes, route
    templates), so the cache holds every child there is.
    """
    return metric.labels(*values)
