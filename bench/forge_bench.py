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

Two more stacks keep the forge's store on PostgreSQL (``bench.postgres``: a database of their
own on the local server), with one runner: "PostgreSQL, 1 forge" (one forge instance) and
"PostgreSQL, 2 forges" (two ``runnerkit.forge:app`` masters on different ports sharing the
database; the runner gets both URLs in ``RUNNERKIT_JOBFORGE_URL`` and the load generator
spreads the submissions over both). They take their turns with the others; their CPU per job
adds the PostgreSQL server's. When the server does not answer, they are not measured and say
why. Every stack's runner logs each ``POST /execute`` it receives (runnerkit's per-job log
line), from which the part counts jobs dispatched more than once.
"""

from __future__ import annotations

import contextlib
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
from bench.postgres import BenchPostgres, CpuSnapshot
from runnerkit.forge import serving

#: The PostgreSQL stacks: name → forge instances sharing the database.
PG_STACKS = {"PostgreSQL, 1 forge": 1, "PostgreSQL, 2 forges": 2}
#: The SQLite stack the PostgreSQL ones are compared with (same runner count).
SQLITE_BASELINE = "1 runner"


@dataclass
class Stack:
    name: str
    forges: list[GunicornProcess]
    runners: list[GunicornProcess]
    state_dirs: list[str] = field(default_factory=list)
    root: Path | None = None
    #: With the store on PostgreSQL: the server, and the stack's database on it.
    postgres: BenchPostgres | None = None
    database: str = ""

    @property
    def forge(self) -> GunicornProcess:
        """The first forge instance: where results are read back and the profile is taken."""
        return self.forges[0]

    @property
    def urls(self) -> str:
        """Every forge instance's URL, comma-separated (as ``RUNNERKIT_JOBFORGE_URL``)."""
        return ",".join(forge.url for forge in self.forges)

    def describe(self) -> dict[str, Any]:
        return {
            "store": "PostgreSQL" if self.postgres is not None else "SQLite",
            "forges": len(self.forges),
            "runners": len(self.runners),
        }

    def forge_cpu(self) -> float:
        return sum(cpu_seconds(forge) for forge in self.forges)

    def server_cpu(self) -> CpuSnapshot | None:
        if self.postgres is None:
            return None
        return self.postgres.cpu(self.database)

    def start(self, timeout: float = 60.0) -> None:
        for forge in self.forges:
            forge.start()
        for forge in self.forges:
            forge.wait_ready(path="/health", timeout=timeout)
            # The dispatching worker leaves new connections to its siblings.
            forge.wait_workers_serving(timeout=timeout, path="/health", leaving_out=1)
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
        for forge in self.forges:
            forge.stop()
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
    *,
    forges: int = 1,
    database_url: str = "",
) -> Stack:
    """A stack (not started): ``forges`` forge instances on one store (a SQLite file, or the
    PostgreSQL database at ``database_url``) and ``runners`` runner instances."""
    root = Path(tempfile.mkdtemp(prefix="bench-forge-"))
    slug = name.replace(" ", "-").replace(",", "")
    instances = []
    for index in range(forges):
        # Each instance has a DB_PATH of its own even on PostgreSQL: it names the local
        # wake-up socket and metrics files, which two instances on one host must not share.
        env = {"RUNNERKIT_FORGE_DB_PATH": str(root / f"forge-{index}.sqlite3")}
        if database_url:
            env["RUNNERKIT_FORGE_DB_URL"] = database_url
        instances.append(
            server(
                "runnerkit.forge:app",
                log_dir,
                name=f"forge-{slug}" + (f"-{index}" if forges > 1 else ""),
                config=None,
                workers=forge_workers,
                env=env,
                extra_args=list(serving.OPTIONS),
            )
        )
    forge_urls = ",".join(forge.url for forge in instances)
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
                    "RUNNERKIT_JOBFORGE_URL": forge_urls,
                    "RUNNERKIT_STATE_DIR": state_dir,
                    "BENCH_ECHO_MAX_CONCURRENCY": str(max_concurrency),
                },
            )
        )
    return Stack(name, instances, procs, dirs, root)


