"""Shared pieces: servers under gunicorn, statistics, interleaved rounds, logging."""

from __future__ import annotations

import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import psutil

from tests.support.procs import REPO_ROOT, GunicornProcess, free_port

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
GUNICORN_CONF = str(REPO_ROOT / "deploy" / "gunicorn.conf.py")
RUNNER_APP = "bench.apps.runner_app:app"
FLASK_APP = "bench.apps.flask_app:app"

#: Variables a benchmark server must not inherit from whoever runs the benchmark.
CLEAN_ENV: dict[str, str | None] = {
    "JOBFORGE_URL": None,
    "TRUTHCORE_URL": None,
    "RUNNER_TOKEN": None,
    "RUNNERKIT_JOBFORGE_URL": None,
    "RUNNERKIT_TRUTHCORE_URL": None,
    "RUNNERKIT_RUNNER_TOKEN": None,
    "RUNNERKIT_SIGNING_SECRET": None,
    "RUNNERKIT_STATE_DIR": None,
    "RUNNERKIT_FORGE_TOKEN": None,
    "RUNNERKIT_FORGE_RUNNER_TOKEN": None,
    "RUNNERKIT_FORGE_SIGNING_SECRET": None,
    "RUNNERKIT_FORGE_DB_URL": None,
    "RUNNERKIT_FORGE_DB_POOL_SIZE": None,
    "PROMETHEUS_MULTIPROC_DIR": None,
    "WEB_CONCURRENCY": None,
    "GUNICORN_THREADS": None,
    "GUNICORN_PIN_WORKERS": None,
}

__all__ = [
    "BENCH_DIR",
    "CLEAN_ENV",
    "FLASK_APP",
    "GUNICORN_CONF",
    "REPO_ROOT",
    "RESULTS_DIR",
    "RUNNER_APP",
    "GunicornProcess",
    "free_port",
]


def say(message: str) -> None:
    """Progress on stderr (the table goes to stdout at the end)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- statistics


def median(values: Sequence[float]) -> float:
    clean = [v for v in values if v is not None and not math.isnan(v)]
    return float(statistics.median(clean)) if clean else float("nan")


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (``p`` in 0..100) of ``values``; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100.0 * len(ordered)))
    return float(ordered[min(rank, len(ordered)) - 1])


def interleave(
    contenders: Sequence[str], rounds: int, run: Callable[[str, int], Any]
) -> dict[str, list[Any]]:
    """Run ``run(name, round)`` for A, B, A, B … ``rounds`` times; results by contender.

    The starting contender alternates every round (A B, B A, A B …) so neither always runs
    first after a pause.
    """
    results: dict[str, list[Any]] = {name: [] for name in contenders}
    for index in range(rounds):
        order = list(contenders) if index % 2 == 0 else list(reversed(contenders))
        for name in order:
            results[name].append(run(name, index))
    return results


# --------------------------------------------------------------------------- processes


def server(
    app_spec: str,
    log_dir: Path,
    *,
    name: str,
    env: Mapping[str, str | None] | None = None,
    workers: int = 2,
    config: str | None = GUNICORN_CONF,
    extra_args: Sequence[str] = (),
) -> GunicornProcess:
    """A gunicorn process (not started) with the benchmark's clean environment."""
    return GunicornProcess(
        app_spec,
        log_dir=log_dir,
        workers=workers,
        config=config,
        env={**CLEAN_ENV, "RUNNERKIT_LOG_LEVEL": "INFO", **(env or {})},
        extra_args=list(extra_args),
        name=name,
    )


@contextlib.contextmanager
def running(*servers: GunicornProcess, ready_path: str = "/health/live") -> Iterator[None]:
    """Start every server, wait until each of its workers answers; stop them all afterwards."""
    try:
        for proc in servers:
            proc.start()
        for proc in servers:
            proc.wait_ready(path=ready_path, timeout=60.0)
            proc.wait_workers_serving(timeout=60.0, path=ready_path)
        yield
    finally:
        for proc in servers:
            proc.stop()


def reap_sentinels(state_dir: Path | str, timeout: float = 8.0) -> None:
    """Wait for (then kill) the runnerkit sentinel that watched the instance in ``state_dir``."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info.get("cmdline") or []
        if "runnerkit.runner.sentinel" in cmdline and str(state_dir) in cmdline:
            found.append(proc)
    _, alive = psutil.wait_procs(found, timeout=timeout)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()


def run_json(argv: Sequence[str], *, timeout: float, env: Mapping[str, str] | None = None) -> Any:
    """Run a helper process and parse the last ``BENCH_JSON`` line of its stdout."""
    completed = subprocess.run(
        list(argv),
        cwd=REPO_ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    for line in reversed(completed.stdout.splitlines()):
        if line.startswith("BENCH_JSON "):
            return json.loads(line[len("BENCH_JSON ") :])
    raise RuntimeError(
        f"{argv[0]} exited {completed.returncode} without a result\n"
        f"stdout: {completed.stdout[-2000:]}\nstderr: {completed.stderr[-2000:]}"
    )


def display_path(path: Path) -> str:
    """``path`` relative to the repository when inside it."""
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / (1024 * 1024)


def cpu_seconds(proc: GunicornProcess) -> float:
    """CPU seconds (user + system) used so far by a gunicorn master and its workers."""
    total = 0.0
    for pid in [proc.master_pid, *proc.worker_pids()]:
        try:
            times = psutil.Process(pid).cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


# --------------------------------------------------------------------------- profiling


def py_spy() -> str | None:
    """The py-spy executable (installed by the ``bench`` extra), or None."""
    import shutil

    found = shutil.which("py-spy")
    if found:
        return found
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else None


def record_profile(
    pid: int, seconds: float, output: Path, rate: int = 250
) -> subprocess.Popen[str]:
    """Start py-spy on ``pid`` and its children: GIL-holding samples only (= CPU time)."""
    spy = py_spy()
    if spy is None:
        raise FileNotFoundError("py-spy is not installed (pip install -e '.[bench]')")
    return subprocess.Popen(
        [
            spy,
            "record",
            "--pid",
            str(pid),
            "--subprocesses",
            "--gil",
            "--rate",
            str(rate),
            "--duration",
            str(max(1, int(seconds))),
            "--format",
            "raw",
            "--output",
            str(output),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def compact_profile(raw: Path) -> None:
    """Shorten py-spy's per-sample process frames (the full command line) to the pid."""
    import re

    text = re.sub(r'process (\d+):"[^"\n]*"', r"process \1", raw.read_text())
    raw.write_text(text)


def bucketize(raw: Path, buckets: Sequence[tuple[str, tuple[str, ...]]]) -> dict[str, Any]:
    """Samples of a py-spy raw file per bucket (first bucket with a frame in the stack)."""
    compact_profile(raw)
    counts: dict[str, int] = {}
    leaves: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        name = next((b for b, needles in buckets if any(n in stack for n in needles)), "other")
        counts[name] = counts.get(name, 0) + count
        leaf = stack.rsplit(";", 1)[-1]
        leaves[leaf] = leaves.get(leaf, 0) + count
    return {
        "samples": total,
        "buckets": dict(sorted(counts.items(), key=lambda kv: -kv[1])),
        "top_leaf_functions": sorted(leaves.items(), key=lambda kv: -kv[1])[:15],
    }
