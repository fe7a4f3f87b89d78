"""Part 1: ``POST /execute`` of a trivial capability against a bare Flask route, then a profile.

Both apps run under the product's gunicorn settings (deploy/gunicorn.conf.py: gthread, 2
workers, 8 threads) at the same time, and in the default pass two more contenders: the runner
with its capability declaring ``isolation = "inline"`` (opt-in), and the runner with every
removable step taken away (``bench.ablations``; a measuring stick, not a setting). The load
comes from another process (wrk, else bench.loadgen) and the contenders take turns, round by
round (A B C D, D C B A, …). Each round also records the CPU the server's processes used per
request (psutil), which is less disturbed by other load on the machine than req/s.

The profile: py-spy samples both runner workers (``--gil``: only the thread holding the GIL,
so samples are CPU time) under load, and each sample is put in one cost bucket (the first
bucket in ``BUCKETS`` with a matching frame anywhere in its stack).
"""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import (
    FLASK_APP,
    REPO_ROOT,
    RUNNER_APP,
    GunicornProcess,
    bucketize,
    cpu_seconds,
    display_path,
    median,
    py_spy,
    record_profile,
    running,
    say,
    server,
)
from runnerkit.affinity import PIN_WORKERS_ENV

WRK_SCRIPT = str(Path(__file__).resolve().parent / "wrk_execute.lua")

#: The third contender of the default pass: the same runner, its capability declaring
#: ``isolation = "inline"`` (opt-in: no job thread, no answer before the code returns).
INLINE = "runnerkit inline"

#: The fourth: the same runner with every step ``bench.ablations`` can remove taken away
#: (ledger, job thread, job log, metrics, slots, marshmallow). It answers how close to bare
#: Flask the rest of the pipeline (routing, envelope, context, limits, admission) can get.
STRIPPED = "runnerkit stripped"

#: Each extra contender: its key for the ratio in a level's result, and the app's environment.
EXTRAS: dict[str, tuple[str, dict[str, str]]] = {
    INLINE: ("inline_ratio", {"BENCH_ECHO_ISOLATION": "inline"}),
    STRIPPED: ("stripped_ratio", {"BENCH_ECHO_STRIPPED": "1"}),
}

#: Cost buckets of the profile, first match wins; each is (name, frame substrings).
BUCKETS: list[tuple[str, tuple[str, ...]]] = [
    ("idempotency ledger (SQLite: claim + complete)", ("Ledger.",)),
    ("concurrency slot (OFD byte-range locks)", ("SlotTable.", "_ofd_lock")),
    (
        "metrics (in-memory counters)",
        ("runnerkit/metrics.py", "Executor._count", "_record (runnerkit/http.py", "_start_timer"),
    ),
    ("job log line (logging, JSON, redaction)", ("Executor._log", "runnerkit/logs.py")),
    ("marshmallow (request, payload, output dump+load)", ("marshmallow/",)),
    ("Context (deadline, cancellation, logger)", ("(runnerkit/capability.py",)),
    (
        "job thread (spawn, hand-off, wait)",
        ("_JobThread.", "Executor._execute", "Thread.start"),
    ),
    ("JSON body parse and limits", ("parse_json_object", "check_json_limits")),
    ("JSON response (jsonify)", ("jsonify", "_json (runnerkit/http.py")),
    ("uuid (correlation id)", ("uuid.py",)),
    ("other runnerkit", ("runnerkit/",)),
    ("Flask / Werkzeug request handling", ("flask/", "werkzeug/")),
    ("gunicorn (HTTP parsing, socket I/O, thread pool)", ("gunicorn/",)),
]


def load_tool() -> str:
    import os

    if os.environ.get("BENCH_LOADGEN", "").lower() == "python" or not shutil.which("wrk"):
        return "python"
    return "wrk"


