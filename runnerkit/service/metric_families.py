"""The metrics the runner defines: its job metrics and the HTTP metrics the forge shares.

One set per process, made on first use. They live on the shared floor, not in the runner
framework, because the HTTP families are the forge's too (:mod:`runnerkit.service.http`
counts every request of either app with them) and a scrape makes them first so that
``/metrics`` always lists them.
"""

from __future__ import annotations

import threading

from runnerkit.service.metrics import family


class Metrics:
    """The runner's metrics (one set per process).

    The job metrics carry the contract's names, but their first label is ``capability`` (the
    capability id), not the contract's ``job_type``: a runner never sees a job's type (the
    execution request names only the capability, which may serve several types), so it could
    not fill ``job_type`` truthfully. The forge, which does know job types, labels by them.
    """

    def __init__(self) -> None:
        self.jobs_received = family(
            "counter", "jobs_received", "Jobs received", ["capability", "priority"]
        )
        self.jobs_completed = family(
            "counter", "jobs_completed", "Jobs finished", ["capability", "status"]
        )
        self.jobs_failed = family(
            "counter", "jobs_failed", "Jobs failed", ["capability", "error_code"]
        )
        self.job_duration = family(
            "histogram", "job_duration_seconds", "Job duration", ["capability"]
        )
        self.active_jobs = family("gauge", "active_jobs", "Jobs running", ["capability"])
        self.heartbeat_timestamp = family(
            "gauge",
            "runner_heartbeat_timestamp",
            "Unix time of the last heartbeat JobForge accepted",
            ["runner_id"],
            mode="max",
        )
        self.http_requests = family(
            "counter", "http_requests", "HTTP requests", ["method", "status", "path"]
        )
        self.http_duration = family(
            "histogram", "http_request_duration_seconds", "HTTP request duration"
        )


_METRICS: Metrics | None = None
_METRICS_LOCK = threading.Lock()


def metrics() -> Metrics:
    """The process's runner metrics."""
    global _METRICS
    if _METRICS is None:
        with _METRICS_LOCK:
            if _METRICS is None:
                _METRICS = Metrics()
    return _METRICS
