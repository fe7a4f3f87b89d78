"""Part 2: jobs end to end through the forge: submit → dispatched → completed.

Two stacks run side by side, each a forge (``runnerkit.forge:app`` under gunicorn as
``runnerkit forge`` starts it, ``runnerkit.forge.serving``: gthread, 3 workers, 16 threads,
default settings) on its own
SQLite file, with one runner instance (stack "1 runner") or two (stack "2 runners") of
``bench.apps.runner_app`` (deploy/gunicorn.conf.py; ``echo`` with max_concurrency 6, one
worker's job allowance, so the forge never sends a runner more than it can run).

Load comes from ``bench.loadgen forge`` in its own process, stacks taking turns:

- burst: N jobs submitted as fast as 8 connections can → jobs/s (completed jobs over first
  submit → last completedAt) and submit → completed p50/p99. wrk submits them when it is
  installed (bench/wrk_submit.lua): the Python submitter would take 0.3 to 1.3 ms of CPU per
  job from the 2 cores the forge and runners share, wrk about a tenth of that;
- paced: an open-loop rate of half of that stack's burst jobs/s → p50/p99 at half of peak;
- serial: one job at a time, each submitted on a new connection (so it lands on either
  forge worker) → the latency floor, and where it goes.

Timings come from the forge's JobResult metadata (startedAt, completedAt: millisecond
timestamps) against the submitter's clock just before ``POST /jobs``, on the same machine.
A third stack, "1 runner, 1 forge worker", takes its turn in every test: with one forge worker
every ``POST /jobs`` lands in the process whose dispatcher dispatches.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import requests

from bench.common import (
    REPO_ROOT,
    RUNNER_APP,
    GunicornProcess,
    bucketize,
    cpu_seconds,
    display_path,
    median,
    py_spy,
    reap_sentinels,
    record_profile,
    say,
    server,
)
from runnerkit.forge import serving


@dataclass
class Stack:
    name: str
    forge: GunicornProcess
    runners: list[GunicornProcess]
    state_dirs: list[str] = field(default_factory=list)
    root: Path | None = None

    def start(self, timeout: float = 60.0) -> None:
        self.forge.start()
        self.forge.wait_ready(path="/health", timeout=timeout)
        self.forge.wait_workers_serving(timeout=timeout, path="/health")
        for runner in self.runners:
            runner.start()
        for runner in self.runners:
            runner.wait_ready(timeout=timeout)
            runner.wait_workers_serving(timeout=timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            page = requests.get(f"{self.forge.url}/runners?status=healthy", timeout=5).json()
            if page.get("total") == len(self.runners):
                return
            time.sleep(0.1)
        raise TimeoutError(f"{self.name}: runners did not register with the forge")

    def stop(self) -> None:
        for runner in self.runners:
            runner.stop()
        self.forge.stop()
        for directory in self.state_dirs:
            reap_sentinels(directory)
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)


def make_stack(
    name: str,
    runners: int,
    log_dir: Path,
    forge_workers: int = serving.WORKERS,
    max_concurrency: int = 6,
) -> Stack:
    root = Path(tempfile.mkdtemp(prefix="bench-forge-"))
    slug = name.replace(" ", "-").replace(",", "")
    forge = server(
        "runnerkit.forge:app",
        log_dir,
        name=f"forge-{slug}",
        config=None,
        workers=forge_workers,
        env={"RUNNERKIT_FORGE_DB_PATH": str(root / "forge.sqlite3")},
        extra_args=list(serving.OPTIONS),
    )
    procs, dirs = [], []
    for index in range(runners):
        state_dir = str(root / f"runner-{index}")
        dirs.append(state_dir)
        procs.append(
            server(
                RUNNER_APP,
                log_dir,
                name=f"runner-{slug}-{index}",
                env={
                    "RUNNERKIT_JOBFORGE_URL": forge.url,
                    "RUNNERKIT_STATE_DIR": state_dir,
                    "BENCH_ECHO_MAX_CONCURRENCY": str(max_concurrency),
                },
            )
        )
    return Stack(name, forge, procs, dirs, root)


def load(stack: Stack, pattern: str, **options: Any) -> dict[str, Any]:
    """One load run in its own process; adds the CPU each party used per completed job.

    CPU is read when the load generator says every job has finished, before it reads the
    jobs back (which costs the forge too).
    """
    argv = [sys.executable, "-m", "bench.loadgen", "forge", "--url", stack.forge.url]
    argv += ["--pattern", pattern]
    for key, value in options.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    forge_cpu = cpu_seconds(stack.forge)
    runner_cpu = sum(cpu_seconds(r) for r in stack.runners)
    used: dict[str, float] = {}
    result: dict[str, Any] | None = None
    with tempfile.TemporaryFile("w+") as errors:
        proc = subprocess.Popen(
            argv, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=errors, text=True
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("BENCH_MARK"):
                times = psutil.Process(proc.pid).cpu_times()
                used = {
                    "forge": cpu_seconds(stack.forge) - forge_cpu,
                    "runners": sum(cpu_seconds(r) for r in stack.runners) - runner_cpu,
                    # wrk, when it submitted the burst, is a child the generator waited for.
                    "load generator": times.user
                    + times.system
                    + times.children_user
                    + times.children_system,
                }
            elif line.startswith("BENCH_JSON "):
                result = json.loads(line[len("BENCH_JSON ") :])
        proc.wait(timeout=600)
        if result is None:
            errors.seek(0)
            raise RuntimeError(f"bench.loadgen exited {proc.returncode}: {errors.read()[-2000:]}")
    jobs = max(1, result["completed"])
    result["cpu_ms_per_job"] = {party: cpu / jobs * 1000.0 for party, cpu in used.items()}
    return result


#: Cost buckets of the forge profile, first match wins.
FORGE_BUCKETS: list[tuple[str, tuple[str, ...]]] = [
    (
        "POST /jobs: submit transaction (group commit: job, 2 events, assertion)",
        ("JobStore.submit",),
    ),
    ("POST /jobs: body parse + JobRequest marshmallow load", ("_body (runnerkit/forge/api.py",)),
    ("dispatcher: claims (update, event, assertion per job)", ("JobStore.claim",)),
    ("dispatcher: answers recorded (update, event, 2 assertions per job)", ("JobStore.finish",)),
    ("dispatcher: housekeeping sweep", ("JobStore.sweep",)),
    ("dispatcher: HTTP to the runner (http.client)", ("Dispatcher.execute",)),
    ("dispatcher: matching queries, tick transaction, heartbeat", ("Dispatcher.",)),
    ("benchmark's polling (GET /jobs?status=... count)", ("JobStore.list",)),
    ("Flask / Werkzeug request handling", ("flask/", "werkzeug/")),
    ("gunicorn (HTTP parsing, socket I/O, thread pool)", ("gunicorn/",)),
]


def profile(stack: Stack, jobs: int, out_dir: Path) -> dict[str, Any]:
    """py-spy over the forge's workers during one burst of ``jobs`` jobs."""
    if py_spy() is None:
        return {"error": "py-spy is not installed (pip install -e '.[bench]')"}
    raw_path = out_dir / "latest-profile-forge.txt"
    argv = [sys.executable, "-m", "bench.loadgen", "forge", "--url", stack.forge.url]
    argv += ["--pattern", "burst", "--count", str(jobs), "--threads", "8"]
    loader = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.3)
    # The burst takes about jobs / (its peak rate); sample most of it.
    spy = record_profile(stack.forge.master_pid, 4, raw_path)
    _, spy_err = spy.communicate(timeout=120)
    loader.communicate(timeout=600)
    if not raw_path.exists():
        return {"error": f"py-spy failed: {spy_err[-500:]}"}
    return {**bucketize(raw_path, FORGE_BUCKETS), "raw": display_path(raw_path)}