def load(stack: Stack, pattern: str, **options: Any) -> dict[str, Any]:
    """One load run in its own process; adds the CPU each party used per completed job.

    CPU is read when the load generator says every job has finished, before it reads the
    jobs back (which costs the forge too). On PostgreSQL the server's share is one more party
    (``bench.postgres``: the stack's backends and the server's background processes); the
    whole server's, whatever else it served meanwhile, is kept beside it.
    """
    argv = [sys.executable, "-m", "bench.loadgen", "forge", "--url", stack.urls]
    argv += ["--pattern", pattern]
    for key, value in options.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    server_cpu = stack.server_cpu()
    forge_cpu = stack.forge_cpu()
    runner_cpu = sum(cpu_seconds(r) for r in stack.runners)
    used: dict[str, float] = {}
    whole_server = float("nan")
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
                    "forge": stack.forge_cpu() - forge_cpu,
                    "runners": sum(cpu_seconds(r) for r in stack.runners) - runner_cpu,
                    # wrk, when it submitted the burst, is a child the generator waited for.
                    "load generator": times.user
                    + times.system
                    + times.children_user
                    + times.children_system,
                }
                now = stack.server_cpu()
                if server_cpu is not None and now is not None:
                    used["PostgreSQL server"], whole_server = now.since(server_cpu)
            elif line.startswith("BENCH_JSON "):
                result = json.loads(line[len("BENCH_JSON ") :])
        proc.wait(timeout=600)
        if result is None:
            errors.seek(0)
            raise RuntimeError(f"bench.loadgen exited {proc.returncode}: {errors.read()[-2000:]}")
    jobs = max(1, result["completed"])
    result["cpu_ms_per_job"] = {party: cpu / jobs * 1000.0 for party, cpu in used.items()}
    if stack.postgres is not None:
        result["pg_whole_server_ms_per_job"] = whole_server / jobs * 1000.0
    return result


