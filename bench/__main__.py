"""``python -m bench [--quick] [--only http,inprocess,forge,memory,control]``.

Runs the benchmarks, prints the table, and writes bench/results/latest.md, latest.json and
latest.png (plus the raw py-spy profiles). ``BENCH_QUICK=1`` is the same as ``--quick``: a
smoke run of every part with few, short rounds. ``BENCH_LOADGEN=python`` uses the Python
load generator instead of wrk for part 1.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.common import RESULTS_DIR, run_json, say

PARTS = ("http", "inprocess", "forge", "memory", "control")


@dataclass
class Config:
    quick: bool = False
    out_dir: Path = RESULTS_DIR
    # part 1
    concurrencies: list[int] = field(default_factory=lambda: [1, 16, 64])
    #: Another checkout whose runner joins part 1's rounds (``--against``).
    against: str | None = None
    rounds: int = 5
    http_duration: float = 4.0
    warmup: float = 2.0
    profile_duration: float = 8.0
    inprocess_requests: int = 500
    inprocess_rounds: int = 6
    # part 2
    forge_rounds: int = 3
    forge_jobs: int = 3000
    forge_warmup: int = 200
    forge_paced_s: float = 6.0
    forge_serial_jobs: int = 50
    forge_profile_jobs: int = 3000
    # part 3
    memory_checkpoints: list[int] = field(default_factory=lambda: [1000, 5000, 10000])
    # part 4
    control_workers: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    control_interval_ms: int = 500
    control_s: float = 10.0

    @classmethod
    def quick_mode(cls) -> Config:
        return cls(
            quick=True,
            rounds=2,
            http_duration=2.0,
            warmup=1.0,
            profile_duration=4.0,
            inprocess_requests=200,
            inprocess_rounds=2,
            forge_rounds=2,
            forge_jobs=300,
            forge_warmup=50,
            forge_paced_s=3.0,
            forge_serial_jobs=20,
            forge_profile_jobs=400,
            memory_checkpoints=[500, 2000],
            control_s=3.0,
        )


def run_inprocess(cfg: Config, log_dir: Path) -> dict[str, Any]:
    argv = [
        sys.executable,
        "-m",
        "bench.inprocess",
        "--requests",
        str(cfg.inprocess_requests),
        "--rounds",
        str(cfg.inprocess_rounds),
    ]
    result: dict[str, Any] = run_json(argv, timeout=900)
    # The job thread's cost again with the process on one CPU: how much of it is the hand-off
    # itself and how much the job running on the other core.
    result["one_cpu"] = run_json(
        [*argv, "--pin-cpu", "--variants", "no job thread (run inline)"], timeout=900
    )
    return result


def server_errors(log_dir: Path) -> list[dict[str, Any]]:
    """Error lines the servers logged (runnerkit's JSON logs), grouped by log and message."""
    groups: dict[tuple[str, str, str], int] = {}
    for path in sorted(log_dir.glob("*.log")):
        server = path.stem.rsplit("-", 1)[0]
        for line in path.read_text(errors="replace").splitlines():
            if "] [ERROR] " in line:  # gunicorn's own
                message = line.split("] [ERROR] ", 1)[1]
                key = (server, re.sub(r"\d+", "N", message), "")
                groups[key] = groups.get(key, 0) + 1
                continue
            if '"level": "error"' not in line and '"level": "fatal"' not in line:
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            exception = str(entry.get("exception", "")).strip().splitlines()
            key = (server, str(entry.get("message", "")), exception[-1] if exception else "")
            groups[key] = groups.get(key, 0) + 1
    return [
        {"server": s, "message": m, "exception": e, "count": n}
        for (s, m, e), n in sorted(groups.items())
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    quick_env = os.environ.get("BENCH_QUICK", "") not in ("", "0")
    parser.add_argument("--quick", action="store_true", default=quick_env)
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma list of {PARTS}")
    parser.add_argument("--out", default=str(RESULTS_DIR), help="results folder")
    parser.add_argument(
        "--against",
        metavar="DIR",
        help="another checkout (with its own .venv: make venv there) whose runner joins "
        "part 1's rounds, so a change's CPU per request is measured before and after at once",
    )
    args = parser.parse_args(argv)
    cfg = Config.quick_mode() if args.quick else Config()
    cfg.out_dir = Path(args.out).resolve()
    cfg.against = args.against
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = set(parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}; choose from {PARTS}")
    log_dir = Path(tempfile.mkdtemp(prefix="bench-logs-"))
    say(f"{'quick' if cfg.quick else 'full'} run of {', '.join(parts)}; server logs in {log_dir}")

    from bench import control_bench, forge_bench, http_bench, memory_bench, report

    runners = {
        "http": http_bench.run,
        "inprocess": run_inprocess,
        "forge": forge_bench.run,
        "memory": memory_bench.run,
        "control": control_bench.run,
    }
    results: dict[str, Any] = {
        "meta": {
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "quick": cfg.quick,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "load_average_at_start": os.getloadavg(),
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        }
    }
    began = time.monotonic()
    failed = False
    for part in parts:
        started = time.monotonic()
        try:
            results[part] = runners[part](cfg, log_dir)
        except Exception as exc:  # noqa: BLE001 - one broken part must not lose the others
            failed = True
            results[part] = {"error": f"{type(exc).__name__}: {exc}"}
            say(f"{part} failed:\n{traceback.format_exc()}")
        results[part]["seconds"] = time.monotonic() - started
    results["server_errors"] = server_errors(log_dir)
    results["meta"]["seconds"] = time.monotonic() - began
    results["meta"]["load_average_at_end"] = os.getloadavg()
    (cfg.out_dir / "latest.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    markdown = report.markdown(results)
    (cfg.out_dir / "latest.md").write_text(markdown)
    chart = report.chart(results, cfg.out_dir / "latest.png")
    print(markdown)
    say(f"wrote {cfg.out_dir}/latest.md, latest.json{', latest.png' if chart else ''}")
    say(f"total {results['meta']['seconds']:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