def drive(tool: str, url: str, concurrency: int, duration: float) -> dict[str, Any]:
    """One closed-loop load run against ``url``; the load tool's JSON result."""
    from bench.common import run_json

    if tool == "wrk":
        threads = 1 if concurrency == 1 else 2
        argv = [
            "wrk",
            f"-t{threads}",
            f"-c{concurrency}",
            f"-d{max(1, round(duration))}s",
            "--timeout",
            "10s",
            "-s",
            WRK_SCRIPT,
            url,
            "--",
            str(random.getrandbits(31)),
        ]
    else:
        argv = [
            sys.executable,
            "-m",
            "bench.loadgen",
            "execute",
            "--url",
            url,
            "--concurrency",
            str(concurrency),
            "--duration",
            str(duration),
            "--processes",
            "2",
        ]
    return run_json(argv, timeout=duration + 120)


def measure(tool: str, proc: GunicornProcess, concurrency: int, duration: float) -> dict[str, Any]:
    cpu_before = cpu_seconds(proc)
    raw = drive(tool, proc.url, concurrency, duration)
    cpu = cpu_seconds(proc) - cpu_before
    seconds = raw["duration_us"] / 1e6
    failed = sum(raw["non200"].values()) + raw["socket_errors"] + raw["timeouts"]
    ok = max(0, raw["requests"] - sum(raw["non200"].values()))
    return {
        "requests": raw["requests"],
        "rps": raw["requests"] / seconds,
        "ok_rps": ok / seconds,
        "non200": raw["non200"],
        "failed": failed,
        "p50_ms": raw["p50_us"] / 1000.0,
        "p99_ms": raw["p99_us"] / 1000.0,
        "cpu_us_per_req": cpu / max(1, raw["requests"]) * 1e6,
    }


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ("rps", "ok_rps", "p50_ms", "p99_ms", "cpu_us_per_req")
    summary: dict[str, Any] = {k: median([r[k] for r in rounds]) for k in keys}
    summary["non200_total"] = sum(sum(r["non200"].values()) for r in rounds)
    summary["requests_total"] = sum(r["requests"] for r in rounds)
    return summary


def profile(
    tool: str, proc: GunicornProcess, concurrency: int, duration: float, out_dir: Path
) -> dict[str, Any]:
    """py-spy over both runner workers during a load run; samples per cost bucket."""
    if py_spy() is None:
        return {"error": "py-spy is not installed (pip install -e '.[bench]')"}
    raw_path = out_dir / "latest-profile-runner.txt"
    load = subprocess.Popen(
        [sys.executable, "-c", _DRIVE_SNIPPET, tool, proc.url, str(concurrency), str(duration)],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lead = min(1.0, duration / 4)
    time.sleep(lead)
    spy = record_profile(proc.master_pid, duration - 2 * lead, raw_path)
    _, spy_err = spy.communicate(timeout=duration + 60)
    load.communicate(timeout=duration + 60)
    if not raw_path.exists():
        return {"error": f"py-spy failed: {spy_err[-500:]}"}
    return {**bucketize(raw_path, BUCKETS), "raw": display_path(raw_path)}


_DRIVE_SNIPPET = """
import sys
from bench.http_bench import drive
drive(sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]))
"""


def compare(tool: str, contenders: dict[str, GunicornProcess], cfg: Any) -> dict[str, Any]:
    """Every concurrency level, the contenders taking turns: per-level rounds and medians."""
    levels: dict[str, Any] = {}
    for concurrency in cfg.concurrencies:
        say(f"/execute at {concurrency} connections, {cfg.rounds} rounds per contender")
        rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in contenders}
        for index in range(cfg.rounds):
            order = list(contenders) if index % 2 == 0 else list(reversed(contenders))
            for name in order:
                rounds[name].append(measure(tool, contenders[name], concurrency, cfg.http_duration))
        ratios = [
            r["ok_rps"] / f["ok_rps"] if f["ok_rps"] else float("nan")
            for r, f in zip(rounds["runnerkit"], rounds["flask"], strict=True)
        ]
        cpu_ratios = [
            f["cpu_us_per_req"] / r["cpu_us_per_req"] if r["cpu_us_per_req"] else float("nan")
            for r, f in zip(rounds["runnerkit"], rounds["flask"], strict=True)
        ]
        levels[str(concurrency)] = {
            "rounds": rounds,
            "runnerkit": summarize(rounds["runnerkit"]),
            "flask": summarize(rounds["flask"]),
            "ratios": ratios,
            "ratio": median(ratios),
            "cpu_ratio": median(cpu_ratios),
        }
        for name, (key, _) in EXTRAS.items():
            if name in rounds:
                extra_ratios = [
                    r["ok_rps"] / f["ok_rps"] if f["ok_rps"] else float("nan")
                    for r, f in zip(rounds[name], rounds["flask"], strict=True)
                ]
                levels[str(concurrency)][name] = summarize(rounds[name])
                levels[str(concurrency)][key] = median(extra_ratios)
    return levels


