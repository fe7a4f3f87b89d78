"""Prometheus metrics with the observability contract's names, summed across gunicorn workers.

prometheus-client's multiprocess mode keeps each worker's values in files of one directory and
adds them up at scrape time. It must be switched on (``PROMETHEUS_MULTIPROC_DIR``) before the
first metric exists, so this module sets the directory — one per runner instance, inside its
state directory — and imports prometheus-client only then. When the variable is already set
(by an operator, or another component of the process), that directory is used as it is.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import os
import re
import shutil
import sys
import threading
from dataclasses import dataclass
from typing import Any

from runnerkit.state import process_alive

_PID_FILE_RE = re.compile(r"_(\d+)\.db$")


def prepare_multiprocess_dir(root: str, instance: tuple[int, float]) -> str | None:
    """Point prometheus-client at a fresh ``root/<pid>-<start>``; None if it is too late.

    Directories left by earlier instances (whose owner process is gone) are removed, so a
    restart starts counting from zero instead of adding to a dead instance's totals.
    """
    current = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if current:
        os.makedirs(current, exist_ok=True)
        return current
    if "prometheus_client" in sys.modules:
        return None  # imported in single-process mode already; keep it consistent
    os.makedirs(root, mode=0o700, exist_ok=True)
    for entry in os.listdir(root):
        pid, _, started = entry.partition("-")
        if pid.isdigit() and not process_alive(int(pid), _float(started)):
            shutil.rmtree(os.path.join(root, entry), ignore_errors=True)
    path = os.path.join(root, f"{instance[0]}-{instance[1]:.2f}")
    os.makedirs(path, exist_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    return path


def _float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


@dataclass
class Metrics:
    """The runner's metrics (one set per process)."""

    jobs_received: Any
    jobs_completed: Any
    jobs_failed: Any
    job_duration: Any
    active_jobs: Any
    heartbeat_timestamp: Any
    http_requests: Any
    http_duration: Any
    registry: Any
    multiprocess: bool


_METRICS: Metrics | None = None
_METRICS_LOCK = threading.Lock()
_IMPORT_LOCK = threading.Lock()
_IMPORTED = False


def import_prometheus() -> None:
    """Import prometheus-client's modules once, one thread at a time.

    It is imported late (after the multiprocess directory is set), and then from whichever
    thread gets there first: a request thread, the lifecycle's housekeeping, a scrape. Two
    threads importing its modules at once can meet a half-initialised module ("cannot import
    name 'Counter'"), so every late import in runnerkit goes through here first.
    """
    global _IMPORTED
    if _IMPORTED:
        return
    with _IMPORT_LOCK:
        if not _IMPORTED:
            import prometheus_client.core
            import prometheus_client.multiprocess  # noqa: F401

            _IMPORTED = True


def metrics() -> Metrics:
    """The process's metrics, created on first use (after the multiprocess dir is set)."""
    if _METRICS is None:
        with _METRICS_LOCK:
            return _create()
    return _METRICS


def _create() -> Metrics:
    global _METRICS
    if _METRICS is None:
        import_prometheus()
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        multiprocess = "PROMETHEUS_MULTIPROC_DIR" in os.environ
        registry = None if multiprocess else CollectorRegistry()
        kw: dict[str, Any] = {"registry": registry}
        _METRICS = Metrics(
            jobs_received=Counter("jobs_received", "Jobs received", ["job_type", "priority"], **kw),
            jobs_completed=Counter("jobs_completed", "Jobs finished", ["job_type", "status"], **kw),
            jobs_failed=Counter("jobs_failed", "Jobs failed", ["job_type", "error_code"], **kw),
            job_duration=Histogram("job_duration_seconds", "Job duration", ["job_type"], **kw),
            active_jobs=Gauge(
                "active_jobs", "Jobs running", ["job_type"], multiprocess_mode="livesum", **kw
            ),
            heartbeat_timestamp=Gauge(
                "runner_heartbeat_timestamp",
                "Unix time of the last heartbeat JobForge accepted",
                ["runner_id"],
                multiprocess_mode="max",
                **kw,
            ),
            http_requests=Counter(
                "http_requests", "HTTP requests", ["method", "status", "path"], **kw
            ),
            http_duration=Histogram("http_request_duration_seconds", "HTTP request duration", **kw),
            registry=registry,
            multiprocess=multiprocess,
        )
    return _METRICS


@functools.lru_cache(maxsize=4096)
def labelled(metric: Any, *values: str) -> Any:
    """``metric.labels(*values)``, remembered: the lookup costs more than the increment.

    The label values come from bounded sets (capability ids, statuses, error codes, route
    templates), so the cache holds every child there is.
    """
    return metric.labels(*values)


def exposition() -> tuple[bytes, str]:
    """The scrape body and its content type, summed over every worker in multiprocess mode."""
    import_prometheus()
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    current = metrics()
    if current.multiprocess:
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
    else:
        registry = current.registry
    return generate_latest(registry), CONTENT_TYPE_LATEST


def forget_dead_processes() -> None:
    """Drop live-gauge files of dead workers so ``active_jobs`` never counts a ghost."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not directory:
        return
    import_prometheus()
    from prometheus_client.multiprocess import mark_process_dead

    pids = set()
    for path in glob.glob(os.path.join(directory, "gauge_live*_*.db")):
        match = _PID_FILE_RE.search(path)
        if match:
            pids.add(int(match.group(1)))
    for pid in pids:
        if not process_alive(pid, None):
            with contextlib.suppress(OSError):
                mark_process_dead(pid, directory)
