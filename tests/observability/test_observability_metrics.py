"""Prometheus metrics summed across gunicorn workers: the runner's and the forge's ``/metrics``.

One stack for the module: a forge (2 gthread workers; its dispatcher runs in one of them) and
the example runner ``app:app`` with 3 workers, registered with the forge. Jobs go to the
runner directly, each over its own connection, spread over several workers; then through the
forge. Every worker's scrape must show the same totals, equal to what was sent, once each
worker has published its values (a worker writes them out once a second, so another's scrape
may lag by that much). Counters are compared as differences, so the tests do not depend on
each other's order.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
import pytest
import requests

from tests.forge.helpers import job_request
from tests.instance.instance_support import job_request as instance_job
from tests.instance.instance_support import pin_connections, pin_to
from tests.security.stack import (
    QUICK,
    Stack,
    get_from_each_worker,
    samples,
    value,
)
from tests.support import GunicornProcess
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

Scrape = dict[Any, float]


class Plane:
    stacks: list[Stack]

    def __init__(self, stack: Stack, forge: GunicornProcess, runner: GunicornProcess) -> None:
        self.stacks = [stack]
        self.forge = forge
        self.runner = runner


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Plane]:
    stack = Stack(tmp_path_factory.mktemp("metrics"))
    try:
        forge = stack.forge(Path(stack.base_dir) / "forge.sqlite3", workers=2, all_workers=True)
        runner = stack.runner(
            workers=3,
            jobforge_url=forge.url,
            env={"RUNNERKIT_HEARTBEAT_INTERVAL_MS": "1000"},
            all_workers=True,
        )
        wait_until(
            lambda: requests.get(runner.url + "/health/ready", timeout=QUICK).status_code == 200,
            20,
            "the runner to register with the forge",
        )
        yield Plane(stack, forge, runner)
    finally:
        stack.stop()


def scrape_every_worker(proc: GunicornProcess) -> list[Scrape]:
    """One parsed ``/metrics`` from each worker of ``proc``."""
    return [samples(text) for text in get_from_each_worker(proc, "/metrics").values()]


Wanted = tuple[str, dict[str, str]]


def settled(proc: GunicornProcess, *wanted: Wanted, timeout: float = 10.0) -> list[Scrape]:
    """Every worker's scrape, once they all agree on the ``wanted`` samples.

    Each worker publishes its values once a second: a scrape sees another worker's counts
    of the last second only after that. Agreement alone is not enough: when every worker
    still holds back its last second's counts, each one's scrape (its own live counts plus
    the others' files) can come to the same stale sum. So the workers must agree on the same
    values for longer than a publication interval.
    """
    first: tuple[tuple[float, ...], float] | None = None

    def agreed() -> list[Scrape] | None:
        nonlocal first
        scrapes = scrape_every_worker(proc)
        same = all(len({value(s, name, **labels) for s in scrapes}) == 1 for name, labels in wanted)
        if not same:
            first = None
            return None
        reading = tuple(value(scrapes[0], name, **labels) for name, labels in wanted)
        now = time.monotonic()
        if first is None or first[0] != reading:
            first = (reading, now)
            return None
        return scrapes if now - first[1] >= 1.5 else None

    found = wait_until(agreed, timeout, f"workers never agreed on {wanted}", interval=0.2)
    assert found is not None
    return found


def same_everywhere(scrapes: list[Scrape], name: str, **labels: str) -> float:
    """The sample's value, which every worker must report alike."""
    values = {value(s, name, **labels) for s in scrapes}
    assert len(values) == 1, f"workers disagree on {name}{labels}: {values}"
    return values.pop()


def execute_on_own_connection(runner: GunicornProcess, text: str) -> tuple[int, int]:
    """POST one job on a new connection; (HTTP status, pid of the worker that answered)."""
    body = json.dumps(
        {
            "jobId": str(uuid.uuid4()),
            "moduleId": "example",
            "capabilityId": "text-stats",
            "payload": {"text": text},
        }
    )
    conn = http.client.HTTPConnection(runner.host, runner.port, timeout=10)
    try:
        conn.connect()
        assert conn.sock is not None
        client_port = conn.sock.getsockname()[1]
        conn.request("POST", "/execute", body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        pid = runner.worker_for_client_port(client_port) or 0
        return response.status, pid
    finally:
        conn.close()


JOB = {"capability": "text-stats"}
RECEIVED = {"capability": "text-stats", "priority": "unknown"}
COMPLETED = {"capability": "text-stats", "status": "success"}
EXECUTE_200 = {"method": "POST", "path": "/execute", "status": "200"}
RUNNER_TOTALS: list[Wanted] = [
    ("jobs_received_total", RECEIVED),
    ("jobs_completed_total", COMPLETED),
    ("job_duration_seconds_count", JOB),
    ("http_requests_total", EXECUTE_200),
    ("active_jobs", JOB),
]


def test_runner_metrics_are_summed_across_three_workers(plane: Plane) -> None:
    runner = plane.runner
    before = settled(runner, *RUNNER_TOTALS)
    jobs = 30
    barrier = threading.Barrier(6)

    def send(index: int) -> tuple[int, int]:
        if index < 6:
            barrier.wait(5)  # a first burst at once, so more than one worker is busy
        return execute_on_own_connection(runner, f"job number {index}")

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(send, range(jobs)))
    assert [status for status, _ in results] == [200] * jobs
    workers = {pid for _, pid in results if pid}
    assert len(workers) >= 2, f"all {jobs} jobs went to one worker: {results}"

    after = settled(runner, *RUNNER_TOTALS)
    assert len(after) == 3

    def delta(name: str, **labels: str) -> float:
        return same_everywhere(after, name, **labels) - same_everywhere(before, name, **labels)

    assert delta("jobs_received_total", **RECEIVED) == jobs
    assert delta("jobs_completed_total", **COMPLETED) == jobs
    assert delta("job_duration_seconds_count", **JOB) == jobs
    assert delta("http_requests_total", **EXECUTE_200) == jobs
    assert same_everywhere(after, "active_jobs", **JOB) == 0

    # A gauge set only in the lifecycle leader's worker, reported by every worker (its value
    # moves with each heartbeat, so only the series is compared).
    def heartbeat_series() -> list[set[Any]]:
        return [
            {labels for name, labels in scrape if name == "runner_heartbeat_timestamp"}
            for scrape in scrape_every_worker(runner)
        ]

    # The first heartbeat may land between two workers' scrapes: wait until it has happened.
    deadline = time.monotonic() + 10
    beats = heartbeat_series()
    while not all(beats) and time.monotonic() < deadline:
        time.sleep(0.2)
        beats = heartbeat_series()
    assert len(beats[0]) == 1 and all(b == beats[0] for b in beats), beats


def test_active_jobs_counts_running_jobs_then_returns_to_zero(plane: Plane) -> None:
    runner = plane.runner
    body = {
        "moduleId": "example",
        "capabilityId": "slow-count",
        "payload": {"steps": 20, "step_ms": 100},
    }
    with ThreadPoolExecutor(3) as pool:
        futures = [
            pool.submit(
                requests.post,
                runner.url + "/execute",
                json={**body, "jobId": str(uuid.uuid4())},
                timeout=QUICK,
            )
            for _ in range(3)
        ]

        def three_running() -> bool:
            scrape = samples(requests.get(runner.url + "/metrics", timeout=QUICK).text)
            return value(scrape, "active_jobs", capability="slow-count") == 3

        wait_until(three_running, 5, "active_jobs{slow-count} == 3")
        assert [f.result().status_code for f in futures] == [200] * 3

    def zero_everywhere() -> bool:
        # Not settled(): the workers can agree on a value published before the jobs ended.
        scrapes = scrape_every_worker(runner)
        return all(value(s, "active_jobs", capability="slow-count") == 0 for s in scrapes)

    wait_until(zero_everywhere, 10, "active_jobs{slow-count} did not return to 0", interval=0.2)


def test_forge_metrics_count_requests_jobs_runners_and_dispatch_latency(plane: Plane) -> None:
    forge, runner = plane.forge, plane.runner
    forge_totals: list[Wanted] = [
        ("http_requests_total", {"method": "POST", "path": "/jobs", "status": "202"}),
        ("forge_dispatch_latency_seconds_count", {"job_type": "text.stats"}),
        ("forge_dispatch_latency_seconds_sum", {"job_type": "text.stats"}),
        ("forge_jobs_dispatched_total", {"job_type": "text.stats"}),
        ("http_requests_total", {"method": "POST", "path": "/runners/register", "status": "201"}),
    ]
    before = settled(forge, *forge_totals)
    runner_before = settled(runner, ("jobs_received_total", RECEIVED))
    count = 6
    with requests.Session() as session:
        ids = []
        for index in range(count):
            response = session.post(
                forge.url + "/jobs",
                json=job_request("text.stats", data={"text": f"forge job {index}"}),
                timeout=QUICK,
            )
            assert response.status_code == 202, response.text
            ids.append(response.json()["id"])

        def all_completed() -> bool:
            states = [
                session.get(f"{forge.url}/jobs/{job_id}", timeout=QUICK).json()["status"]
                for job_id in ids
            ]
            return all(s == "completed" for s in states)

        wait_until(all_completed, 20, "the forge's jobs to complete")
    after = settled(forge, *forge_totals)
    assert len(after) == 2

    def delta(name: str, **labels: str) -> float:
        return same_everywhere(after, name, **labels) - same_everywhere(before, name, **labels)

    assert delta("http_requests_total", method="POST", path="/jobs", status="202") == count
    assert delta("forge_dispatch_latency_seconds_count", job_type="text.stats") == count
    assert delta("forge_jobs_dispatched_total", job_type="text.stats") == count
    assert same_everywhere(after, "forge_jobs", status="queued") == 0
    assert same_everywhere(after, "forge_jobs", status="running") == 0
    assert delta("forge_jobs", status="completed") == count
    assert same_everywhere(after, "forge_runners", status="healthy") == 1
    assert same_everywhere(after, "forge_runners", status="offline") == 0
    # The runner heartbeats every second and registered once, with a 201.
    register = {"method": "POST", "path": "/runners/register", "status": "201"}
    assert same_everywhere(after, "http_requests_total", **register) == 1
    beats = {"method": "POST", "path": "/runners/heartbeat", "status": "200"}
    # (One may land between two workers' scrapes: the counts may differ by that.)
    assert min(value(s, "http_requests_total", **beats) for s in after) >= 1
    latency = same_everywhere(after, "forge_dispatch_latency_seconds_sum", job_type="text.stats")
    assert 0 <= latency < count * 5
    # Route templates, not raw paths: one series for every job id.
    paths = {dict(labels).get("path") for (_, labels) in after[0]}
    assert "/jobs/<job_id>" in paths and not any(ids[0] in str(p) for p in paths)

    # The runner counted the forge's jobs too.
    runner_after = settled(runner, ("jobs_received_total", RECEIVED))
    received = same_everywhere(runner_after, "jobs_received_total", **RECEIVED)
    assert received - same_everywhere(runner_before, "jobs_received_total", **RECEIVED) == count


def test_forge_metrics_are_prometheus_text(plane: Plane) -> None:
    response = requests.get(plane.forge.url + "/metrics", timeout=QUICK)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    text = response.text
    for family in (
        "http_requests_total",
        "http_request_duration_seconds",
        "forge_jobs",
        "forge_runners",
    ):
        assert f"# TYPE {family} " in text or f"# TYPE {family.removesuffix('_total')} " in text
    scrape = samples(text)
    for status in ("pending", "queued", "running", "completed", "failed", "cancelled", "retrying"):
        assert ("forge_jobs", (("status", status),)) in scrape


def test_totals_keep_exited_workers_counters_and_drop_their_gauges(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Two workers count jobs; one is SIGKILLed while it runs a long job, another is
    SIGTERMed right after more jobs: gunicorn's replacements scrape totals that still hold
    both dead workers' counters (the killed one's as last published, the stopped one's as
    published at its exit), and ``active_jobs`` without the killed worker's running job."""
    stack = Stack(tmp_path_factory.mktemp("exited"))
    slow = {"capability": "slow-count"}
    wanted: list[Wanted] = [
        ("jobs_received_total", RECEIVED),
        ("jobs_completed_total", COMPLETED),
        ("active_jobs", slow),
    ]
    try:
        runner = stack.runner(workers=2, all_workers=True)
        (first, [on_first]), (second, [on_second]) = pin_connections(runner, [1, 1])
        for index, conn in enumerate([on_first] * 5 + [on_second] * 3):
            reply = conn.execute(instance_job("text-stats", {"text": f"job {index}"}))
            assert reply.status == 200, reply
        long_job = instance_job("slow-count", {"steps": 600, "step_ms": 100})

        def hold() -> None:
            with contextlib.suppress(OSError):  # its worker is killed under it
                on_first.execute(long_job)

        holder = threading.Thread(target=hold, daemon=True)
        holder.start()
        wait_until(
            lambda: value(settled(runner, *wanted)[0], "active_jobs", **slow) == 1,
            10,
            "the long job is not counted as running",
        )

        psutil.Process(first).kill()
        workers = wait_until(
            lambda: len(pids := runner.worker_pids()) == 2 and first not in pids and pids,
            20,
            "gunicorn did not replace the killed worker",
        )
        assert workers
        runner.wait_workers_serving(timeout=20)
        after_kill = settled(runner, *wanted)
        assert same_everywhere(after_kill, "jobs_received_total", **RECEIVED) == 8
        assert same_everywhere(after_kill, "jobs_completed_total", **COMPLETED) == 8
        assert same_everywhere(after_kill, "active_jobs", **slow) == 0

        on_second.close()
        on_second = pin_to(runner, second)
        for index in range(2):
            assert on_second.execute(instance_job("text-stats", {"text": f"late {index}"})).status
        on_second.close()
        os.kill(second, signal.SIGTERM)  # before its next publication is due
        wait_until(
            lambda: second not in runner.worker_pids() and len(runner.worker_pids()) == 2,
            20,
            "gunicorn did not replace the stopped worker",
        )
        runner.wait_workers_serving(timeout=20)
        after_stop = settled(runner, *wanted)
        assert same_everywhere(after_stop, "jobs_received_total", **RECEIVED) == 10
        assert same_everywhere(after_stop, "jobs_completed_total", **COMPLETED) == 10
        holder.join(0)
    finally:
        stack.stop()
