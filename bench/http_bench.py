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
    CLEAN_ENV,
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
from runnerkit.service.affinity import PIN_WORKERS_ENV

WRK_SCRIPT = str(Path(__file__).resolve().parent / "wrk_execute.lua")
WRK_SIGNED_SCRIPT = str(Path(__file__).resolve().parent / "wrk_signed.lua")

#: The signing secret of the signed contender (JobForge's dispatcher signs every request).
BENCH_SECRET = "bench-signing-secret"
#: Requests signed beforehand per second of a load run (more than any contender serves).
SIGNED_PER_S = 6000

#: The third contender of the default pass: the same runner, its capability declaring
#: ``isolation = "inline"`` (opt-in: no job thread, no answer before the code returns).
INLINE = "runnerkit inline"

#: The fourth: the same runner with every step ``bench.ablations`` can remove taken away
#: (ledger, job thread, job log, metrics, slots, marshmallow). It answers how close to bare
#: Flask the rest of the pipeline (routing, envelope, context, limits, admission) can get.
STRIPPED = "runnerkit stripped"

#: The fifth: the same runner with ``RUNNERKIT_SIGNING_SECRET`` set, every request signed
#: (with wrk only: the requests are signed beforehand, see ``wrk_signed.lua``).
SIGNED = "runnerkit signed"

#: With ``--against DIR``: the same runner served from another checkout (its own ``.venv``),
#: so a change's cost per request is measured before and after in the same rounds.
AGAINST = "runnerkit against"

#: Each extra contender: its key for the ratio in a level's result, and the app's environment.
EXTRAS: dict[str, tuple[str, dict[str, str]]] = {
    INLINE: ("inline_ratio", {"BENCH_ECHO_ISOLATION": "inline"}),
    STRIPPED: ("stripped_ratio", {"BENCH_ECHO_STRIPPED": "1"}),
    SIGNED: ("signed_ratio", {"RUNNERKIT_SIGNING_SECRET": BENCH_SECRET}),
    AGAINST: ("against_ratio", {}),
}


class CheckoutProcess(GunicornProcess):
    """A gunicorn process of another runnerkit checkout, with that checkout's own Python."""

    def __init__(self, checkout: Path, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, cwd=checkout, **kwargs)
        self.python = str(checkout / ".venv" / "bin" / "python")

    def command(self) -> list[str]:
        return [self.python, *super().command()[1:]]


