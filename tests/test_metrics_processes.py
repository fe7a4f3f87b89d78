"""Metrics counted in process memory, published to files, summed at scrape time.

The process cases run in a fresh interpreter (its metrics directory chosen from scratch) that
forks real children: each counts in its own memory and publishes its values to the instance's
directory; a scrape in the parent must add them up as prometheus-client's multiprocess mode
did, counters of exited processes kept and gauges of dead ones dropped.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from runnerkit.runner.app import Runner
from runnerkit.service import metrics
from runnerkit.service.metric_families import metrics as runner_metrics
from runnerkit.service.metrics_exposition import exposition
from runnerkit.service.write_failures import STORAGE
from tests.security.stack import samples, value

ROOT = Path(__file__).resolve().parents[1]

_SCRIPT = r"""
import json, os, sys, time
from runnerkit.service import metrics as m
from runnerkit.service.metric_families import metrics as runner_metrics
from runnerkit.service.metrics_exposition import exposition
from tests.security.stack import samples

m.prepare_snapshot_dir(sys.argv[1], (os.getpid(), 0.0))
current = runner_metrics()
m.labelled(current.jobs_received, "cap", "unknown").inc(100)  # the parent's, before forking


def child(count, active, how):
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        mine = runner_metrics()
        m.labelled(mine.jobs_received, "cap", "unknown").inc(count)
        m.labelled(mine.active_jobs, "cap").inc(active)
        mine.http_duration.observe(0.2)
        if how != "atexit":
            assert m.publish()
        os.write(ready_w, b"1")
        if how == "stays":
            time.sleep(60)  # until the parent kills it
        if how == "atexit":
            sys.exit(0)  # a normal exit: the at-exit publication writes its values
        os._exit(0)  # dies without another word, as a SIGKILL would have it
    os.close(ready_w)
    assert os.read(ready_r, 1) == b"1"
    os.close(ready_r)
    if how != "stays":
        os.waitpid(pid, 0)
    return pid


exited = child(3, 2, "exits")
stays = child(4, 5, "stays")
at_exit = child(6, 7, "atexit")
scrape = samples(exposition()[0].decode())
files = sorted(os.listdir(m.snapshot_dir()))
os.kill(stays, 9)
os.waitpid(stays, 0)
after_kill = samples(exposition()[0].decode())
out = {
    "scrape": [[k[0], dict(k[1]), v] for k, v in scrape.items()],
    "after_kill": [[k[0], dict(k[1]), v] for k, v in after_kill.items()],
    "files": files,
    "pids": [exited, stays, at_exit],
}
print("RESULT" + json.dumps(out))
"""


def _parsed(rows: list[list]) -> dict:
    return {(name, tuple(sorted(labels.items()))): v for name, labels, v in rows}


def test_scrape_sums_live_and_exited_processes_and_drops_dead_gauges(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(tmp_path / "metrics")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT"))
    out = json.loads(line.removeprefix("RESULT"))
    scrape, after_kill = _parsed(out["scrape"]), _parsed(out["after_kill"])
    received = {"capability": "cap", "priority": "unknown"}
    # 100 of the parent (live values) + 3 exited + 4 alive + 6 published at exit: the
    # children counted from zero, not from their parent's 100.
    assert value(scrape, "jobs_received_total", **received) == 113
    assert value(scrape, "http_request_duration_seconds_count") == 3
    assert value(scrape, "http_request_duration_seconds_bucket", le="0.25") == 3
    # Gauges of live processes only: the one that stays (5); the two that exited are gone.
    assert value(scrape, "active_jobs", capability="cap") == 5
    # Once it is killed too, its counters stay in the totals and its gauge goes.
    assert value(after_kill, "jobs_received_total", **received) == 113
    assert value(after_kill, "active_jobs", capability="cap") == 0
    published = {int(name.split("-")[0]) for name in out["files"] if name.endswith(".json")}
    assert set(out["pids"]) <= published, out["files"]
    assert not [name for name in out["files"] if name.endswith(".tmp")], out["files"]


def test_a_failed_publication_is_counted_not_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setattr(metrics, "_DIR", str(blocker / "metrics"))
    before = metrics.PUBLISHER.failures
    metrics.labelled(runner_metrics().jobs_received, "cap", "unknown").inc()

    assert metrics.publish() is False  # no exception
    assert metrics.PUBLISHER.failures == before + 1
    assert "metrics" in STORAGE.problems()
    status, body = Runner("storage-probe").readiness()
    storage = next(c for c in body["checks"] if c["name"] == "storage")
    assert (status, storage["status"]) == (503, "unhealthy")
    assert "metrics" in storage["message"], storage
    text = exposition()[0].decode()
    assert value(samples(text), "runnerkit_metrics_publish_failures_total") >= 1

    monkeypatch.setattr(metrics, "_DIR", str(tmp_path / "metrics"))
    assert metrics.publish() is True
    assert "metrics" not in STORAGE.problems()
    assert Runner("storage-probe").readiness()[0] == 200
    assert [p.name for p in (tmp_path / "metrics").iterdir()] == [
        f"{metrics.PUBLISHER.identity}.json"
    ]
