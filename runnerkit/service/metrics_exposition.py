"""A scrape: the instance's metrics summed over its processes, in Prometheus' text format.

A scrape (``/metrics``) adds up the files of the instance's processes and this process's live
values, and renders them with prometheus-client's exposition, with the semantics of its
multiprocess mode: counters and histograms of processes that have exited stay in the totals
(their last file stays); gauges count only processes alive (``active_jobs`` is their sum,
``runner_heartbeat_timestamp`` their maximum). Another process's values are those of its last
publication, at most a second old; what a process counted in the second before it was
SIGKILLed is lost with it.

prometheus-client is imported here only, late and once (:func:`import_prometheus`): only a
scrape needs it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from runnerkit.service.metric_families import metrics
from runnerkit.service.metrics import PUBLISHER, snapshot, snapshot_dir
from runnerkit.service.process import process_alive

_SNAPSHOT_RE = re.compile(r"^(\d+)-(\d+(?:\.\d+)?)\.json$")


def _merged() -> dict[str, dict[str, Any]]:
    """Every family of the instance with its series summed over processes (see module doc)."""
    mine = snapshot()["families"]
    sources: list[tuple[dict[str, Any], bool]] = [(mine, True)]
    directory = snapshot_dir()
    own = PUBLISHER.identity
    if directory is not None:
        with contextlib.suppress(OSError):
            for entry in os.listdir(directory):
                match = _SNAPSHOT_RE.match(entry)
                if match is None or entry == f"{own}.json":
                    continue
                try:
                    with open(os.path.join(directory, entry), "rb") as handle:
                        data = json.loads(handle.read())
                    families = data["families"]
                except (OSError, ValueError, KeyError, TypeError):
                    continue  # vanished, or not ours
                alive = process_alive(int(match.group(1)), float(match.group(2)))
                sources.append((families, alive))
    merged: dict[str, dict[str, Any]] = {}
    for families, alive in sources:
        for name, entry in families.items():
            target = merged.setdefault(name, {**entry, "values": {}})
            if entry["kind"] == "gauge" and not alive:
                continue
            values = target["values"]
            for item in entry["series"]:
                key = tuple(item[0])
                if entry["kind"] == "histogram":
                    if len(item[1]) != len(target["buckets"]):
                        continue  # other buckets: another version of the code
                    counts, total = values.get(key, ([0] * len(item[1]), 0.0))
                    summed = [a + b for a, b in zip(counts, item[1], strict=True)]
                    values[key] = (summed, total + item[2])
                elif entry["kind"] == "gauge" and entry.get("mode") == "max":
                    values[key] = max(values.get(key, -math.inf), item[1])
                else:
                    values[key] = values.get(key, 0.0) + item[1]
    return merged


class InstanceCollector:
    """A prometheus-client collector yielding the instance's families (see :func:`_merged`)."""

    def __init__(self, names: Sequence[str] | None = None) -> None:
        self.names = names

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        import_prometheus()
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        for name, entry in _merged().items():
            if self.names is not None and name not in self.names:
                continue
            labels = entry["labels"]
            kind = entry["kind"]
            if kind == "counter":
                metric: Any = CounterMetricFamily(name, entry["help"], labels=labels)
                for key, total in entry["values"].items():
                    metric.add_metric(list(key), total)
            elif kind == "gauge":
                metric = GaugeMetricFamily(name, entry["help"], labels=labels)
                for key, current in entry["values"].items():
                    metric.add_metric(list(key), current)
            else:
                metric = HistogramMetricFamily(name, entry["help"], labels=labels)
                for key, (counts, total) in entry["values"].items():
                    cumulative, buckets = 0, []
                    for bound, count in zip(entry["buckets"], counts, strict=True):
                        cumulative += count
                        buckets.append((_go_bound(bound), cumulative))
                    metric.add_metric(list(key), buckets, total)
            yield metric


def _go_bound(text: str) -> str:
    from prometheus_client.utils import floatToGoString

    return "+Inf" if text == "+Inf" else str(floatToGoString(float(text)))


_IMPORT_LOCK = threading.Lock()
_IMPORTED = False


def import_prometheus() -> None:
    """Import prometheus-client's modules once, one thread at a time.

    Only a scrape needs them (for the exposition); two threads importing its modules at once
    can meet a half-initialised module ("cannot import name 'Counter'").
    """
    global _IMPORTED
    if _IMPORTED:
        return
    with _IMPORT_LOCK:
        if not _IMPORTED:
            import prometheus_client.core
            import prometheus_client.exposition
            import prometheus_client.utils  # noqa: F401

            _IMPORTED = True


def exposition(*collectors: Any) -> tuple[bytes, str]:
    """The scrape body and its content type: the instance's metrics, then ``collectors``."""
    import_prometheus()
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

    metrics()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(InstanceCollector())
    for collector in collectors:
        registry.register(collector)
    return generate_latest(registry), CONTENT_TYPE_LATEST