def against_checkout(directory: str) -> dict[str, str]:
    """Where the ``--against`` checkout is and which commit it holds (for the report)."""
    checkout = Path(directory).resolve()
    if not (checkout / ".venv" / "bin" / "python").exists():
        raise SystemExit(f"--against {checkout}: no .venv there (run make venv in it first)")
    rev = subprocess.run(
        ["git", "-C", str(checkout), "log", "-1", "--format=%h"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return {"dir": str(checkout), "rev": rev or "(not a git checkout)"}


#: The step-price pass: each promise's step taken away alone (``BENCH_ECHO_WITHOUT``, see
#: ``bench.ablations.steps``), by its name in the report.
STEPS: dict[str, str] = {
    "idempotency ledger (claim + answer stored)": "ledger",
    "answer at the deadline (deadline watch; a job thread off the lane)": "job-thread",
    "concurrency slot (cross-worker lock)": "slot",
    "validation (request, payload, output)": "validation",
    "job log line": "log-line",
    "metrics": "metrics",
}
#: The signature check's parts, each taken away alone from the signed runner (its price:
#: the signed runner against that one, both sent the same signed requests).
SIGNED_STEPS: dict[str, str] = {
    "of the signature check: the HMAC (and the age check)": "hmac",
    "of the signature check: the replay record (looked for, then written)": "replay-record",
}
#: The whole signature check's price: the signed runner against the unsigned one.
SIGNATURE_STEP = "signature check (signing on: HMAC, replay record)"
#: Connections of the step-price pass.
STEP_CONNECTIONS = 16

#: Cost buckets of the profile, first match wins; each is (name, frame substrings).
BUCKETS: list[tuple[str, tuple[str, ...]]] = [
    ("idempotency ledger (SQLite: claim + complete)", ("Ledger.",)),
    ("concurrency slot (OFD byte-range locks)", ("SlotTable.", "ofd_lock")),
    (
        "metrics (in-memory counters)",
        (
            "runnerkit/service/metric",
            "JobAnswers._count",
            "_record (runnerkit/service/http.py",
            "_start_timer",
        ),
    ),
    ("job log line (logging, JSON, redaction)", ("JobAnswers._log", "runnerkit/service/logs.py")),
    ("marshmallow (request, payload, output dump+load)", ("marshmallow/",)),
    ("Context (deadline, cancellation, logger)", ("(runnerkit/runner/capability.py",)),
    (
        "running the job (job thread or deadline watch, the code, its answer)",
        ("JobThread.", "JobRunning._execute", "Thread.start", "runnerkit/runner/deadlines.py"),
    ),
    ("JSON body parse and limits", ("parse_json_object", "check_json_limits")),
    ("JSON response (jsonify)", ("jsonify", "json_response (runnerkit/service/http.py")),
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


def signed_requests(path: Path, count: int) -> None:
    """Write ``count`` signed /execute requests for ``wrk_signed.lua``, each a fresh jobId."""
    import uuid

    from runnerkit.service.signing import EVENT_ID_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER, sign

    lines = []
    for _ in range(count):
        body = (
            '{"jobId":"' + str(uuid.uuid4()) + '","moduleId":"bench","capabilityId":"echo",'
            '"payload":{"text":"hello"},"timeoutMs":5000}'
        ).encode()
        headers = sign(body, BENCH_SECRET)
        fields = (SIGNATURE_HEADER, TIMESTAMP_HEADER, EVENT_ID_HEADER)
        lines.append("\t".join([*(headers[name] for name in fields), body.decode()]))
    path.write_text("\n".join(lines) + "\n")


def _wrk_threads(concurrency: int) -> int:
    return 1 if concurrency == 1 else 2


def _wrk(concurrency: int, duration: float, script: str, url: str, *script_args: str) -> list[str]:
    """wrk's command line: one thread per connection up to two, the script's own arguments."""
    return [
        "wrk",
        f"-t{_wrk_threads(concurrency)}",
        f"-c{concurrency}",
        f"-d{max(1, round(duration))}s",
        "--timeout",
        "10s",
        "-s",
        script,
        url,
        "--",
        *script_args,
    ]


def drive(
    tool: str, url: str, concurrency: int, duration: float, *, signed: bool = False
) -> dict[str, Any]:
    """One closed-loop load run against ``url``; the load tool's JSON result. ``signed``:
    every request signed with ``BENCH_SECRET`` (wrk only)."""
    from bench.common import run_json

    if signed:
        if tool != "wrk":
            raise RuntimeError("signed requests need wrk (bench/wrk_signed.lua)")
        with tempfile.TemporaryDirectory(prefix="bench-signed-") as folder:
            requests_file = Path(folder) / "requests.tsv"
            signed_requests(requests_file, int(SIGNED_PER_S * max(1.0, duration)))
            threads = _wrk_threads(concurrency)
            argv = _wrk(
                concurrency, duration, WRK_SIGNED_SCRIPT, url, str(requests_file), str(threads)
            )
            return run_json(argv, timeout=duration + 120)
    if tool == "wrk":
        argv = _wrk(concurrency, duration, WRK_SCRIPT, url, str(random.getrandbits(31)))
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
    signed = bool(proc.env_overrides.get("RUNNERKIT_SIGNING_SECRET"))
    cpu_before = cpu_seconds(proc)
    raw = drive(tool, proc.url, concurrency, duration, signed=signed)
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
        overheads = [
            r["cpu_us_per_req"] - f["cpu_us_per_req"]
            for r, f in zip(rounds["runnerkit"], rounds["flask"], strict=True)
        ]
        levels[str(concurrency)] = {
            "cpu_overhead_us": median(overheads),
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
                levels[str(concurrency)][name]["cpu_overhead_us"] = median(
                    [
                        r["cpu_us_per_req"] - f["cpu_us_per_req"]
                        for r, f in zip(rounds[name], rounds["flask"], strict=True)
                    ]
                )
        if AGAINST in rounds:
            # This checkout's CPU per request over the other's, round by round (the two
            # served in the same round, so the machine's state weighs on both alike).
            levels[str(concurrency)]["cpu_change_vs_against"] = median(
                [
                    r["cpu_us_per_req"] / a["cpu_us_per_req"] - 1.0
                    for r, a in zip(rounds["runnerkit"], rounds[AGAINST], strict=True)
                    if a["cpu_us_per_req"]
                ]
            )
    return levels


def _servers(
    log_dir: Path,
    suffix: str,
    env: dict[str, str],
    *,
    extras: bool = False,
    tool: str = "wrk",
    against: str | None = None,
) -> dict[str, GunicornProcess]:
    """runnerkit and bare Flask; with ``extras``, also the runners of ``EXTRAS`` (the signed
    one only with wrk; the other checkout's only when ``against`` names one)."""
    state_dir = tempfile.mkdtemp(prefix="bench-http-state-")
    runner_env = {"RUNNERKIT_STATE_DIR": state_dir, **env}
    servers = {
        "runnerkit": server(RUNNER_APP, log_dir, name=f"runner{suffix}", env=runner_env),
        "flask": server(FLASK_APP, log_dir, name=f"flask{suffix}", env=dict(env)),
    }
    if extras:
        for name, (_, extra_env) in EXTRAS.items():
            if (name == SIGNED and tool != "wrk") or name == AGAINST:
                continue
            proc_env = {
                **env,
                "RUNNERKIT_STATE_DIR": tempfile.mkdtemp(prefix="bench-http-state-"),
                **extra_env,
            }
            label = f"runner-{name.split()[-1]}{suffix}"
            servers[name] = server(RUNNER_APP, log_dir, name=label, env=proc_env)
        if against:
            checkout = Path(against)
            servers[AGAINST] = CheckoutProcess(
                checkout,
                RUNNER_APP,
                log_dir=log_dir,
                workers=2,
                config=str(checkout / "deploy" / "gunicorn.conf.py"),
                env={
                    **CLEAN_ENV,
                    "RUNNERKIT_LOG_LEVEL": "INFO",
                    **env,
                    "PYTHONPATH": str(checkout),
                    "RUNNERKIT_STATE_DIR": tempfile.mkdtemp(prefix="bench-http-state-"),
                },
                name=f"runner-against{suffix}",
            )
    return servers


def run(cfg: Any, log_dir: Path) -> dict[str, Any]:
    """The default settings, then both contenders again with GUNICORN_PIN_WORKERS=1."""
    tool = load_tool()
    result: dict[str, Any] = {"load_tool": tool, "duration_s": cfg.http_duration, "levels": {}}
    against = getattr(cfg, "against", None)
    if against:
        result["against"] = against_checkout(against)
    contenders = _servers(log_dir, "", {}, extras=True, tool=tool, against=against)
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
        if name in contenders:
            _remove_state(contenders[name])
    say(f"what each step costs: each taken away alone, at {STEP_CONNECTIONS} connections")
    result["steps"] = step_prices(tool, log_dir, cfg)
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


def step_prices(tool: str, log_dir: Path, cfg: Any) -> dict[str, Any]:
    """Each promise's price in CPU µs per request: runnerkit with everything on against the
    same runner with that one step taken away, in the same rounds (contenders taking turns),
    and the signature check: the signed runner against the unsigned one, and each of its
    parts: the signed runner against the same without that part."""
    servers = {
        "runnerkit": server(
            RUNNER_APP,
            log_dir,
            name="runner-steps",
            env={"RUNNERKIT_STATE_DIR": tempfile.mkdtemp(prefix="bench-http-state-")},
        )
    }
    for label, step in STEPS.items():
        env = {
            "RUNNERKIT_STATE_DIR": tempfile.mkdtemp(prefix="bench-http-state-"),
            "BENCH_ECHO_WITHOUT": step,
        }
        servers[label] = server(RUNNER_APP, log_dir, name=f"runner-without-{step}", env=env)
    if tool == "wrk":
        env = {
            "RUNNERKIT_STATE_DIR": tempfile.mkdtemp(prefix="bench-http-state-"),
            "RUNNERKIT_SIGNING_SECRET": BENCH_SECRET,
        }
        servers[SIGNED] = server(RUNNER_APP, log_dir, name="runner-steps-signed", env=env)
        for label, step in SIGNED_STEPS.items():
            env = {
                "RUNNERKIT_STATE_DIR": tempfile.mkdtemp(prefix="bench-http-state-"),
                "RUNNERKIT_SIGNING_SECRET": BENCH_SECRET,
                "BENCH_ECHO_WITHOUT": step,
            }
            servers[label] = server(
                RUNNER_APP, log_dir, name=f"runner-signed-without-{step}", env=env
            )
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in servers}
    with running(*servers.values()):
        for proc in servers.values():
            measure(tool, proc, STEP_CONNECTIONS, cfg.warmup)
        for index in range(cfg.rounds):
            order = list(servers) if index % 2 == 0 else list(reversed(servers))
            for name in order:
                rounds[name].append(
                    measure(tool, servers[name], STEP_CONNECTIONS, cfg.http_duration)
                )
    for proc in servers.values():
        _remove_state(proc)
    base = [r["cpu_us_per_req"] for r in rounds["runnerkit"]]
    prices: dict[str, Any] = {}
    for label in STEPS:
        saved = [b - r["cpu_us_per_req"] for b, r in zip(base, rounds[label], strict=True)]
        prices[label] = {"us": median(saved), "range": [min(saved), max(saved)]}
    if SIGNED in rounds:
        extra = [r["cpu_us_per_req"] - b for b, r in zip(base, rounds[SIGNED], strict=True)]
        prices[SIGNATURE_STEP] = {"us": median(extra), "range": [min(extra), max(extra)]}
        signed = [r["cpu_us_per_req"] for r in rounds[SIGNED]]
        for label in SIGNED_STEPS:
            saved = [s - r["cpu_us_per_req"] for s, r in zip(signed, rounds[label], strict=True)]
            prices[label] = {"us": median(saved), "range": [min(saved), max(saved)]}
    return {
        "connections": STEP_CONNECTIONS,
        "runnerkit": summarize(rounds["runnerkit"]),
        "prices": prices,
        "rounds": rounds,
    }
