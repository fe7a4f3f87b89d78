"""The forge's Prometheus metrics: ``GET /metrics``, summed across gunicorn workers.

What a scrape shows:

- ``http_requests_total{method,status,path}`` and ``http_request_duration_seconds`` (the
  observability contract's names; ``path`` is the route template, e.g. ``/jobs/<job_id>``);
- ``forge_jobs{status}``: jobs in each JobStatus (``queued`` + ``retrying`` is the queue),
  and ``forge_runners{status}``: registered runners in each RunnerMetadata status, both read
  from the database at scrape time, so every worker answers the same and a restart loses
  nothing;
- ``forge_dispatch_latency_seconds{job_type}``: how long a job waited from the moment it
  could run (submitted, or its retry time came) until the dispatcher took it for a runner
  (the ``job.started`` moment, right before ``POST /execute`` is handed to the send pool),
  and ``forge_jobs_dispatched_total{job_type}``.

Counting and summing across workers work as in :mod:`runnerkit.metrics`: each process counts
in memory and publishes its values once a second to a file of one directory. The forge has no
instance state directory, so it uses ``<DB_PATH>.metrics/<pid>-<start>`` of the instance owner
(the gunicorn master, else this process); directories of dead owners are removed.

The HTTP metrics are the process-global objects of :func:`runnerkit.metrics.metrics`, so a
forge and a runner in one process share them without a duplicate registration (and a scrape
of either then counts the requests of both: they are the same process).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flask import Flask, Response

from runnerkit.contracts import JOB_STATUSES, RUNNER_STATUSES
from runnerkit.service.http import register_request_metrics
from runnerkit.service.metric_families import metrics as runner_metrics
from runnerkit.service.metrics import family, prepare_snapshot_dir
from runnerkit.service.metrics_exposition import exposition as instance_exposition
from runnerkit.service.metrics_exposition import import_prometheus
from runnerkit.service.process import instance_owner

from . import db

if TYPE_CHECKING:
    from . import Forge

log = logging.getLogger("runnerkit.forge.metrics")

#: Queue waits range from milliseconds (an idle forge) to hours (a backlog, long retries).
DISPATCH_LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    900.0,
    3600.0,
    float("inf"),
)


@dataclass
class ForgeMetrics:
    """The forge's own metric families (one set per process)."""

    dispatch_latency: Any
    dispatched: Any


_METRICS: ForgeMetrics | None = None
_METRICS_LOCK = threading.Lock()


def forge_metrics() -> ForgeMetrics:
    """The process's forge metrics."""
    global _METRICS
    with _METRICS_LOCK:
        if _METRICS is None:
            _METRICS = ForgeMetrics(
                dispatch_latency=family(
                    "histogram",
                    "forge_dispatch_latency_seconds",
                    "Seconds a job waited from eligible (submitted, or retry time come) until "
                    "the dispatcher took it for a runner",
                    ["job_type"],
                    buckets=DISPATCH_LATENCY_BUCKETS,
                ),
                dispatched=family(
                    "counter",
                    "forge_jobs_dispatched",
                    "Job attempts the dispatcher sent to a runner",
                    ["job_type"],
                ),
            )
        return _METRICS


class ForgeStateCollector:
    """``forge_jobs{status}`` and ``forge_runners{status}``, counted in the database per scrape.

    Every status is always present (0 when none), so a series never disappears.
    """

    def __init__(self, forge: Forge) -> None:
        self.forge = forge

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        import_prometheus()
        from prometheus_client.core import GaugeMetricFamily

        try:
            with self.forge.db.snapshot() as conn:
                jobs = db.count_jobs_by_status(conn)
                rows = conn.execute(
                    "SELECT status, COUNT(*) AS n FROM runners GROUP BY status"
                ).fetchall()
        except db.DatabaseError as exc:
            # The scrape still answers (with the HTTP metrics); /health reports the database.
            log.warning("metrics: the database query failed (%s)", type(exc).__name__)
            return
        runners = {r["status"]: int(r["n"]) for r in rows}
        job_family = GaugeMetricFamily(
            "forge_jobs", "Jobs by status (queued + retrying waiting)", labels=["status"]
        )
        for status in _with_extra(JOB_STATUSES, jobs):
            job_family.add_metric([status], jobs.get(status, 0))
        yield job_family
        runner_family = GaugeMetricFamily(
            "forge_runners", "Registered runners by status", labels=["status"]
        )
        for status in _with_extra(RUNNER_STATUSES, runners):
            runner_family.add_metric([status], runners.get(status, 0))
        yield runner_family


def _with_extra(known: Iterable[str], counted: dict[str, int]) -> list[str]:
    """The known statuses, then any other status the database holds (never dropped)."""
    ordered = list(known)
    return ordered + sorted(s for s in counted if s not in ordered)


def exposition(forge: Forge) -> tuple[bytes, str]:
    """The forge's scrape body and content type."""
    forge_metrics()
    return instance_exposition(ForgeStateCollector(forge))


def eligible_since(row: db.Row) -> float:
    """Epoch seconds since which a waiting job could have been dispatched."""
    since = float(row["submitted"])
    not_before = row["not_before"]
    if not_before is not None:
        since = max(since, float(not_before))
    return since


def instrument_dispatcher(forge: Forge) -> None:
    """Observe the dispatch latency of every claimed job, without changing the dispatcher.

    The dispatcher takes jobs with ``forge.jobs.claim_all(conn, picks, now)`` (``claim``
    goes through it too) right before it hands the executions to its send pool; that call
    is wrapped on the instance (idempotently).
    """
    jobs = forge.jobs
    original: Callable[..., Any] = jobs.claim_all
    if getattr(original, "_forge_metrics", False):
        return
    current = forge_metrics()

    def claim_all(conn: Any, picks: Any, now: Any) -> Any:
        claims = original(conn, picks, now)
        if claims:
            try:
                rows = {row["id"]: row for row, _runner, _capability in picks}
                for claim in claims:
                    row = rows[claim.job_id]
                    job_type = str(row["type"])
                    current.dispatch_latency.labels(job_type).observe(
                        max(0.0, now.ts - eligible_since(row))
                    )
                    current.dispatched.labels(job_type).inc()
            except Exception:  # a metric must never break dispatching
                log.warning("could not record the dispatch latency", exc_info=True)
        return claims

    claim_all._forge_metrics = True  # type: ignore[attr-defined]
    setattr(jobs, "claim_all", claim_all)  # noqa: B010 - an instance attribute shadows the method


def init_app(app: Flask, forge: Forge) -> None:
    """Serve ``GET /metrics`` from ``app`` and count its requests; instrument the dispatcher.

    Call before the dispatcher starts.
    """
    # One directory per forge instance, next to its database: <DB_PATH>.metrics/<pid>-<start>.
    root = f"{os.path.abspath(str(forge.settings.db_path))}.metrics"
    prepare_snapshot_dir(root, instance_owner())
    runner_metrics()  # the shared HTTP metrics
    forge_metrics()
    register_request_metrics(app)
    instrument_dispatcher(forge)

    def prometheus_metrics() -> Response:
        body, content_type = exposition(forge)
        return Response(body, status=200, content_type=content_type)

    app.add_url_rule("/metrics", "forge_metrics", prometheus_metrics, methods=["GET"])
