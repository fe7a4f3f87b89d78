"""What the fault-injection scenarios share: a tunable stack, a meddling proxy, the verdict.

- :class:`FaultStack` is the end-to-end :class:`~tests.e2e.conftest.Stack` (imported, not
  copied) with knobs the e2e suite does not need: extra environment for the forge and for
  runners, another runner app (``tests/faults/apps/fault_runner.py``), and a runner restart
  at the same port;
- :class:`ExecuteProxy` sits between the forge and a runner (in this process, on threads) and
  delivers the first ``POST /execute`` of chosen jobs twice, twice at once, forwards it and
  drops the answer (so the forge sends it again), or holds the answer back past the forge's
  read timeout; as a plain relay from a runner to the forge it can cut that path;
- :func:`leader_pid` / :func:`running_executions` find the process to kill;
- :func:`collect` waits for every job to finish and turns the forge's records plus the
  capabilities' execution log into a :class:`Verdict`: completed, failed (with an error
  envelope), lost (never finished), duplicated (executed more often than the contract allows).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import psutil
import psycopg
import requests

from runnerkit.contracts import ErrorEnvelopeSchema, JobResponseSchema, parse_timestamp
from tests.e2e.conftest import FINAL, QUICK, RunnerInstance, Stack, check, job_request
from tests.support import GunicornProcess
from tests.support.locks import leader_of
from tests.support.procs import free_port
from tests.support.waiting import wait_until

#: The runner app with many sleeping slots and a capability that overruns its deadline.
FAULT_RUNNER_APP = "tests.faults.apps.fault_runner:app"
#: Forge settings every fault stack uses: a short dispatch margin, so an attempt whose answer
#: was lost (the forge restarted) is declared overdue seconds, not tens of seconds, later.
FORGE_ENV = {"RUNNERKIT_FORGE_DISPATCH_MARGIN_MS": "2000"}
#: A sync / async job's timeoutMs (the stack's forge sends jobs above 5000 ms asynchronously).
SYNC_MS = 3000
ASYNC_MS = 8000
#: Retries enough to ride out a restart; each retry is a new, recorded attempt.
POLICY = {"maxRetries": 6, "backoffMs": 300, "backoffMultiplier": 2, "maxBackoffMs": 2000}


# --------------------------------------------------------------------------- the stack


@dataclass
class FaultStack(Stack):
    """A :class:`Stack` whose processes get extra environment, and whose runners may serve
    another app. Set the fields before starting the process they concern."""

    forge_env: dict[str, str | None] = field(default_factory=lambda: dict(FORGE_ENV))
    runner_env: dict[str, str | None] = field(default_factory=dict)
    runner_app: str | None = None
    #: gunicorn workers of the next runner started (the e2e stack's 2 when None).
    runner_workers: int | None = None
    #: The port the next runner started listens on (a restart at the same address).
    next_runner_port: int | None = None
    #: Forge instances beyond the first (:meth:`add_forge`), on the same PostgreSQL database.
    more_forges: list[GunicornProcess] = field(default_factory=list)

    def _launch(
        self, make: Callable[[int], GunicornProcess], port: int, *, movable: bool
    ) -> GunicornProcess:
        def tuned(port: int) -> GunicornProcess:
            proc = make(port)
            if "forge" not in proc.app_spec and self.next_runner_port is not None:
                proc = make(self.next_runner_port)
                self.next_runner_port = None
            if "forge" in proc.app_spec:
                proc.env_overrides.update(self.forge_env)
            else:
                proc.env_overrides.update(self.runner_env)
                if self.runner_app:
                    proc.app_spec = self.runner_app
                if self.runner_workers:
                    proc.workers = self.runner_workers
            return proc

        return super()._launch(tuned, port, movable=movable)

    # -- several forge instances (a PostgreSQL stack) ----------------------------------------

    def add_forge(self) -> GunicornProcess:
        """One more forge instance on the stack's PostgreSQL database, on a port of its own.

        ``forge``/``url`` stay the first instance (where the verdict reads jobs) until that
        one is killed (:meth:`kill_forge`).
        """
        assert self.db_url, "several forge instances share a PostgreSQL database"
        first = (self.forge, self.forge_port)
        self.forge, self.forge_port = None, free_port()
        try:
            proc = self.start_forge()
        finally:
            self.forge, self.forge_port = first
        self.more_forges.append(proc)
        return proc

    @property
    def forges(self) -> list[GunicornProcess]:
        """Every forge instance still running, the first one first."""
        live = [self.forge, *self.more_forges]
        return [p for p in live if p is not None and p.returncode is None]

    @property
    def forge_urls(self) -> str:
        """What a runner's RUNNERKIT_JOBFORGE_URL lists: every instance, comma-separated."""
        return ",".join(p.url for p in self.forges)

    def dispatching_forge(self) -> GunicornProcess | None:
        """The instance whose worker holds the dispatcher lock (by the heartbeat's pid)."""
        with psycopg.connect(self.db_url, autocommit=True) as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = 'dispatcher'").fetchone()
        pid = json.loads(row[0]).get("pid") if row is not None else None
        for proc in self.forges:
            with contextlib.suppress(psutil.NoSuchProcess):
                tree = psutil.Process(proc.master_pid).children(recursive=True)
                if any(child.pid == pid for child in tree):
                    return proc
        return None

    def kill_forge(self, proc: GunicornProcess) -> None:
        """SIGKILL one instance's whole tree; a surviving instance becomes ``forge``/``url``."""
        proc.kill()
        proc.wait_exit(10)
        if proc in self.more_forges:
            self.more_forges.remove(proc)
            self.processes.remove(proc)
        if proc is self.forge:
            survivor = self.more_forges.pop(0)
            self.processes.remove(proc)
            self.forge, self.forge_port = survivor, survivor.port

    def submit_all(self, jobs: Iterable[Mapping[str, Any]], *, spread: bool = False) -> None:
        """Submit every job (8 at a time); ``spread``: to each forge instance in turn."""
        urls = [p.url for p in self.forges]

        def submit(item: tuple[int, Mapping[str, Any]]) -> None:
            index, job = item
            if not spread:
                self.submit(job)
                return
            response = requests.post(f"{urls[index % len(urls)]}/jobs", json=job, timeout=QUICK)
            assert response.status_code == 202, f"{response.status_code} {response.text[:500]}"

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(submit, enumerate(jobs)))

    def started(self, jobs: Iterable[Mapping[str, Any]]) -> set[str]:
        """Ids of these jobs whose capability has started at least once."""
        ids = {j["id"] for j in jobs}
        return {r["job"] for r in self.executions(event="start") if r["job"] in ids}

    def wait_started(self, jobs: list[dict[str, Any]], count: int, timeout: float = 30.0) -> None:
        wait_until(
            lambda: len(self.started(jobs)) >= count,
            timeout,
            lambda: f"only {len(self.started(jobs))} of {count} jobs started\n{self.logs()}",
        )