def _servers(
    log_dir: Path, suffix: str, env: dict[str, str], *, extras: bool = False
) -> dict[str, GunicornProcess]:
    """runnerkit and bare Flask; with ``extras``, also the runners of ``EXTRAS``."""
    state_dir = tempfile.mkdtemp(prefix="bench-http-state-")
    runner_env = {"RUNNERKIT_STATE_DIR": state_dir, **env}
    servers = {
        "runnerkit": server(RUNNER_APP, log_dir, name=f"runner{suffix}", env=runner_env),
        "flask": server(FLASK_APP, log_dir, name=f"flask{suffix}", env=dict(env)),
    }
    if extras:
        for name, (_, extra_env) in EXTRAS.items():
            proc_env = {
                **env,
                "RUNNERKIT_STATE_DIR": tempfile.mkdtemp(prefix="bench-http-state-"),
                **extra_env,
            }
            label = f"runner-{name.split()[-1]}{suffix}"
            servers[name] = server(RUNNER_APP, log_dir, name=label, env=proc_env)
    return servers


def run(cfg: Any, log_dir: Path) -> dict[str, Any]:
    """The default settings, then both contenders again with GUNICORN_PIN_WORKERS=1."""
    tool = load_tool()
    result: dict[str, Any] = {"load_tool": tool, "duration_s": cfg.http_duration, "levels": {}}
    contenders = _servers(log_dir, "", {}, extras=True)
    runner = contenders["runnerkit"]
    with running(*contenders.values()):
        for proc in contenders.values():
            measure(tool, proc, 16, cfg.warmup)
        result["levels"] = compare(tool, contenders, cfg)
        say("profiling the runner's /execute path with py-spy")
        result["profile"] = profile(tool, runner, 16, cfg.profile_duration, cfg.out_dir)
        result["profile"]["concurrency"] = 16
        level16 = result["levels"].get("16") or next(iter(result["levels"].values()))
        result["profile"]["cpu_us_per_req"] = level16["runnerkit"]["cpu_us_per_req"]
        result["profile"]["requests_per_s"] = level16["runnerkit"]["rps"]
    for name in ("runnerkit", *EXTRAS):
        _remove_state(contenders[name])
    say("the same with GUNICORN_PIN_WORKERS=1 (each worker on one CPU) for both")
    pinned = _servers(log_dir, "-pinned", {PIN_WORKERS_ENV: "1"})
    with running(*pinned.values()):
        for proc in pinned.values():
            measure(tool, proc, 16, cfg.warmup)
        result["pinned"] = {"env": f"{PIN_WORKERS_ENV}=1", "levels": compare(tool, pinned, cfg)}
    _remove_state(pinned["runnerkit"])
    return result


def _remove_state(proc: GunicornProcess) -> None:
    state_dir = proc.env_overrides.get("RUNNERKIT_STATE_DIR")
    if state_dir:
        shutil.rmtree(state_dir, ignore_errors=True)