#: Cost buckets of the forge profile, first match wins.
FORGE_BUCKETS: list[tuple[str, tuple[str, ...]]] = [
    (
        "POST /jobs: submit transaction (group commit: job, 2 events, assertion)",
        ("JobSubmission.submit",),
    ),
    ("POST /jobs: body parse + JobRequest marshmallow load", ("_body (runnerkit/forge/api.py",)),
    ("dispatcher: claims (update, event, assertion per job)", ("JobClaims.claim",)),
    ("dispatcher: answers recorded (update, event, 2 assertions per job)", ("JobResults.finish",)),
    ("dispatcher: housekeeping sweep", ("JobSweep.sweep",)),
    ("dispatcher: HTTP to the runner (http.client)", ("Sending.execute",)),
    (
        "dispatcher: matching queries, tick transaction, heartbeat",
        ("Dispatcher.", "InFlight.", "Matching."),
    ),
    ("benchmark's polling (GET /jobs?status=... count)", ("JobReads.list",)),
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
    if all("accepted_by_instance" in r for r in rounds):
        summary["accepted_by_instance"] = [
            sum(taken) for taken in zip(*(r["accepted_by_instance"] for r in rounds), strict=True)
        ]
    if "pg_whole_server_ms_per_job" in rounds[0]:
        summary["pg_whole_server_ms_per_job"] = median(
            [r["pg_whole_server_ms_per_job"] for r in rounds]
        )
    return summary


def interleaved(stacks: list[Stack], rounds: int, run: Any) -> dict[str, list[dict[str, Any]]]:
    results: dict[str, list[dict[str, Any]]] = {s.name: [] for s in stacks}
    for index in range(rounds):
        order = stacks if index % 2 == 0 else list(reversed(stacks))
        for stack in order:
            results[stack.name].append(run(stack))
    return results


#: Runner answers that refuse a job without running it (no free slot, draining): the forge
#: sends it again later, which is a retry, not a second dispatch.
REFUSED = (429, 503)


def dispatch_counts(logs: list[Path]) -> dict[str, Any]:
    """Jobs the runners of one stack received more than once, from runnerkit's per-job log
    line (one per ``POST /execute``: run, replayed from the ledger, or refused as running).

    A job refused for capacity (429, 503) and sent again is not counted: the forge retries it.
    """
    seen: dict[str, int] = {}
    refused = 0
    for path in logs:
        with contextlib.suppress(FileNotFoundError), path.open(errors="replace") as lines:
            for line in lines:
                if '"runnerkit.job"' not in line:
                    continue
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                job_id = entry.get("jobId")
                if not job_id:
                    continue
                if entry.get("status") in REFUSED:
                    refused += 1
                    continue
                seen[job_id] = seen.get(job_id, 0) + 1
    twice = sorted(job_id for job_id, count in seen.items() if count > 1)
    return {
        "jobs": len(seen),
        "executions": sum(seen.values()),
        "dispatched_twice": len(twice),
        "refused": refused,
        "examples": twice[:5],
    }


def per_round_ratio(
    rounds: dict[str, list[dict[str, Any]]], numerator: str, denominator: str
) -> float:
    """The median over rounds of one stack's burst jobs/s over another's in the same round."""
    if numerator not in rounds or denominator not in rounds:
        return float("nan")
    return median(
        [
            b["jobs_per_s"] / a["jobs_per_s"]
            for a, b in zip(rounds[denominator], rounds[numerator], strict=True)
            if a["jobs_per_s"]
        ]
    )


def postgres_stacks(postgres: BenchPostgres, log_dir: Path, notes: dict[str, Any]) -> list[Stack]:
    """The PostgreSQL stacks, started, each on a fresh database; those that cannot start are
    recorded in ``notes["not_measured"]`` with the reason, and the part goes on without them."""
    reason = postgres.unreachable()
    if reason is not None:
        notes["not_measured"] = dict.fromkeys(PG_STACKS, reason)
        return []
    started = []
    for name, forges in PG_STACKS.items():
        stack: Stack | None = None
        try:
            database, url = postgres.create_database(f"{forges}forge")
            stack = make_stack(name, 1, log_dir, forges=forges, database_url=url)
            stack.postgres, stack.database = postgres, database
            stack.start()
        except Exception as exc:  # noqa: BLE001 - the other stacks are still measured
            notes.setdefault("not_measured", {})[name] = f"{type(exc).__name__}: {exc}"[:500]
            say(f"{name} not measured: {exc}")
            if stack is not None:
                stack.stop()
            continue
        started.append(stack)
    return started


def run(cfg: Any, log_dir: Path) -> dict[str, Any]:
    one = make_stack("1 runner", 1, log_dir)
    two = make_stack("2 runners", 2, log_dir)
    solo = make_stack("1 runner, 1 forge worker", 1, log_dir, forge_workers=1)
    stacks = [one, two, solo]
    postgres = BenchPostgres()
    notes: dict[str, Any] = {"stacks": list(PG_STACKS), "baseline": SQLITE_BASELINE}
    result: dict[str, Any] = {
        "burst": {},
        "paced": {},
        "serial": {},
        "forge_workers": serving.WORKERS,
        "postgres": notes,
    }
    try:
        for stack in stacks:
            stack.start()
        stacks += postgres_stacks(postgres, log_dir, notes)
        result["stacks"] = {stack.name: stack.describe() for stack in stacks}
        for stack in stacks:
            load(stack, "burst", count=cfg.forge_warmup, threads=8)
            if stack.postgres is not None:  # steady state: the statistics autovacuum keeps
                stack.postgres.analyze(stack.database)
        say(f"forge burst: {cfg.forge_jobs} jobs x {cfg.forge_rounds} rounds per stack")
        bursts = interleaved(
            stacks, cfg.forge_rounds, lambda s: load(s, "burst", count=cfg.forge_jobs, threads=8)
        )
        peaks = {}
        for name, rounds in bursts.items():
            result["burst"][name] = {"rounds": rounds, **summarize(rounds)}
            peaks[name] = result["burst"][name]["jobs_per_s"]
        result["ratio_2_to_1"] = per_round_ratio(bursts, two.name, one.name)
        pg_one, pg_two = list(PG_STACKS)
        notes["ratio_pg1_to_sqlite"] = per_round_ratio(bursts, pg_one, SQLITE_BASELINE)
        notes["ratio_pg2_to_pg1"] = per_round_ratio(bursts, pg_two, pg_one)
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
        for stack in stacks:
            stack.stop()
        postgres.drop_all()
    # Read once every runner has stopped: every POST /execute of the part is in the logs.
    result["dispatch"] = {
        stack.name: dispatch_counts([runner.log_path for runner in stack.runners])
        for stack in stacks
    }
    return result