KEYS = (
    "jobs_per_s",
    "p50_ms",
    "p99_ms",
    "queue_p50_ms",
    "queue_p90_ms",
    "run_p50_ms",
    "submit_rate",
    "queued_over_50ms",
)


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {k: median([r[k] for r in rounds]) for k in KEYS}
    summary["completed"] = sum(r["completed"] for r in rounds)
    summary["submitted"] = sum(r["submitted"] for r in rounds)
    summary["retried"] = sum(r["retried"] for r in rounds)
    summary["not_completed"] = summary["submitted"] - summary["completed"]
    summary["cpu_ms_per_job"] = {
        party: median([r["cpu_ms_per_job"][party] for r in rounds])
        for party in rounds[0]["cpu_ms_per_job"]
    }
    return summary


def interleaved(stacks: list[Stack], rounds: int, run: Any) -> dict[str, list[dict[str, Any]]]:
    results: dict[str, list[dict[str, Any]]] = {s.name: [] for s in stacks}
    for index in range(rounds):
        order = stacks if index % 2 == 0 else list(reversed(stacks))
        for stack in order:
            results[stack.name].append(run(stack))
    return results


def run(cfg: Any, log_dir: Path) -> dict[str, Any]:
    one = make_stack("1 runner", 1, log_dir)
    two = make_stack("2 runners", 2, log_dir)
    solo = make_stack("1 runner, 1 forge worker", 1, log_dir, forge_workers=1)
    stacks = [one, two, solo]
    result: dict[str, Any] = {
        "burst": {},
        "paced": {},
        "serial": {},
        "forge_workers": serving.WORKERS,
    }
    try:
        for stack in (one, two, solo):
            stack.start()
        for stack in (one, two, solo):
            load(stack, "burst", count=cfg.forge_warmup, threads=8)
        say(f"forge burst: {cfg.forge_jobs} jobs x {cfg.forge_rounds} rounds per stack")
        bursts = interleaved(
            stacks, cfg.forge_rounds, lambda s: load(s, "burst", count=cfg.forge_jobs, threads=8)
        )
        peaks = {}
        for name, rounds in bursts.items():
            result["burst"][name] = {"rounds": rounds, **summarize(rounds)}
            peaks[name] = result["burst"][name]["jobs_per_s"]
        result["ratio_2_to_1"] = median(
            [
                b["jobs_per_s"] / a["jobs_per_s"]
                for a, b in zip(bursts[one.name], bursts[two.name], strict=True)
            ]
        )
        say(f"forge paced at half of each stack's peak {peaks}")
        paced = interleaved(
            stacks,
            cfg.forge_rounds,
            lambda s: load(
                s,
                "paced",
                rate=f"{peaks[s.name] / 2:.1f}",
                duration=cfg.forge_paced_s,
                threads=16,
            ),
        )
        for name, rounds in paced.items():
            result["paced"][name] = {
                "rate": peaks[name] / 2,
                "rounds": rounds,
                **summarize(rounds),
            }
        say("forge serial: one job at a time")
        serial = interleaved(stacks, 1, lambda s: load(s, "serial", count=cfg.forge_serial_jobs))
        for name, rounds in serial.items():
            result["serial"][name] = {"rounds": rounds, **summarize(rounds)}
        say("profiling the forge during a burst with py-spy")
        result["profile"] = profile(one, cfg.forge_profile_jobs, cfg.out_dir)
    finally:
        for stack in (one, two, solo):
            stack.stop()
    return result
