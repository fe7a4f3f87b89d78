"""Part 1b: what each step of the ``/execute`` path costs, measured by taking it away.

In one process, calling each app as WSGI (no gunicorn, no sockets, one thread), N requests
go through the runner's ``/execute`` with everything on ("baseline"), then with one step
replaced by a no-op, for each step; and through the bare Flask echo (``bench.apps.flask_app``)
as the floor. Every variant run follows its own baseline run; the saving of a step is the
median over rounds of ``baseline - variant`` within those pairs, in CPU microseconds per
request (all threads of the process; wall time is kept too).

The no-op stand-ins exist only in this benchmark process (runnerkit is not changed); they
size costs, they are not proposals to drop the step (see the report's suggestions).

Run: ``python -m bench.inprocess --requests 2000 --rounds 5`` → ``BENCH_JSON {...}``.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import uuid
from typing import Any

# Before the runner app exists: its state (and metrics) directory, as under gunicorn.
_STATE = tempfile.mkdtemp(prefix="bench-inprocess-")
os.environ["RUNNERKIT_STATE_DIR"] = _STATE
os.environ.pop("RUNNERKIT_JOBFORGE_URL", None)
os.environ.pop("JOBFORGE_URL", None)
os.environ["RUNNERKIT_WORKER_THREADS"] = "8"

from bench import ablations  # noqa: E402
from bench.apps import flask_app, runner_app  # noqa: E402

RUNNER = runner_app.runner


def _body() -> bytes:
    return (
        b'{"jobId":"' + str(uuid.uuid4()).encode() + b'","moduleId":"bench",'
        b'"capabilityId":"echo","payload":{"text":"hello"},"timeoutMs":5000}'
    )


VARIANTS = ablations.variants(RUNNER)


def _environ(body: bytes) -> dict[str, Any]:
    """What a WSGI server hands the app for ``POST /execute`` (built before the clock runs)."""
    return {
        "REQUEST_METHOD": "POST",
        "SCRIPT_NAME": "",
        "PATH_INFO": "/execute",
        "QUERY_STRING": "",
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "8000",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "CONTENT_TYPE": "application/json",
        "CONTENT_LENGTH": str(len(body)),
        "HTTP_HOST": "127.0.0.1:8000",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(body),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
    }


def timed(app: Any, requests: int) -> tuple[float, float]:
    """(CPU, wall) microseconds per request over ``requests`` POST /execute.

    The app is called as a WSGI server would call it, so the figures hold the app's own
    work and no test-client machinery. CPU is the whole process's (every thread, the job
    threads included): what the steps cost, hardly moved by other load on the machine. Wall
    adds the waits for the scheduler.
    """
    environs = [_environ(_body()) for _ in range(requests)]
    statuses: list[str] = []

    def start_response(status: str, headers: Any, exc_info: Any = None) -> Any:
        statuses.append(status)
        return None

    cpu, wall = time.process_time(), time.perf_counter()
    for environ in environs:
        chunks = app(environ, start_response)
        body = b"".join(chunks)
        if not statuses[-1].startswith("200"):
            raise RuntimeError(f"/execute answered {statuses[-1]}: {body[:300]!r}")
    return (
        (time.process_time() - cpu) / requests * 1e6,
        (time.perf_counter() - wall) / requests * 1e6,
    )


def label_probe(client: Any, requests: int = 200) -> dict[str, int]:
    """Bytes of ``GET /metrics`` before and after ``requests`` jobs for unknown capabilities.

    The capabilityId of a request becomes a metric label before it is checked against the
    registered capabilities, so every distinct unknown id adds series.
    """
    before = len(client.get("/metrics").data)
    for _ in range(requests):
        body = {
            "jobId": str(uuid.uuid4()),
            "moduleId": "bench",
            "capabilityId": f"no-such-capability-{uuid.uuid4()}",
            "payload": {},
        }
        client.post("/execute", json=body)
    return {"requests": requests, "before": before, "after": len(client.get("/metrics").data)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.inprocess")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--variants", default="", help="comma list of variants to measure (default: all)"
    )
    parser.add_argument(
        "--pin-cpu",
        action="store_true",
        help="run the whole process (every thread it starts) on one CPU",
    )
    args = parser.parse_args(argv)
    if args.pin_cpu:
        # Before any thread exists: threads inherit the mask of the thread that starts them.
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    # The job log goes to /dev/null: written, as under gunicorn, but not to the terminal.
    for handler in logging.getLogger("runnerkit").handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(open(os.devnull, "w"))  # noqa: SIM115
    runner_client = runner_app.app.test_client()
    runner_wsgi, flask_wsgi = runner_app.app, flask_app.app
    names = [name for name in VARIANTS if name != "baseline"] + ["bare Flask echo"]
    if args.variants:
        names = [name for name in names if name in args.variants.split(",")]
    timed(runner_wsgi, 300)
    timed(flask_wsgi, 300)
    # Each variant runs right after a baseline run (pairs, the variants' order rotating per
    # round): a saving is the median over rounds of (baseline - variant) within a pair, which
    # drift on a shared machine hardly touches.
    cpu: dict[str, list[float]] = {name: [] for name in ["baseline", *names]}
    wall: dict[str, list[float]] = {name: [] for name in ["baseline", *names]}
    pairs: dict[str, list[float]] = {name: [] for name in names}
    wall_pairs: dict[str, list[float]] = {name: [] for name in names}
    others = [name for name in names if name != "baseline"]
    for index in range(args.rounds):
        order = others[index % len(others) :] + others[: index % len(others)]
        for name in order:
            base_cpu, base_wall = timed(runner_wsgi, args.requests)
            if name == "bare Flask echo":
                used, took = timed(flask_wsgi, args.requests)
            else:
                with VARIANTS[name]():
                    used, took = timed(runner_wsgi, args.requests)
            cpu["baseline"].append(base_cpu)
            wall["baseline"].append(base_wall)
            cpu[name].append(used)
            wall[name].append(took)
            pairs[name].append(base_cpu - used)
            wall_pairs[name].append(base_wall - took)
    from bench.common import median

    result = {
        "requests_per_round": args.requests,
        "rounds": args.rounds,
        "us_per_request": {name: median(values) for name, values in cpu.items() if values},
        "wall_us_per_request": {name: median(values) for name, values in wall.items() if values},
        "samples": cpu,
        "wall_samples": wall,
        "saving_us": {name: median(values) for name, values in pairs.items() if values},
        "saving_range_us": {
            name: [min(values), max(values)] for name, values in pairs.items() if values
        },
        "wall_saving_us": {name: median(values) for name, values in wall_pairs.items() if values},
    }
    result["pinned"] = bool(args.pin_cpu)
    result["metrics_label_probe"] = label_probe(runner_client)
    shutil.rmtree(_STATE, ignore_errors=True)
    print("BENCH_JSON " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
