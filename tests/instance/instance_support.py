"""Helpers for the one-instance tests: a runner instance (gunicorn + its JobForge stub + its state
directory), connections pinned to a known worker, and what the kernel says about locks.

An *instance* is one gunicorn master with N workers that must act as ONE runner (DESIGN.md §2-4).
Everything here is observed from outside: HTTP answers, the requests the JobForge stub received,
``/proc/locks`` and ``/proc/<pid>/fd``. Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import signal
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import psutil
import pytest

from runnerkit.contracts import parse_timestamp
from tests.support import GunicornProcess, JobForgeStub, Recorded
from tests.support.locks import leader_of, ofd_locked_bytes
from tests.support.waiting import wait_until

T = TypeVar("T")

#: The product's gunicorn settings (gthread workers, reserved health threads).
GUNICORN_CONF = "deploy/gunicorn.conf.py"

#: The heartbeat interval the JobForge stub hands out at registration (its default, 1000 ms).
INTERVAL_S = 1.0

#: Environment variables a runner must not inherit from whoever runs the tests.
CLEAN_ENV: dict[str, str | None] = {
    "JOBFORGE_URL": None,
    "TRUTHCORE_URL": None,
    "RUNNER_TOKEN": None,
    "RUNNERKIT_TRUTHCORE_URL": None,
    "RUNNERKIT_RUNNER_TOKEN": None,
    "RUNNERKIT_HEARTBEAT_INTERVAL_MS": None,  # the stub's answer must set the interval
    "RUNNERKIT_REGISTRATION_BACKOFF_MAX_MS": None,
    "WEB_CONCURRENCY": None,
}


# -- waiting ------------------------------------------------------------------------------


def wall_time(recorded: Recorded) -> float:
    """When the runner built a heartbeat (its body's ``timestamp``), as a Unix time."""
    return parse_timestamp(recorded.body["timestamp"]).timestamp()


def attach(request: pytest.FixtureRequest, instance: Instance) -> None:
    """Let the report hook (conftest.py) add ``instance``'s log to the test's failure report."""
    node = request.node
    if not hasattr(node, "runner_instances"):
        node.runner_instances = []
    node.runner_instances.append(instance)


# -- one instance -------------------------------------------------------------------------


#: ``make_stub(start=True, **options)`` and ``make_instance(stub=None, **options)`` (conftest).
StubFactory = Callable[..., JobForgeStub]
InstanceFactory = Callable[..., "Instance"]


@dataclass
class Instance:
    """A gunicorn master serving ``app:app``, the JobForge stub it reports to, its state dir."""

    proc: GunicornProcess
    stub: JobForgeStub
    state_dir: Path

    @property
    def url(self) -> str:
        return self.proc.url

    def explain(self, extra: str = "") -> str:
        """An assertion message: what the stub saw, then the end of the gunicorn log."""
        seen = "\n".join(
            f"  {c.time:10.3f} {c.method} {c.path} -> {c.status}" for c in self.stub.calls()[-40:]
        )
        return f"{extra}\nJobForge stub saw (last 40):\n{seen}\n{self.proc.log_tail(4000)}"

    # What JobForge saw.

    def registrations(self, since: float | None = None) -> list[Recorded]:
        return self.stub.calls("POST", "/runners/register", since=since)

    def accepted_registrations(self, since: float | None = None) -> list[Recorded]:
        return [r for r in self.registrations(since) if r.status == 201]

    def heartbeats(self, since: float | None = None) -> list[Recorded]:
        return self.stub.calls("POST", "/runners/heartbeat", since=since)

    def deletes(self, since: float | None = None) -> list[Recorded]:
        return self.stub.calls("DELETE", "/runners/", since=since)

    def runner_id(self) -> str:
        """The runnerId of the latest accepted registration."""
        accepted = self.accepted_registrations()
        assert accepted, self.explain("never registered")
        return str(accepted[-1].response["runnerId"])

    def wait_registered(self, timeout: float = 15.0) -> Recorded:
        wait_until(self.accepted_registrations, timeout, lambda: self.explain("not registered"))
        return self.accepted_registrations()[-1]

    def wait_heartbeat(
        self,
        since: float,
        timeout: float = 5.0,
        where: Callable[[Recorded], bool] = lambda r: True,
    ) -> Recorded:
        """The first heartbeat arriving after ``since`` (monotonic) that satisfies ``where``."""
        found = wait_until(
            lambda: [h for h in self.heartbeats(since) if where(h)],
            timeout,
            lambda: self.explain(f"no matching heartbeat since {since:.3f}"),
        )
        return found[0]

    def progress_events(self, job_id: str) -> list[Recorded]:
        """job.progress events the runner sent to JobForge for ``job_id``."""
        return self.stub.calls("POST", f"/jobs/{job_id}/events")

    def wait_started(self, job_ids: Iterable[str], timeout: float = 10.0) -> float:
        """Wait until every job's code has reported progress; returns the wall-clock time then.

        ``ctx.progress`` runs inside the capability after its first step, so an event proves
        the job's code is running (it cannot start before its slot is taken).
        """
        pending = list(job_ids)
        wait_until(
            lambda: all(self.progress_events(j) for j in pending),
            timeout,
            lambda: self.explain(f"jobs {pending} did not all report progress"),
        )
        return time.time()

    # What the kernel says.

    def leader_pid(self) -> int:
        """The worker leading the instance (its lease record, checked against its lock)."""
        return wait_until(
            lambda: leader_of(self.state_dir, self.proc.worker_pids()),
            5.0,
            lambda: self.explain(f"no worker leads the instance of {self.state_dir}"),
        )

    def held_slots(self) -> dict[str, int]:
        """Concurrency slots held right now, per capability (OFD locks on ``slots/*.lock``)."""
        slots = self.state_dir / "slots"
        counts = {}
        for path in sorted(slots.glob("*.lock")):
            counts[path.stem] = len(ofd_locked_bytes(path))
        return counts

    def ledger_row(self, job_id: str) -> dict[str, Any] | None:
        """The idempotency ledger's row for ``job_id`` (read-only look at the SQLite file)."""
        uri = f"file:{self.state_dir / 'ledger.sqlite3'}?mode=ro"
        with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=5.0)) as conn:
            conn.row_factory = sqlite3.Row
            row = conn.execute("SELECT * FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        return dict(row) if row is not None else None

    def sentinels(self) -> list[psutil.Process]:
        return sentinel_processes(self.state_dir)

    def deregistered_once(self, runner_id: str) -> Recorded:
        """After SIGTERM: the master exits 0, and once every sentinel is gone (after that
        nothing can send a DELETE any more) JobForge saw exactly one, of ``runner_id``."""
        assert self.proc.wait_exit(timeout=30) == 0, self.explain("the master did not exit")
        sentinels = self.sentinels()
        wait_until(
            lambda: all(exited(p) for p in sentinels),
            15.0,
            lambda: self.explain(f"sentinel still running: {sentinels}"),
        )
        deletes = self.deletes()
        assert [d.path for d in deletes] == [f"/runners/{runner_id}"], self.explain()
        return deletes[0]

    def job_log(self, job_id: str) -> list[dict[str, Any]]:
        """The ``runnerkit.job`` log records (JSON lines) of ``job_id``."""
        records = []
        for line in self.proc.log_text().splitlines():
            if job_id not in line or not line.startswith("{"):
                continue
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if record.get("component") == "runnerkit.job" and record.get("jobId") == job_id:
                    records.append(record)
        return records


def launch_instance(
    log_dir: Path,
    stub: JobForgeStub,
    *,
    app: str = "app:app",
    workers: int = 3,
    config: str | None = GUNICORN_CONF,
    env: Mapping[str, str | None] | None = None,
    extra_args: Iterable[str] = (),
    wait: bool = True,
) -> Instance:
    """Start gunicorn serving ``app`` (the example, ``app:app``) for ``stub``, with its own
    state directory.

    With ``wait`` it returns once every worker has answered a request (so every worker's
    lifecycle scheduler is running). That wait (``wait_workers_serving``) closes its
    connections; ``GunicornProcess.wait_ready`` is not used because its ``requests``
    connection can stay open until garbage collection, and a stopping gthread worker lingers
    for an open kept-alive connection.
    """
    state_dir = log_dir / "state"
    merged: dict[str, str | None] = dict(CLEAN_ENV)
    merged.update(
        {
            "RUNNERKIT_JOBFORGE_URL": stub.url,
            "RUNNERKIT_STATE_DIR": str(state_dir),
            "GUNICORN_GRACEFUL_TIMEOUT": "10",
            "GUNICORN_THREADS": "6",
        }
    )
    merged.update(env or {})
    proc = GunicornProcess(
        app,
        log_dir=log_dir,
        workers=workers,
        config=config,
        env=merged,
        extra_args=extra_args,
    )
    instance = Instance(proc, stub, state_dir)
    proc.start()
    if wait:
        try:
            proc.wait_workers_serving(timeout=30.0)
        except BaseException:
            stop_instance(instance)
            raise
    return instance


def stop_instance(instance: Instance, timeout: float = 10.0) -> None:
    """Stop gunicorn gracefully, let its sentinel deregister and exit, then clean up.

    The master is signalled here first so that ``GunicornProcess.stop`` finds it gone and has
    no orphaned sentinel to wait for (an orphan is reaped by PID 1, which can take seconds).
    A sentinel still running 8 s after the master exited is killed, by pid.
    """
    proc = instance.proc
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.signal(signal.SIGTERM)
        proc.wait_exit(timeout)
    if proc.returncode is not None:
        end_processes(instance.sentinels(), timeout=8.0)
    proc.stop(timeout=timeout)
    end_processes(instance.sentinels(), timeout=1.0)


def stop_instances(instances: Iterable[Instance], timeout: float = 10.0) -> None:
    """Stop several instances side by side (each stop waits for its own master)."""
    todo = list(instances)
    if len(todo) <= 1:
        for instance in todo:
            stop_instance(instance, timeout)
        return
    with ThreadPoolExecutor(min(len(todo), 5)) as pool:
        for future in [pool.submit(stop_instance, i, timeout) for i in todo]:
            future.result()


def exited(proc: psutil.Process) -> bool:
    """Gone, or a zombie (it has finished; only its reaping is left)."""
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def end_processes(processes: list[psutil.Process], timeout: float) -> None:
    """Wait up to ``timeout`` for ``processes`` to exit by themselves; SIGKILL the rest."""
    deadline = time.monotonic() + timeout
    while not all(exited(p) for p in processes) and time.monotonic() < deadline:
        time.sleep(0.05)
    for proc in processes:
        if not exited(proc):
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()  # psutil checks the pid still names the same process


def sentinel_processes(state_dir: Path) -> list[psutil.Process]:
    """Live ``python -m runnerkit.runner.sentinel <state_dir> ...`` processes of this state dir."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info.get("cmdline") or []
        if "runnerkit.runner.sentinel" in cmdline and str(state_dir) in cmdline:
            with contextlib.suppress(psutil.Error):
                if proc.status() != psutil.STATUS_ZOMBIE:
                    found.append(proc)
    return found


# -- jobs and connections -----------------------------------------------------------------


def call(
    proc: GunicornProcess,
    method: str,
    path: str,
    body: Any = None,
    timeout: float = 30.0,
) -> Reply:
    """One request on its own connection, closed afterwards (``Connection: close``)."""
    conn = http.client.HTTPConnection(proc.host, proc.port, timeout=timeout)
    try:
        raw = None if body is None else json.dumps(body).encode()
        headers = {"Connection": "close"}
        if raw is not None:
            headers["Content-Type"] = "application/json"
        conn.request(method, path, body=raw, headers=headers)
        return _reply(conn.getresponse())
    finally:
        conn.close()


def _reply(response: http.client.HTTPResponse) -> Reply:
    data = response.read()
    parsed: Any = None
    if data:
        try:
            parsed = json.loads(data)
        except ValueError:
            parsed = data
    return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, parsed)


def job_request(capability_id: str, payload: dict[str, Any], job_id: str | None = None) -> dict:
    """A RunnerExecutionRequest as JobForge would send it."""
    return {
        "jobId": job_id or str(uuid.uuid4()),
        "moduleId": "example",
        "capabilityId": capability_id,
        "payload": payload,
    }


@dataclass
class Reply:
    """An HTTP answer: status, headers (lower-case names), body (parsed JSON when it is)."""

    status: int
    headers: dict[str, str]
    body: Any


class PinnedConnection:
    """A kept-alive HTTP/1.1 connection and the gunicorn worker that holds its server end.

    gthread workers keep a kept-alive connection in their own poller, so every request sent on
    it is served by that same worker, which is how a test puts a job on a chosen worker. Use it
    within the keep-alive timeout (5 s with deploy/gunicorn.conf.py, 2 s by default).
    """

    def __init__(self, proc: GunicornProcess, timeout: float = 30.0) -> None:
        self.conn = http.client.HTTPConnection(proc.host, proc.port, timeout=timeout)
        self.conn.connect()
        self.client_port: int = self.conn.sock.getsockname()[1]
        reply = self.request("GET", "/health/live")
        assert reply.status == 200, reply
        assert reply.headers.get("connection", "").lower() != "close", reply.headers
        pid = proc.worker_for_client_port(self.client_port)
        self.worker: int | None = pid

    def request(
        self, method: str, path: str, body: Any = None, headers: Mapping[str, str] | None = None
    ) -> Reply:
        raw = None if body is None else json.dumps(body).encode()
        all_headers = dict(headers or {})
        if raw is not None:
            all_headers["Content-Type"] = "application/json"
        self.conn.request(method, path, body=raw, headers=all_headers)
        return _reply(self.conn.getresponse())

    def execute(self, body: dict[str, Any]) -> Reply:
        return self.request("POST", "/execute", body)

    def close(self) -> None:
        self.conn.close()


def pin_connections(
    proc: GunicornProcess, counts: list[int], timeout: float = 10.0
) -> list[tuple[int, list[PinnedConnection]]]:
    """Open connections until ``len(counts)`` distinct workers hold ``counts[i]`` each.

    The i-th distinct worker seen gets ``counts[i]`` connections. Returns
    ``[(worker pid, [connections]), ...]`` in that order; connections not needed are closed.
    """
    pinned: dict[int, list[PinnedConnection]] = {}
    order: list[int] = []
    spare: list[PinnedConnection] = []
    deadline = time.monotonic() + timeout

    def need(pid: int) -> int:
        rank = order.index(pid)
        return counts[rank] if rank < len(counts) else 0

    try:
        while len(order) < len(counts) or any(len(pinned[p]) < need(p) for p in order):
            assert time.monotonic() < deadline, (
                f"could not pin {counts} connections to workers {proc.worker_pids()} "
                f"within {timeout}s: got { {p: len(c) for p, c in pinned.items()} }"
            )
            conn = PinnedConnection(proc)
            if conn.worker is None:
                spare.append(conn)
                continue
            if conn.worker not in order:
                order.append(conn.worker)
                pinned[conn.worker] = []
            if len(pinned[conn.worker]) < need(conn.worker):
                pinned[conn.worker].append(conn)
            else:
                spare.append(conn)
    except BaseException:
        for conns in pinned.values():
            for c in conns:
                c.close()
        raise
    finally:
        for c in spare:
            c.close()
    return [(pid, pinned[pid]) for pid in order[: len(counts)]]


def pin_to(proc: GunicornProcess, worker: int, timeout: float = 10.0) -> PinnedConnection:
    """A kept-alive connection held by the worker ``worker``."""
    deadline = time.monotonic() + timeout
    while True:
        conn = PinnedConnection(proc)
        if conn.worker == worker:
            return conn
        conn.close()
        assert time.monotonic() < deadline, f"no connection reached worker {worker}"