@dataclass
class ProxiedRunner(RunnerInstance):
    """A runner the forge knows (and dispatches to) by the proxy's address."""

    public_url: str = ""

    @property
    def health_url(self) -> str:
        return f"{self.public_url}/health"


def start_proxied_runner(
    stack: FaultStack, label: str, caps: Iterable[str], proxy: ExecuteProxy
) -> ProxiedRunner:
    """Start a runner that registers the proxy's address, so the forge dispatches through it."""
    stack.runner_env["RUNNERKIT_HEALTH_CHECK_URL"] = f"{proxy.url}/health"
    try:
        plain = stack.start_runner(label, caps, wait=False)
    finally:
        del stack.runner_env["RUNNERKIT_HEALTH_CHECK_URL"]
    proxy.upstream = plain.url
    runner = ProxiedRunner(plain.label, plain.caps, plain.proc, plain.state_dir, proxy.url)
    stack.runners[label] = runner
    stack.wait_registered(runner)
    return runner


def jobs_of(
    job_type: str, count: int, ms: int, timeout_ms: int, prefix: str, **kwargs: Any
) -> list[dict[str, Any]]:
    kwargs.setdefault("retry_policy", POLICY)
    return [
        job_request(job_type, {"ms": ms, "tag": f"{prefix}{i}"}, timeout_ms=timeout_ms, **kwargs)
        for i in range(count)
    ]


