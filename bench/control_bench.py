"""Part 4: control traffic (registrations, heartbeats) per instance, for 1, 2, 4, 8 workers.

Every worker of an instance runs the lifecycle scheduler, but only the holder of the
instance's leader lock talks to JobForge, so the traffic must not depend on the worker count.
A JobForgeStub (tests/support) hands out a short heartbeat interval; each instance is
observed for a window after all its workers serve; counts are scaled to a minute, and the
heartbeat rate is also taken from the first to the last heartbeat in the window (what the
verdict compares: it does not depend on where the window's edges fall between two beats).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import RUNNER_APP, reap_sentinels, say, server
from tests.support import JobForgeStub


def _one(workers: int, interval_ms: int, window_s: float, log_dir: Path) -> dict[str, Any]:
    state_dir = tempfile.mkdtemp(prefix=f"bench-control-{workers}-")
    stub = JobForgeStub(heartbeat_interval_ms=interval_ms).start()
    proc = server(
        RUNNER_APP,
        log_dir,
        name=f"runner-control-{workers}",
        workers=workers,
        env={"RUNNERKIT_JOBFORGE_URL": stub.url, "RUNNERKIT_STATE_DIR": state_dir},
    )
    try:
        proc.start()
        proc.wait_ready(timeout=90.0)
        proc.wait_workers_serving(timeout=90.0)
        stub.wait_for(stub.registrations, timeout=30.0)
        stub.wait_for(stub.heartbeats, timeout=30.0)
        began = time.monotonic()
        time.sleep(window_s)
        ended = time.monotonic()
        in_window = [c for c in stub.calls(since=began) if c.time < ended]
        heartbeats = [c for c in in_window if c.path == "/runners/heartbeat"]
        registrations = [c for c in in_window if c.path == "/runners/register"]
        senders = {c.body.get("runnerId") for c in heartbeats if isinstance(c.body, dict)}
        # The rate between the first and the last heartbeat seen: a count over the window
        # alone is off by one whenever a beat falls just outside it (±10/min at 6 s).
        spacing = (heartbeats[-1].time - heartbeats[0].time) if len(heartbeats) > 1 else 0.0
        result = {
            "workers": workers,
            "window_s": ended - began,
            "heartbeats": len(heartbeats),
            "registrations": len(registrations),
            "heartbeats_per_min": len(heartbeats) * 60.0 / (ended - began),
            "heartbeat_rate_per_min": (
                (len(heartbeats) - 1) * 60.0 / spacing if spacing > 0 else 0.0
            ),
            "registrations_per_min": len(registrations) * 60.0 / (ended - began),
            "registrations_total": len(stub.registrations()),
            "heartbeat_ok": sum(1 for c in heartbeats if c.status == 200),
            "runner_ids": len(senders),
        }
    finally:
        proc.stop()
        reap_sentinels(state_dir)
        deregistrations = len(stub.deletes())
        stub.stop()
        shutil.rmtree(state_dir, ignore_errors=True)
    result["deregistrations_at_stop"] = deregistrations
    return result


def run(cfg: Any, log_dir: Path) -> dict[str, Any]:
    interval = cfg.control_interval_ms
    rows = []
    for workers in cfg.control_workers:
        say(f"control traffic with {workers} worker(s), heartbeat every {interval} ms")
        rows.append(_one(workers, interval, cfg.control_s, log_dir))
    expected = 60_000.0 / interval
    return {"interval_ms": interval, "expected_heartbeats_per_min": expected, "rows": rows}
