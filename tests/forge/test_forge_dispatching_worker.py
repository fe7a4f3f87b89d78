"""The dispatching worker leaves new connections to its siblings, never leaving the forge deaf.

Real gunicorn masters serving ``runnerkit.forge:app`` as ``runnerkit forge`` serves it (the
forge's worker class), on a real SQLite file; which worker holds a connection is read from
the kernel's socket table (:meth:`GunicornProcess.worker_for_client_port`), which worker
dispatches from the pid in the dispatcher's heartbeat (``GET /health``).
"""

from __future__ import annotations

import http.client
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
import requests

from runnerkit.forge import serving
from runnerkit.service import new_connections
from tests.forge.helpers import FakeRunner, ForgeHTTP, Reply, capability, sync_request
from tests.support import GunicornProcess
from tests.support.waiting import wait_until

#: A loaded machine is slow; none of these waits is a measurement.
PATIENCE = 60.0


def start_forge(root: Path, workers: int, **env: str) -> GunicornProcess:
    proc = GunicornProcess(
        "runnerkit.forge:app",
        log_dir=root,
        workers=workers,
        config=None,
        env={
            "RUNNERKIT_FORGE_DB_PATH": str(root / "forge.sqlite3"),
            "RUNNERKIT_FORGE_TOKEN": None,
            "RUNNERKIT_FORGE_RUNNER_TOKEN": None,
            "RUNNERKIT_FORGE_SIGNING_SECRET": None,
            "WEB_CONCURRENCY": None,
            **env,
        },
        extra_args=list(serving.OPTIONS),
        name="forge",
    )
    proc.start()
    proc.wait_ready("/health", timeout=PATIENCE)
    return proc


@pytest.fixture
def forge3(tmp_path: Path) -> Iterator[GunicornProcess]:
    proc = start_forge(tmp_path, 3)
    yield proc
    proc.stop(timeout=10)


@pytest.fixture
def forge2(tmp_path: Path) -> Iterator[GunicornProcess]:
    proc = start_forge(tmp_path, 2)
    yield proc
    os.kill(proc.master_pid, signal.SIGCONT)  # whatever the test did to it
    proc.stop(timeout=10)


def new_connection_worker(proc: GunicornProcess, timeout: float = 10.0) -> int | None:
    """Open a new connection, have ``GET /health`` answered on it; the worker that holds it."""
    status, pid = proc.answered_on_new_connection("/health", timeout=timeout)
    assert status == 200, status
    return pid


def dispatching_pid(proc: GunicornProcess) -> int:
    """The pid in the dispatcher's heartbeat, once one has ticked (it stays in the worker
    that took the lock)."""
    found: list[int] = []

    def ticked() -> bool:
        conn = http.client.HTTPConnection(proc.host, proc.port, timeout=10)
        try:
            conn.request("GET", "/health")
            body = conn.getresponse().read().decode()
        finally:
            conn.close()
        match = re.search(r"\(pid (\d+)", body)
        if match:
            found.append(int(match.group(1)))
        return bool(match)

    wait_until(ticked, PATIENCE, lambda: f"no dispatcher ticked\n{proc.log_tail()}")
    return found[-1]


def yields(proc: GunicornProcess, pid: int) -> None:
    """Wait until ``pid`` leaves new connections to its siblings (within a second of taking
    the dispatcher lock, once its siblings run), as its heartbeat says in ``/health``."""
    said = f"(pid {pid}, its sibling workers take new connections)"

    def told() -> bool:
        conn = http.client.HTTPConnection(proc.host, proc.port, timeout=10)
        try:
            conn.request("GET", "/health")
            return said in conn.getresponse().read().decode()
        finally:
            conn.close()

    wait_until(told, PATIENCE, lambda: f"the dispatching worker never yielded\n{proc.log_tail()}")


def test_the_dispatching_worker_takes_no_new_connections_while_siblings_serve(
    forge3: GunicornProcess,
) -> None:
    dispatcher = dispatching_pid(forge3)
    assert dispatcher in forge3.worker_pids()
    yields(forge3, dispatcher)
    holders = [new_connection_worker(forge3) for _ in range(30)]
    assert dispatcher not in holders
    siblings = set(forge3.worker_pids()) - {dispatcher}
    assert set(holders) <= siblings, (holders, siblings)
    assert len(set(holders)) == 2, holders  # both siblings take their share


def test_a_dispatching_worker_left_alone_takes_connections_again(
    forge2: GunicornProcess,
) -> None:
    """The sibling dies and the arbiter cannot start another (stopped): within a second or
    so the dispatching worker accepts again, so the forge still answers."""
    dispatcher = dispatching_pid(forge2)
    yields(forge2, dispatcher)
    assert new_connection_worker(forge2) != dispatcher
    (sibling,) = set(forge2.worker_pids()) - {dispatcher}
    os.kill(forge2.master_pid, signal.SIGSTOP)  # no new worker while it is stopped
    os.kill(sibling, signal.SIGKILL)
    # Each call waits up to 10 s for its answer: the connection waits in the backlog until
    # the dispatching worker takes connections again.
    holders = [new_connection_worker(forge2, timeout=PATIENCE) for _ in range(5)]
    assert holders == [dispatcher] * 5, holders


