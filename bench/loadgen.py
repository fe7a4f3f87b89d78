"""Load generators that run in their own processes: ``python -m bench.loadgen MODE ...``.

``execute``: closed-loop load on ``POST /execute`` (the Python alternative to wrk): P processes
x T threads, one keep-alive ``http.client`` connection each, a fresh uuid4 jobId per request,
for a duration or a total count. Prints ``BENCH_JSON {...}`` with the same keys as
bench/wrk_execute.lua. On 2 cores this generator needs a large share of the CPU itself.

``forge``: jobs through the forge (``POST /jobs``), then waits for all of them to finish and
reads their JobResponses (``GET /jobs`` pages) to compute, per job, submit → ``startedAt`` →
``completedAt`` (from the forge's JobResult metadata; millisecond timestamps). Patterns:
``burst`` (N jobs as fast as T connections can submit), ``paced`` (open loop at a fixed rate
for a duration) and ``serial`` (one job at a time, the next submitted once the last finished).
A burst is submitted by wrk (bench/wrk_submit.lua) when it is installed, unless
``--tool python``: on 2 shared cores the Python submitter's own CPU would come out of the
forge's and the runners' share. The submit time of a wrk job is the ``metadata.createdAt``
wrk stamped it with (milliseconds).
``--url`` may name several forge instances that share one database (comma-separated): the
jobs are spread over them in turn (a burst by wrk: one wrk per instance, each with its share
of the connections and of the jobs), and they are read back through the first.
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bench.common import percentile

WRK_SUBMIT = str(Path(__file__).resolve().parent / "wrk_submit.lua")

FINAL = ("completed", "failed", "cancelled")
ACTIVE = "pending,queued,running,retrying"


def _connection(url: str, timeout: float = 30.0) -> http.client.HTTPConnection:
    parts = urlsplit(url)
    return http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=timeout)


def _call(
    conn: http.client.HTTPConnection, method: str, path: str, body: Any = None
) -> tuple[int, Any]:
    raw = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} if raw is not None else {}
    conn.request(method, path, body=raw, headers=headers)
    response = conn.getresponse()
    data = response.read()
    try:
        parsed = json.loads(data) if data else None
    except ValueError:
        parsed = None
    return response.status, parsed


# --------------------------------------------------------------------------- /execute


def execute_body() -> bytes:
    return (
        b'{"jobId":"' + str(uuid.uuid4()).encode() + b'","moduleId":"bench",'
        b'"capabilityId":"echo","payload":{"text":"hello"},"timeoutMs":5000}'
    )


def _submit_one(
    conn: http.client.HTTPConnection, url: str
) -> tuple[http.client.HTTPConnection, str, float, int]:
    """POST one fresh job; a broken connection is replaced (status 0 then)."""
    job_id = str(uuid.uuid4())
    at = time.time()
    try:
        status, _ = _call(conn, "POST", "/jobs", job_request(job_id))
    except (OSError, http.client.HTTPException):
        status = 0
        conn.close()
        conn = _connection(url)
    return conn, job_id, at, status


def _run_threads(target: Callable[[], None], threads: int) -> None:
    workers = [threading.Thread(target=target) for _ in range(threads)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()


def _execute_worker(
    url: str, threads: int, duration: float, count: int, start_at: float, out: Any
) -> None:
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    errors = [0]
    lock = threading.Lock()
    remaining = [count]

    def take() -> bool:
        if count <= 0:
            return time.monotonic() < stop_at
        with lock:
            if remaining[0] <= 0:
                return False
            remaining[0] -= 1
            return True

    def loop() -> None:
        conn = _connection(url)
        mine: list[float] = []
        while take():
            began = time.perf_counter()
            try:
                conn.request(
                    "POST",
                    "/execute",
                    body=execute_body(),
                    headers={"Content-Type": "application/json"},
                )
                response = conn.getresponse()
                response.read()
            except (OSError, http.client.HTTPException):
                with lock:
                    errors[0] += 1
                conn.close()
                conn = _connection(url)
                continue
            mine.append(time.perf_counter() - began)
            if response.status != 200:
                with lock:
                    key = str(response.status)
                    statuses[key] = statuses.get(key, 0) + 1
        conn.close()
        with lock:
            latencies.extend(mine)

    while time.monotonic() < start_at:
        time.sleep(0.001)
    began = time.monotonic()
    stop_at = began + duration
    workers = [threading.Thread(target=loop) for _ in range(threads)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    out.put(
        {
            "latencies": latencies,
            "statuses": statuses,
            "errors": errors[0],
            "elapsed": time.monotonic() - began,
        }
    )


def run_execute(args: argparse.Namespace) -> dict[str, Any]:
    processes = max(1, min(args.processes, args.concurrency))
    queue: Any = multiprocessing.get_context("fork").Queue()
    start_at = time.monotonic() + 0.2
    procs = []
    for index in range(processes):
        threads = args.concurrency // processes + (1 if index < args.concurrency % processes else 0)
        share = 0
        if args.count:
            share = args.count // processes + (1 if index < args.count % processes else 0)
        proc = multiprocessing.get_context("fork").Process(
            target=_execute_worker,
            args=(args.url, threads, args.duration, share, start_at, queue),
        )
        proc.start()
        procs.append(proc)
    parts = [queue.get(timeout=args.duration + 600) for _ in procs]
    for proc in procs:
        proc.join()
    latencies = sorted(v for p in parts for v in p["latencies"])
    statuses: dict[str, int] = {}
    for part in parts:
        for key, value in part["statuses"].items():
            statuses[key] = statuses.get(key, 0) + value
    elapsed = max(p["elapsed"] for p in parts)
    us = [v * 1e6 for v in latencies]
    return {
        "requests": len(latencies),
        "duration_us": int(elapsed * 1e6),
        "non200": statuses,
        "socket_errors": sum(p["errors"] for p in parts),
        "timeouts": 0,
        "p50_us": percentile(us, 50),
        "p90_us": percentile(us, 90),
        "p99_us": percentile(us, 99),
        "max_us": us[-1] if us else float("nan"),
        "mean_us": sum(us) / len(us) if us else float("nan"),
    }


# --------------------------------------------------------------------------- the forge


def job_request(job_id: str) -> dict[str, Any]:
    """A JobRequest for the echo capability (as runnerkit.cli.forge_client.job_request makes)."""
    return {
        "id": job_id,
        "type": "bench.echo",
        "priority": 50,
        "payload": {"type": "bench.echo", "version": "1.0.0", "data": {"text": "hello"}},
        "metadata": {"source": "bench", "createdAt": _now_z(), "correlationId": str(uuid.uuid4())},
        "timeoutMs": 5000,
    }


def _now_z() -> str:
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"


def _epoch(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def _submit_burst(
    urls: list[str], total: int, threads: int, accepted: dict[str, int]
) -> tuple[dict[str, float], int]:
    submitted: dict[str, float] = {}
    failures = [0]
    lock = threading.Lock()
    remaining = [total]
    started = [0]

    def loop() -> None:
        with lock:  # thread i submits to instance i mod n
            url = urls[started[0] % len(urls)]
            started[0] += 1
        conn = _connection(url)
        while True:
            with lock:
                if remaining[0] <= 0:
                    break
                remaining[0] -= 1
            conn, job_id, at, status = _submit_one(conn, url)
            with lock:
                if status == 202:
                    submitted[job_id] = at
                    accepted[url] += 1
                else:
                    failures[0] += 1
        conn.close()

    _run_threads(loop, threads)
    return submitted, failures[0]


def _submit_burst_wrk(
    urls: list[str], total: int, connections: int, accepted: dict[str, int]
) -> tuple[tuple[str, ...], int]:
    """Submit ``total`` jobs (or a few more) with one wrk per instance, all at once;
    (the run's job id prefixes, failures)."""
    runs: list[tuple[str, subprocess.Popen[str], int]] = []
    for index, url in enumerate(urls):
        nonce = random.getrandbits(32)
        mine = connections // len(urls) + (1 if index < connections % len(urls) else 0)
        jobs = total // len(urls) + (1 if index < total % len(urls) else 0)
        threads = 2 if mine > 1 else 1
        share = max(1, -(-jobs // threads))
        argv = ["wrk", f"-t{threads}", f"-c{max(1, mine)}", "-d600s", "--timeout", "30s"]
        argv += ["-s", WRK_SUBMIT, url, "--", str(nonce), str(share)]
        wrk = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        runs.append((f"{nonce:08x}", wrk, threads))
    results: list[dict[str, Any] | None] = [None] * len(runs)

    def follow(index: int) -> None:
        _, wrk, threads = runs[index]
        assert wrk.stdout is not None
        finished = 0
        for line in wrk.stdout:
            if line.startswith("BENCH_THREAD_DONE"):
                finished += 1
                if finished == threads:  # wrk would otherwise wait out its -d
                    wrk.send_signal(signal.SIGINT)
            elif line.startswith("BENCH_JSON "):
                results[index] = json.loads(line[len("BENCH_JSON ") :])
        wrk.wait(timeout=30)

    followers = [threading.Thread(target=follow, args=(i,)) for i in range(len(runs))]
    for thread in followers:
        thread.start()
    for thread in followers:
        thread.join()
    failures = 0
    for url, (_, wrk, _), result in zip(urls, runs, results, strict=True):
        if result is None:
            raise RuntimeError(
                f"wrk exited {wrk.returncode}: {wrk.stderr.read()[-1000:] if wrk.stderr else ''}"
            )
        failures += sum(result["non202"].values()) + result["socket_errors"]
        accepted[url] += result["requests"] - sum(result["non202"].values())
    return tuple(prefix for prefix, _, _ in runs), failures


def _submit_paced(
    urls: list[str], rate: float, duration: float, threads: int, accepted: dict[str, int]
) -> tuple[dict[str, float], int, int]:
    """Open loop: job i is due at start + i/rate, to instance i mod n; a thread sends the
    next due job."""
    submitted: dict[str, float] = {}
    failures = [0]
    late = [0]
    lock = threading.Lock()
    total = max(1, int(rate * duration))
    next_index = [0]
    start = time.time() + 0.05

    def loop() -> None:
        conns = {url: _connection(url) for url in urls}
        while True:
            with lock:
                index = next_index[0]
                if index >= total:
                    break
                next_index[0] += 1
            due = start + index / rate
            wait = due - time.time()
            if wait > 0:
                time.sleep(wait)
            elif wait < -0.005:
                with lock:
                    late[0] += 1
            url = urls[index % len(urls)]
            conns[url], job_id, at, status = _submit_one(conns[url], url)
            with lock:
                if status == 202:
                    submitted[job_id] = at
                    accepted[url] += 1
                else:
                    failures[0] += 1
        for conn in conns.values():
            conn.close()

    _run_threads(loop, threads)
    return submitted, failures[0], late[0]


def _submit_serial(
    urls: list[str], total: int, poll_s: float, accepted: dict[str, int]
) -> tuple[dict[str, float], int]:
    """One job at a time, each submitted on a new connection (so on any forge worker), job i
    to instance i mod n."""
    submitted: dict[str, float] = {}
    failures = 0
    poller = _connection(urls[0])
    for index in range(total):
        job_id = str(uuid.uuid4())
        url = urls[index % len(urls)]
        conn = _connection(url)
        at = time.time()
        try:
            status, _ = _call(conn, "POST", "/jobs", job_request(job_id))
        finally:
            conn.close()
        if status != 202:
            failures += 1
            continue
        submitted[job_id] = at
        accepted[url] += 1
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            _, job = _call(poller, "GET", f"/jobs/{job_id}")
            if isinstance(job, dict) and job.get("status") in FINAL:
                break
            time.sleep(poll_s)
    poller.close()
    return submitted, failures


def _wait_idle(url: str, timeout: float) -> bool:
    conn = _connection(url)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            _, page = _call(conn, "GET", f"/jobs?status={ACTIVE}&limit=1")
            total = page.get("total") if isinstance(page, dict) else None
            if total == 0:
                return True
            # Each look counts the active jobs (the forge's and its database's CPU, charged
            # to the jobs): look less often while many remain, every 50 ms near the end.
            time.sleep(min(1.0, max(0.05, (total if isinstance(total, int) else 0) / 2000.0)))
        return False
    finally:
        conn.close()


def _collect(url: str, ids: set[str]) -> dict[str, dict[str, Any]]:
    """The JobResponses of ``ids`` (the newest jobs), read page by page, newest first."""
    found: dict[str, dict[str, Any]] = {}
    conn = _connection(url)
    offset = 0
    try:
        while len(found) < len(ids):
            _, page = _call(conn, "GET", f"/jobs?limit=500&offset={offset}")
            items = page.get("items", []) if isinstance(page, dict) else []
            if not items:
                break
            for job in items:
                if job["id"] in ids:
                    found[job["id"]] = job
            offset += len(items)
    finally:
        conn.close()
    return found


def _collect_prefix(url: str, prefix: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """The JobResponses whose id starts with one of ``prefix`` (one run's jobs: the newest
    ones)."""
    found: dict[str, dict[str, Any]] = {}
    conn = _connection(url)
    offset = 0
    try:
        while True:
            _, page = _call(conn, "GET", f"/jobs?limit=500&offset={offset}")
            items = page.get("items", []) if isinstance(page, dict) else []
            mine = [job for job in items if job["id"].startswith(prefix)]
            for job in mine:
                found[job["id"]] = job
            if not items or (found and not mine):
                return found
            offset += len(items)
    finally:
        conn.close()


def use_wrk(tool: str) -> bool:
    return tool == "wrk" or (tool == "auto" and shutil.which("wrk") is not None)


def run_forge(args: argparse.Namespace) -> dict[str, Any]:
    began = time.time()
    late = 0
    prefix: tuple[str, ...] = ()
    tool = "python"
    urls = [url.strip() for url in args.url.split(",") if url.strip()]
    accepted = dict.fromkeys(urls, 0)  # jobs each instance took (202)
    if args.pattern == "burst" and use_wrk(args.tool):
        tool = "wrk"
        prefix, failures = _submit_burst_wrk(urls, args.count, args.threads, accepted)
        submitted: dict[str, float] = {}
    elif args.pattern == "burst":
        submitted, failures = _submit_burst(urls, args.count, args.threads, accepted)
    elif args.pattern == "paced":
        submitted, failures, late = _submit_paced(
            urls, args.rate, args.duration, args.threads, accepted
        )
    else:
        submitted, failures = _submit_serial(urls, args.count, args.poll_ms / 1000.0, accepted)
    submit_s = time.time() - began
    idle = _wait_idle(urls[0], args.wait)
    # Tells the caller to read CPU counters now: reading the results back costs the forge too.
    print("BENCH_MARK finished", flush=True)
    deadline = time.monotonic() + args.wait
    while True:
        if prefix:
            jobs = _collect_prefix(urls[0], prefix)
            submitted = {
                job_id: _epoch(job["request"]["metadata"]["createdAt"])
                for job_id, job in jobs.items()
            }
        else:
            jobs = _collect(urls[0], set(submitted))
        # A submission wrk gave up on at its end may reach the forge after the idle check:
        # a job found still active is waited for (until --wait), not counted as lost.
        active = [job for job in jobs.values() if job["status"] in ACTIVE.split(",")]
        if not active or time.monotonic() >= deadline:
            break
        _wait_idle(urls[0], max(0.0, deadline - time.monotonic()))
    latencies: list[float] = []
    queue_waits: list[float] = []
    runs: list[float] = []
    statuses: dict[str, int] = {}
    attempts_over_1 = 0
    last_done = began
    for job_id, at in submitted.items():
        job = jobs.get(job_id)
        status = job["status"] if job else "missing"
        statuses[status] = statuses.get(status, 0) + 1
        meta = ((job or {}).get("result") or {}).get("metadata") or {}
        if status != "completed" or "completedAt" not in meta:
            continue
        done = _epoch(meta["completedAt"])
        last_done = max(last_done, done)
        latencies.append((done - at) * 1000.0)
        if meta.get("startedAt"):
            started = _epoch(meta["startedAt"])
            queue_waits.append((started - at) * 1000.0)
            runs.append((done - started) * 1000.0)
        if int(meta.get("attempts", 1)) > 1:
            attempts_over_1 += 1
    completed = len(latencies)
    span = max(1e-9, last_done - min(submitted.values(), default=began))
    return {
        "pattern": args.pattern,
        "submitter": tool,
        "accepted_by_instance": list(accepted.values()),
        "submitted": len(submitted),
        "submit_failures": failures,
        "submit_s": submit_s,
        "submit_rate": len(submitted) / submit_s if submit_s else 0.0,
        "late_submits": late,
        "all_finished": idle,
        "statuses": statuses,
        "completed": completed,
        "retried": attempts_over_1,
        "span_s": span,
        "jobs_per_s": completed / span,
        "p50_ms": percentile(latencies, 50),
        "p90_ms": percentile(latencies, 90),
        "p99_ms": percentile(latencies, 99),
        "queue_p50_ms": percentile(queue_waits, 50),
        "queue_p90_ms": percentile(queue_waits, 90),
        "queue_p99_ms": percentile(queue_waits, 99),
        "queued_over_50ms": (
            sum(1 for q in queue_waits if q >= 50.0) / len(queue_waits) if queue_waits else 0.0
        ),
        "run_p50_ms": percentile(runs, 50),
        "run_p99_ms": percentile(runs, 99),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen")
    sub = parser.add_subparsers(dest="mode", required=True)
    ex = sub.add_parser("execute", help="closed-loop POST /execute")
    ex.add_argument("--url", required=True)
    ex.add_argument("--concurrency", type=int, default=16)
    ex.add_argument("--duration", type=float, default=5.0)
    ex.add_argument("--count", type=int, default=0, help="total requests (instead of duration)")
    ex.add_argument("--processes", type=int, default=2)
    fg = sub.add_parser("forge", help="jobs through the forge")
    fg.add_argument("--url", required=True, help="the forge; several: comma-separated")
    fg.add_argument("--pattern", choices=["burst", "paced", "serial"], default="burst")
    fg.add_argument("--count", type=int, default=1000)
    fg.add_argument("--threads", type=int, default=8, help="connections (burst, paced)")
    fg.add_argument(
        "--tool", choices=["auto", "wrk", "python"], default="auto", help="burst submitter"
    )
    fg.add_argument("--rate", type=float, default=100.0)
    fg.add_argument("--duration", type=float, default=5.0)
    fg.add_argument("--poll-ms", type=float, default=5.0)
    fg.add_argument("--wait", type=float, default=120.0, help="seconds to wait for completion")
    args = parser.parse_args(argv)
    if args.mode == "execute":
        if args.count:
            args.duration = 0.0
        result = run_execute(args)
    else:
        result = run_forge(args)
    print("BENCH_JSON " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