def quick_jobs(count: int, prefix: str) -> list[dict[str, Any]]:
    """e2e.alpha jobs (return at once), synchronous."""
    return [
        job_request("e2e.alpha", {"tag": f"{prefix}{i}"}, timeout_ms=SYNC_MS, retry_policy=POLICY)
        for i in range(count)
    ]


def mixed_load(prefix: str, *, sync: int = 14, async_: int = 8, quick: int = 8) -> list[dict]:
    """A load for an e2e_app runner with alpha/work/solo: sleepers both ways, quick jobs."""
    jobs = jobs_of("e2e.work", sync, 400, SYNC_MS, f"{prefix}-s")
    jobs += jobs_of("e2e.work", async_ // 2, 500, ASYNC_MS, f"{prefix}-a")
    jobs += jobs_of("e2e.solo", async_ - async_ // 2, 300, ASYNC_MS, f"{prefix}-o")
    jobs += quick_jobs(quick, f"{prefix}-q")
    # Interleave so quick and slow jobs arrive together.
    return [jobs[i] for i in sorted(range(len(jobs)), key=lambda i: (i * 7919) % len(jobs))]


# --------------------------------------------------------------------------- processes


def leader_pid(instance: RunnerInstance) -> int | None:
    """The worker leading the instance (lease record checked against the kernel's locks)."""
    return leader_of(instance.state_dir, instance.proc.worker_pids())


def running_executions(stack: Stack, instance: RunnerInstance) -> dict[int, list[str]]:
    """Worker pid → jobs it started and has not finished, per the execution log."""
    open_runs: dict[tuple[str, int], int] = defaultdict(int)
    for record in stack.executions():
        key = (record["job"], record["pid"])
        open_runs[key] += 1 if record["event"] == "start" else -1
    workers = set(instance.proc.worker_pids())
    running: dict[int, list[str]] = defaultdict(list)
    for (job_id, pid), count in open_runs.items():
        if count > 0 and pid in workers:
            running[pid].append(job_id)
    return dict(running)


def sigkill(pid: int) -> None:
    proc = psutil.Process(pid)
    proc.kill()
    proc.wait(5)


# --------------------------------------------------------------------------- the proxy


_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "content-length",
}


@dataclass
class Delivery:
    """One copy of a request the proxy forwarded, and what the runner answered."""

    job_id: str
    status: int
    replayed: bool
    answered_forge: bool
    #: The error code of a failure answered with an envelope ("" otherwise).
    code: str = ""


class ExecuteProxy:
    """A loopback HTTP proxy in front of one runner that meddles with ``POST /execute``.

    ``modes`` maps a jobId to what happens to the *first* ``/execute`` carrying it (later ones
    pass through untouched):

    - ``twice``: forwarded, then forwarded again; the forge gets the second answer;
    - ``parallel``: two copies forwarded at the same moment; the forge gets the first's;
    - ``drop``: forwarded, the runner's answer read and thrown away, the forge's connection
      closed without an answer: to the forge the call failed, so it sends the job again;
    - ``late``: forwarded, and the runner's answer held back ``late_s`` seconds (past the
      forge's read timeout) before it is passed on;
    - ``mutated``: forwarded (the forge gets this answer), then the same signed bytes sent
      again three times as a replaying attacker would: with a new ``x-webhook-event-id``, an
      empty one and none (the signature does not cover it).

    Every copy forwarded is recorded in :attr:`deliveries`. With no modes it is a plain relay
    (any method, any path), e.g. from a runner to the forge; while :attr:`blocked` is true it
    forwards nothing and closes every connection it accepts, as a network that is down.
    """

    def __init__(self, modes: Mapping[str, str], late_s: float = 0.0) -> None:
        self.modes = dict(modes)
        self.late_s = late_s
        self.upstream = ""
        self.blocked = False
        self.deliveries: list[Delivery] = []
        self._seen: set[str] = set()
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                proxy._relay(self)

            def do_POST(self) -> None:
                proxy._relay(self)

            def do_DELETE(self) -> None:
                proxy._relay(self)

            def log_message(self, format: str, *args: Any) -> None:
                """Quiet."""

        class Server(ThreadingHTTPServer):
            request_queue_size = 128  # the forge sends many at once: no refused connects
            daemon_threads = True

        self.server = Server(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}"

    def start(self) -> ExecuteProxy:
        self._thread.start()
        return self

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)

    def copies(self, job_id: str) -> list[Delivery]:
        with self._lock:
            return [d for d in self.deliveries if d.job_id == job_id]

    def _first_mode(self, job_id: str) -> str:
        with self._lock:
            if job_id in self._seen:
                return "pass"
            self._seen.add(job_id)
            return self.modes.get(job_id, "pass")

    def _forward(
        self, method: str, path: str, body: bytes, headers: dict[str, str]
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        target = urlsplit(self.upstream)
        conn = http.client.HTTPConnection(str(target.hostname), target.port, timeout=60)
        try:
            conn.request(method, path, body=body or None, headers=headers)
            response = conn.getresponse()
            return response.status, response.getheaders(), response.read()
        finally:
            conn.close()

    def _relay(self, handler: BaseHTTPRequestHandler) -> None:
        if self.blocked:
            handler.close_connection = True
            return
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else b""
        headers = {k: v for k, v in handler.headers.items() if k.lower() not in _HOP_BY_HOP}
        method, path = handler.command, handler.path
        job_id, mode = "", "pass"
        if method == "POST" and path == "/execute":
            with contextlib.suppress(ValueError, AttributeError):
                job_id = str(json.loads(body).get("jobId", ""))
            mode = self._first_mode(job_id)

        def forward(to_forge: bool) -> tuple[int, list[tuple[str, str]], bytes]:
            status, answer_headers, data = self._forward(method, path, body, headers)
            if job_id:
                replayed = any(
                    k.lower() == "idempotent-replayed" and v == "true" for k, v in answer_headers
                )
                code = ""
                with contextlib.suppress(ValueError, AttributeError, TypeError):
                    code = str(json.loads(data)["error"]["code"]) if status >= 400 else ""
                with self._lock:
                    self.deliveries.append(Delivery(job_id, status, replayed, to_forge, code))
            return status, answer_headers, data

        try:
            if mode == "twice":
                forward(False)
                answer = forward(True)
            elif mode == "parallel":
                with ThreadPoolExecutor(2) as pool:
                    first = pool.submit(forward, True)
                    time.sleep(0.002)
                    second = pool.submit(forward, False)
                    answer = first.result()
                    second.result()
            elif mode == "mutated":
                answer = forward(True)
                event = next((k for k in headers if k.lower() == "x-webhook-event-id"), "")
                original = dict(headers)
                for copy in ("new", "", None):
                    headers = {k: v for k, v in original.items() if k != event}
                    if copy is not None:
                        headers["x-webhook-event-id"] = copy and str(uuid.uuid4())
                    forward(False)
            elif mode == "drop":
                forward(False)
                handler.close_connection = True
                return  # no answer at all: the forge sees the connection close
            else:
                answer = forward(True)
                if mode == "late":
                    time.sleep(self.late_s)
        except OSError:
            handler.close_connection = True
            return
        status, answer_headers, data = answer
        handler.close_connection = True
        with contextlib.suppress(OSError):  # a late answer finds the forge gone
            handler.send_response(status)
            for key, value in answer_headers:
                if key.lower() not in _HOP_BY_HOP | {"date", "server"}:
                    handler.send_header(key, value)
            handler.send_header("Content-Length", str(len(data)))
            handler.send_header("Connection", "close")
            handler.end_headers()
            handler.wfile.write(data)


# --------------------------------------------------------------------------- the verdict


def _successful(record: Mapping[str, Any]) -> bool:
    """A capability execution whose code returned normally before its deadline."""
    return record["event"] == "end" and bool(record.get("ok")) and not record.get("cut", False)


def runner_successes(stack: Stack) -> dict[str, list[float]]:
    """jobId → when a runner answered a first-hand (not replayed) success for it.

    From the runners' own job log (``runnerkit.job``, outcome ``success``), written once the
    answer is stored in the idempotency ledger: from then on a redelivery must be replayed,
    never run again. A capability whose worker is SIGKILLed after its code returned but
    before that moment has *not* succeeded as far as the runner (and the contract) can know:
    running it again is the required recovery, recorded as a new attempt.
    """
    found: dict[str, list[float]] = defaultdict(list)
    for proc in stack.processes:
        if "forge" in proc.app_spec:
            continue
        for line in proc.log_text().splitlines():
            if not line.startswith("{"):
                continue
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if (
                isinstance(record, dict)
                and record.get("component") == "runnerkit.job"
                and record.get("outcome") == "success"
                and record.get("jobId")
            ):
                found[record["jobId"]].append(parse_timestamp(record["timestamp"]).timestamp())
    return found


#: Clock slack between the runner's log timestamps (milliseconds) and the execution log.
_SLACK_S = 0.05


@dataclass
class JobReport:
    job_id: str
    token: str
    final: dict[str, Any] | None
    runs: list[dict[str, Any]]
    #: When a runner answered a first-hand success (see :func:`runner_successes`).
    answered: list[float] = field(default_factory=list)

    @property
    def status(self) -> str:
        return "missing" if self.final is None else str(self.final["status"])

    @property
    def attempts(self) -> int:
        """Attempts the forge recorded (JobResult.metadata.attempts)."""
        result = (self.final or {}).get("result") or {}
        return int(result.get("metadata", {}).get("attempts", 0))

    @property
    def starts(self) -> list[dict[str, Any]]:
        return [r for r in self.runs if r["event"] == "start"]

    @property
    def successes(self) -> list[dict[str, Any]]:
        """Capability executions that returned in time (the runner may not have answered)."""
        return [r for r in self.runs if _successful(r)]

    @property
    def error(self) -> dict[str, Any] | None:
        return (self.final or {}).get("error")

    def lost(self) -> str:
        """Why the job counts as lost ('' if it does not)."""
        if self.final is None:
            return "unknown to the forge"
        if self.status not in FINAL:
            return f"never finished: still {self.status}"
        if self.status == "failed":
            try:
                check(ErrorEnvelopeSchema, self.error, "error")
            except AssertionError as exc:
                return f"failed without a valid error envelope: {exc}"
            return ""
        if self.status != "completed":
            return f"ended {self.status}"
        return ""

    def duplicated(self) -> str:
        """Why the job ran more often than the contract allows ('' if it did not)."""
        if len(self.starts) > self.attempts:
            return f"{len(self.starts)} executions for {self.attempts} recorded attempts"
        if len(self.answered) > 1:
            return f"the runner answered {len(self.answered)} first-hand successes"
        if self.answered:
            again = [r for r in self.starts if r["t"] > self.answered[0] + _SLACK_S]
            if again:
                return f"ran again after the runner had answered its success: {again}"
        return ""

    def inconsistent(self) -> str:
        """A completed job's result must come from one capability execution that succeeded."""
        if self.status != "completed":
            return ""
        data = (self.final or {}).get("result", {}).get("data") or {}
        produced = (data.get("pid"), data.get("label"), data.get("tag"))
        runs = [(r["pid"], r["label"], self.token) for r in self.successes]
        if produced not in runs:
            return f"result {data} comes from none of the successful executions {runs}"
        return ""

    def describe(self) -> str:
        runs = [(r["event"], r["pid"], r.get("ok"), r.get("cut"), r["t"]) for r in self.runs]
        error = self.error or {}
        return (
            f"{self.job_id} [{self.token}] {self.status} attempts={self.attempts} "
            f"error={error.get('category')}/{error.get('code')} runs={runs} "
            f"answered={self.answered}"
        )


@dataclass
class Verdict:
    scenario: str
    reports: list[JobReport]
    strays: list[str]
    seconds: float

    @property
    def completed(self) -> list[JobReport]:
        return [r for r in self.reports if r.status == "completed"]

    @property
    def failed(self) -> list[JobReport]:
        return [r for r in self.reports if r.status == "failed" and not r.lost()]

    @property
    def lost(self) -> list[JobReport]:
        return [r for r in self.reports if r.lost()]

    @property
    def duplicated(self) -> list[JobReport]:
        return [r for r in self.reports if r.duplicated()]

    def by_id(self, job_id: str) -> JobReport:
        (report,) = [r for r in self.reports if r.job_id == job_id]
        return report

    def line(self) -> str:
        return (
            f"{self.scenario}: sent {len(self.reports)}, completed {len(self.completed)}, "
            f"failed {len(self.failed)}, lost {len(self.lost)}, "
            f"duplicated {len(self.duplicated)}"
        )

    def problems(self) -> list[str]:
        """Every breach of the scenario-independent invariants, one line each."""
        found = [f"lost: {r.lost()}: {r.describe()}" for r in self.lost]
        found += [f"duplicated: {r.duplicated()}: {r.describe()}" for r in self.duplicated]
        found += [
            f"inconsistent: {r.inconsistent()}: {r.describe()}"
            for r in self.reports
            if r.inconsistent()
        ]
        found += [f"executed but never sent: {job_id}" for job_id in self.strays]
        return found

    def explain(self) -> str:
        return "\n".join([self.line(), *self.problems()])


def _fetch(stack: Stack, job_id: str) -> dict[str, Any] | None:
    try:
        response = requests.get(f"{stack.url}/jobs/{job_id}", timeout=QUICK)
    except requests.RequestException:
        return None
    if response.status_code != 200:
        return None
    return check(JobResponseSchema, response.json(), f"GET /jobs/{job_id}")


def _settle(stack: Stack, timeout: float) -> None:
    """Wait (bounded) until no execution is still open in a live process."""

    def quiet() -> bool:
        open_runs: dict[tuple[str, int], int] = defaultdict(int)
        for record in stack.executions():
            open_runs[(record["job"], record["pid"])] += 1 if record["event"] == "start" else -1
        return not any(n > 0 and psutil.pid_exists(pid) for (_, pid), n in open_runs.items())

    with contextlib.suppress(AssertionError):
        wait_until(quiet, timeout, interval=0.1)


def collect(
    stack: Stack, scenario: str, jobs: list[dict[str, Any]], timeout: float, started: float
) -> Verdict:
    """Poll every job until final (bounded by ``timeout``), then compare with the log."""
    finals: dict[str, dict[str, Any] | None] = {j["id"]: None for j in jobs}
    deadline = time.monotonic() + timeout
    while True:
        for job_id, final in finals.items():
            if final is None or final["status"] not in FINAL:
                finals[job_id] = _fetch(stack, job_id)
        if all(f is not None and f["status"] in FINAL for f in finals.values()):
            break
        if time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    _settle(stack, 10.0)
    # The last look: a job must still be final (and, say, not have run again meanwhile).
    for job_id in finals:
        finals[job_id] = _fetch(stack, job_id) or finals[job_id]
    records = stack.executions()
    runs: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        runs[record["job"]].append(record)
    answered = runner_successes(stack)
    reports = [
        JobReport(
            j["id"],
            str(j["payload"]["data"].get("tag", "")),
            finals[j["id"]],
            runs[j["id"]],
            sorted(answered.get(j["id"], [])),
        )
        for j in jobs
    ]
    sent = set(finals)
    strays = sorted({r["job"] for r in records} - sent)
    return Verdict(scenario, reports, strays, time.monotonic() - started)