# -- the module on its own -------------------------------------------------------------------


class FakeWorker:
    """A worker whose arbiter is ``ppid``."""

    def __init__(self, ppid: int) -> None:
        self.ppid = ppid
        self.changes = 0

    def yielding_changed(self) -> None:
        self.changes += 1


#: An arbiter of its own: a process that starts ``sys.argv[1]`` sleeping children, prints
#: their pids, and never reaps them.
ARBITER = """
import subprocess, sys, time
children = [
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    for _ in range(int(sys.argv[1]))
]
print(" ".join(str(c.pid) for c in children), flush=True)
time.sleep(60)
"""


@pytest.fixture
def arbiters() -> Iterator[Callable[[int], tuple[int, list[int]]]]:
    started: list[subprocess.Popen[str]] = []

    def start(children: int) -> tuple[int, list[int]]:
        proc = subprocess.Popen(
            [sys.executable, "-c", ARBITER, str(children)], stdout=subprocess.PIPE, text=True
        )
        started.append(proc)
        assert proc.stdout is not None
        pids = [int(pid) for pid in proc.stdout.readline().split()]
        return proc.pid, pids

    yield start
    for proc in started:
        for child in psutil.Process(proc.pid).children():
            child.kill()
        proc.kill()
        proc.wait()


@pytest.fixture
def attached(
    arbiters: Callable[[int], tuple[int, list[int]]],
) -> Iterator[Callable[[int], tuple[FakeWorker, list[int]]]]:
    """A fake worker attached in this process, its arbiter one with ``children`` children
    (their pids come with it)."""

    def attach(children: int) -> tuple[FakeWorker, list[int]]:
        arbiter, pids = arbiters(children)
        worker = FakeWorker(arbiter)
        new_connections.attach(worker)
        return worker, pids

    yield attach
    new_connections._worker = None
    new_connections.yielding = False


Attach = Callable[[int], tuple[FakeWorker, list[int]]]


class _Client(ForgeHTTP):
    def __init__(self, url: str) -> None:
        self.url = url
        self.session = requests.Session()


def test_no_wakeup_is_lost_when_every_worker_submits_at_once(tmp_path: Path) -> None:
    """Submissions to every worker at once, with the dispatcher polling every ten minutes:
    each job is dispatched on a wake-up alone, including those whose sender found a wake-up
    already pending (``forge/wakeup.py``: it sends none) and the last ones of the burst."""
    proc = start_forge(tmp_path, 3, RUNNERKIT_FORGE_POLL_INTERVAL_MS="600000")
    fake = FakeRunner(
        "burst", [capability("cap", ["type.a"], max_concurrency=3)], lambda f, c: Reply()
    )
    try:
        fake.register(proc.url)
        dispatching_pid(proc)
        job_ids: list[str] = []
        lock = threading.Lock()

        def submit_some() -> None:
            client = _Client(proc.url)  # its own connections: the workers share them out
            for _ in range(15):
                job_id = client.submit(sync_request())["id"]
                with lock:
                    job_ids.append(job_id)

        for _round in range(3):
            threads = [threading.Thread(target=submit_some) for _ in range(6)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(PATIENCE)
            client = _Client(proc.url)
            for job_id in job_ids:
                client.wait_status(job_id, "completed", timeout=PATIENCE)
        assert len(job_ids) == 270
        assert sorted(call.body.get("jobId") for call in fake.calls) == sorted(job_ids), "one each"
    finally:
        fake.stop()
        proc.stop(timeout=10)


def test_yielding_needs_a_worker_in_this_process() -> None:
    assert new_connections.yield_to_siblings(True) is False
    assert new_connections.yielding is False


def test_yielding_follows_the_siblings_and_tells_the_worker_of_each_change(
    attached: Attach,
) -> None:
    worker, _ = attached(0)
    assert new_connections.yield_to_siblings(True) is False
    assert worker.changes == 0

    worker, (sibling,) = attached(1)
    assert new_connections.yield_to_siblings(True) is True
    assert new_connections.yielding is True
    assert worker.changes == 1
    assert new_connections.yield_to_siblings(True) is True
    assert worker.changes == 1  # nothing changed: the worker is left alone
    os.kill(sibling, signal.SIGKILL)  # dead, not reaped by its arbiter: a zombie
    wait_until(lambda: psutil.Process(sibling).status() == psutil.STATUS_ZOMBIE, PATIENCE)
    assert new_connections.yield_to_siblings(True) is False
    assert new_connections.yielding is False
    assert worker.changes == 2


def test_yielding_ends_when_asked(attached: Attach) -> None:
    worker, _ = attached(2)
    assert new_connections.yield_to_siblings(True) is True
    assert new_connections.yield_to_siblings(False) is False
    assert new_connections.yielding is False
    assert worker.changes == 2


def test_a_forked_child_of_a_worker_never_yields(
    attached: Attach, monkeypatch: pytest.MonkeyPatch
) -> None:
    worker, _ = attached(2)
    monkeypatch.setattr(new_connections, "_pid", os.getpid() + 1)  # as in a forked child
    assert new_connections.yield_to_siblings(True) is False
    assert worker.changes == 0
