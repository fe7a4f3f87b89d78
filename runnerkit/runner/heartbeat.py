"""Heartbeats: the leader tells JobForge, on the registered interval, that the instance lives.

A heartbeat carries the instance's status, its jobs across all workers and its processes'
CPU and memory; JobForge answering 401/403/404 means it forgot the runner, which then
registers again at once. Also the ``registration`` readiness item, read from the same
client.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import psutil
import requests

from runnerkit.contracts import (
    utc_now,
)
from runnerkit.runner.registration import Registration
from runnerkit.runner.storage import STORAGE_ERRORS
from runnerkit.service.metric_families import metrics
from runnerkit.service.write_failures import STORAGE

log = logging.getLogger("runnerkit.lifecycle")

#: How long a heartbeat waits for the ledger's connection before it sends the last count.
LEDGER_WAIT_S = 0.25


class Heartbeats(Registration):
    """Sends the RunnerHeartbeat (see the module docstring)."""

    _last_queued = 0  # the ledger's last count of queued jobs (see _queued_jobs)

    def heartbeat(self, identity: dict[str, Any]) -> None:
        body = self.heartbeat_body(identity["runnerId"])
        try:
            response = self.client.heartbeat(body, str(identity.get("runnerToken") or ""))
        except requests.RequestException as exc:
            self._note(
                "heartbeat-unreachable",
                logging.WARNING,
                "heartbeat to %s failed (%s)",
                ", ".join(self.client.base_urls),
                type(exc).__name__,
            )
            self._save_heartbeat_time(identity)
            return
        if response.status_code in (401, 403, 404):
            # JobForge forgot us (it restarted), or no longer takes our credential (the
            # runner was replaced, or registered before JobForge issued runnerTokens):
            # register again at once.
            self._note(
                "forgotten",
                logging.WARNING,
                "JobForge answered %s to the heartbeat of runner %s; registering again",
                response.status_code,
                identity["runnerId"],
            )
            self.state.clear_identity()
            self._next_register_at = 0.0
            self.register()
            return
        if response.status_code >= 400:
            self._note(
                f"heartbeat-{response.status_code}",
                logging.WARNING,
                "JobForge answered %s to a heartbeat",
                response.status_code,
            )
        else:
            metrics().heartbeat_timestamp.labels(identity["runnerId"]).set(time.time())
            self._note(
                "heartbeating", logging.INFO, "heartbeating as runner %s", identity["runnerId"]
            )
        self._save_heartbeat_time(identity)

    def _save_heartbeat_time(self, identity: dict[str, Any]) -> None:
        """Schedule the next heartbeat on the interval's grid, so ticks add no drift."""
        interval = identity["heartbeatIntervalMs"] / 1000.0
        now = time.time()
        due = identity.get("nextHeartbeatAt", now) + interval
        if due <= now:
            due = now + interval
        # Also kept here: with a full disk the file keeps the old time, and every tick would
        # heartbeat (and fail to save) again.
        self._heartbeat_due = due
        try:
            self.state.save_identity({**identity, "nextHeartbeatAt": due})
        except OSError as exc:
            self.state.storage.failed(exc)

    def heartbeat_body(self, runner_id: str) -> dict[str, Any]:
        """The RunnerHeartbeat: status, jobs across all workers, instance metrics.

        ``degraded`` while the leader cannot write the instance's files (a full disk): it
        still serves, and JobForge's dashboard should say why its jobs fail.
        """
        _, health = self._health()
        status = health["status"] if health["status"] in ("healthy", "degraded") else "unhealthy"
        if status == "healthy" and STORAGE.problems():
            status = "degraded"
        return {
            "runnerId": runner_id,
            "timestamp": utc_now(),
            "status": status,
            "activeJobs": self.state.slots.total_in_use(),
            "queuedJobs": self._queued_jobs(),
            "metrics": self.metrics(),
        }

    @staticmethod
    def _ledger_count(count: Callable[[], int]) -> int:
        """A count read from the ledger, 0 when it cannot be read: a heartbeat saying the
        runner is unhealthy (its ``state`` check) beats no heartbeat at all."""
        try:
            return count()
        except STORAGE_ERRORS:
            return 0

    def _queued_jobs(self) -> int:
        """The ledger's count of queued jobs, 0 when it cannot be read: a heartbeat saying the
        runner is unhealthy (its ``state`` check) beats no heartbeat at all.

        Never waited for long: a writer of this process may hold the ledger's connection
        while it waits for the writers' turn, and a stalled worker (a SIGSTOPped former
        leader) can hold that turn for as long as it is stopped. A heartbeat late by that
        long would have JobForge call the instance offline; it carries the last count read.
        """
        try:
            self._last_queued = self.state.ledger.queued(wait=LEDGER_WAIT_S)
        except TimeoutError:
            pass
        except STORAGE_ERRORS:
            return 0
        return self._last_queued

    def metrics(self) -> dict[str, float]:
        """CPU and memory of the instance's processes (%), and jobs completed per second."""
        cpu = 0.0
        rss = 0
        try:
            owner = psutil.Process(self.owner[0])
            processes = [owner, *owner.children(recursive=True)]
        except psutil.Error:
            processes = [psutil.Process()]
        live: dict[int, psutil.Process] = {}
        for proc in processes:
            cached = self._processes.get(proc.pid, proc)
            try:
                cpu += cached.cpu_percent(interval=None)
                rss += cached.memory_info().rss
            except psutil.Error:
                continue
            live[proc.pid] = cached
        self._processes = live
        total_memory = psutil.virtual_memory().total or 1
        # Not waited for long either (see _queued_jobs); 0 when the ledger is busy.
        completed = self._ledger_count(
            lambda: self.state.ledger.completed_since(time.time() - 60.0, wait=LEDGER_WAIT_S)
        )
        return {
            "cpuUsage": round(min(100.0, cpu / (psutil.cpu_count() or 1)), 2),
            "memoryUsage": round(min(100.0, 100.0 * rss / total_memory), 3),
            "jobThroughput": round(completed / 60.0, 4),
        }

    def readiness_item(self) -> dict[str, Any]:
        registered = self.current_identity() is not None
        item: dict[str, Any] = {
            "name": "registration",
            "status": "healthy" if registered else "unhealthy",
            "responseTimeMs": 0,
        }
        urls = self.client.base_urls
        if not registered:
            item["message"] = "not registered with JobForge yet"
        elif self.client.unreachable:
            # Registered, but the last call reached none of the forges: jobs already
            # dispatched still run; results wait in the outbox.
            item["status"] = "degraded"
            item["message"] = "JobForge unreachable at " + ", ".join(urls)
        elif len(urls) > 1:
            item["message"] = f"JobForge at {self.client.base_url} (of {len(urls)} URLs)"
        return item
