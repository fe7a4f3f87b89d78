"""Part 3: resident memory of the runner's workers, idle and after 10,000 jobs.

One fresh runner (``bench.apps.runner_app`` under deploy/gunicorn.conf.py, 2 workers); RSS of
each worker (psutil) once every worker has answered a health check ("idle"), then after each
checkpoint of jobs sent through ``POST /execute`` by ``bench.loadgen`` (4 connections: at most
6 jobs run per worker, so none is refused with WORKER_BUSY). The slope between the last two
checkpoints tells steady growth (a leak, or the ledger's cache) from one-time warm-up.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import RUNNER_APP, rss_mb, run_json, running, say, server


def _snapshot(pids: list[int], jobs: int, ledger: Path) -> dict[str, Any]:
    per_worker = {str(pid): rss_mb(pid) for pid in pids}
    return {
        "jobs": jobs,
        "rss_mb": per_worker,
        "mean_rss_mb": sum(per_worker.values()) / len(per_worker),
        "ledger_mb": (
            sum(os.path.getsize(p) for p in (ledger, Path(f"{ledger}-wal")) if os.path.exists(p))
            / (1024 * 1024)
        ),
    }


def run(cfg: Any, log_dir: Path) -> dict[str, Any]:
    state_dir = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    ledger = state_dir / "ledger.sqlite3"
    proc = server(
        RUNNER_APP, log_dir, name="runner-memory", env={"RUNNERKIT_STATE_DIR": str(state_dir)}
    )
    result: dict[str, Any] = {"checkpoints": []}
    with running(proc):
        pids = proc.worker_pids()
        time.sleep(1.0)
        result["checkpoints"].append(_snapshot(pids, 0, ledger))
        sent = 0
        failed = 0
        for target in cfg.memory_checkpoints:
            say(f"memory: jobs {sent} → {target}")
            raw = run_json(
                [
                    sys.executable,
                    "-m",
                    "bench.loadgen",
                    "execute",
                    "--url",
                    proc.url,
                    "--concurrency",
                    "4",
                    "--processes",
                    "1",
                    "--count",
                    str(target - sent),
                ],
                timeout=900,
            )
            failed += sum(raw["non200"].values()) + raw["socket_errors"]
            sent = target
            time.sleep(0.5)
            result["checkpoints"].append(_snapshot(pids, sent, ledger))
        if sorted(proc.worker_pids()) != sorted(pids):
            result["note"] = "a worker was replaced during the run; figures mix processes"
    shutil.rmtree(state_dir, ignore_errors=True)
    first, last = result["checkpoints"][0], result["checkpoints"][-1]
    result["idle_mean_rss_mb"] = first["mean_rss_mb"]
    result["final_mean_rss_mb"] = last["mean_rss_mb"]
    result["growth_mb"] = last["mean_rss_mb"] - first["mean_rss_mb"]
    result["jobs"] = last["jobs"]
    result["failed_requests"] = failed
    if len(result["checkpoints"]) >= 3:
        before = result["checkpoints"][-2]
        span = last["jobs"] - before["jobs"]
        result["late_slope_mb_per_1k"] = (
            (last["mean_rss_mb"] - before["mean_rss_mb"]) / span * 1000.0 if span else 0.0
        )
    return result
