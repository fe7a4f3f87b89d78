"""Registration, heartbeats, draining and deregistration of one runner instance.

Every gunicorn worker runs the same APScheduler job. Each tick a worker tries the instance's
leader lease without blocking (:class:`~runnerkit.state.LeaderLease`); only the holder
registers and heartbeats, and the runnerId it gets is kept in the state directory, so when
the holder dies, or stalls past its lease, the next worker to take the lease carries on as
the same runner. Deregistration belongs to the instance, not to a worker:
it happens once, after the gunicorn master has exited (a small sentinel process watches it),
or in the master's ``on_exit`` hook when ``deploy/gunicorn.conf.py`` is used.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from types import FrameType
from typing import TYPE_CHECKING, Any

import psutil
import requests
from apscheduler.executors.base import BaseExecutor, run_job
from apscheduler.job import Job
from apscheduler.schedulers.background import BackgroundScheduler
from marshmallow import ValidationError

from runnerkit.contracts import (
    CONTRACT_VERSION,
    RunnerRegistrationResponseSchema,
    format_version,
    utc_now,
)
from runnerkit.errors import make_envelope
from runnerkit.runner.execution import JobThreads
from runnerkit.runner.jobforge import JobForgeClient
from runnerkit.runner.lease import LeaderLease, lease_expiry_s
from runnerkit.runner.state import InstanceState
from runnerkit.runner.statefiles import read_json, secure_directory, write_json_atomic
from runnerkit.runner.storage import STORAGE_ERRORS
from runnerkit.service.filelocks import FileLock
from runnerkit.service.logs import configure_logging
from runnerkit.service.metric_families import metrics
from runnerkit.service.process import instance_owner, under_gunicorn
from runnerkit.service.write_failures import STORAGE

if TYPE_CHECKING:
    from runnerkit.runner.app import Runner

log = logging.getLogger("runnerkit.lifecycle")

#: Slow retry for a registration JobForge refused (4xx): a human has to change something.
REFUSED_RETRY_S = 60.0
#: How often the leader delivers the outbox and recovers jobs of dead workers.
HOUSEKEEPING_S = 0.5
#: How often the leader prunes the ledger and the outbox.
PRUNE_EVERY_S = 300.0
#: gunicorn's default graceful timeout, for a drain whose worker does not say its own.
DEFAULT_GRACEFUL_S = 30.0
#: How often a draining worker looks whether its jobs are done and the outbox delivered.
DRAIN_POLL_S = 0.1
_REGISTRATION_SCHEMA = RunnerRegistrationResponseSchema()


def instance_key(owner: tuple[int, float]) -> str:
    return f"{owner[0]}@{owner[1]:.2f}"


def masters_dir() -> str:
    return os.path.join(tempfile.gettempdir(), "runnerkit", "masters")


def _forget_dead_masters() -> None:
    """Remove the entries of masters that are gone.

    A master served with ``deploy/gunicorn.conf.py`` removes its own entry in ``on_exit``;
    one started without it (plain ``gunicorn app:app``) cannot, and its entry would stay.
    """
    with contextlib.suppress(OSError):
        for name in os.listdir(masters_dir()):
            stem, _, ext = name.partition(".")
            if ext == "json" and stem.isdigit() and not psutil.pid_exists(int(stem)):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(masters_dir(), name))


def spawn_detached(argv: list[str]) -> subprocess.Popen[bytes]:
    """Start ``argv`` in its own session, and reap it when it exits.

    Workers starting together may each start a sentinel; all but one find the instance
    watched and exit at once. Without a wait, each would stay a zombie child of its worker
    for the worker's whole life. The waiting thread costs nothing while the child runs.
    """
    proc = subprocess.Popen(
        argv,
        start_new_session=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        close_fds=True,
    )
    threading.Thread(target=proc.wait, name="runnerkit-reaper", daemon=True).start()
    return proc


class DaemonThreadExecutor(BaseExecutor):
    """An APScheduler executor running the lifecycle's jobs on reusable daemon threads.

    APScheduler's default executor is a ``concurrent.futures`` pool, which Python shuts down
    when the interpreter starts to exit: in a draining worker whose main thread is done while
    asynchronous jobs still run, every tick then failed with "cannot schedule new futures
    after shutdown" (a traceback each time) and nothing delivered the outbox. Daemon threads
    keep the lifecycle running until the process really ends, and never hold its exit.
    """

    def __init__(self) -> None:
        super().__init__()
        self._threads = JobThreads(name="runnerkit-lifecycle")

    def _do_submit_job(self, job: Job, run_times: list[datetime]) -> None:
        def call() -> None:
            try:
                events = run_job(job, job._jobstore_alias, run_times, self._logger.name)
            except BaseException as exc:  # noqa: BLE001 - handed to APScheduler's own report
                self._run_job_error(job.id, exc, exc.__traceback__)
            else:
                self._run_job_success(job.id, events)

        self._threads.submit(call)


class Lifecycle:
    """The per-worker half of the instance lifecycle (see the module docstring)."""

    def __init__(self, runner: Runner, state: InstanceState) -> None:
        settings = runner.settings
        self.runner = runner
        self.state = state
        self.client = JobForgeClient(
            settings.jobforge_url,
            token=settings.runner_token,
            connect_timeout_s=settings.http_connect_timeout_ms / 1000.0,
            read_timeout_s=settings.http_read_timeout_ms / 1000.0,
        )
        self.client.runner_token = self._runner_token
        self.owner = instance_owner()
        self.key = instance_key(self.owner)
        self.scheduler: BackgroundScheduler | None = None
        self._tick_s = 0.0
        self._attempt = 0
        self._next_register_at = 0.0
        self._condition = ""
        self._processes: dict[int, psutil.Process] = {}
        self._tick_lock = threading.Lock()
        self._pruned_at = time.monotonic()
        #: Some write of this worker's start failed (a full disk): retried every tick.
        self._boot_pending = False
        self._heartbeat_due = 0.0
        self._drain: threading.Thread | None = None

    # -- start ----------------------------------------------------------------------

    def start(self) -> None:
        """Publish the instance, make sure a sentinel watches it, start ticking.

        None of the writes may stop the worker from booting: on a full or broken state
        directory each failure is logged once, readiness turns 503 naming it, and every tick
        tries again until all are done (gunicorn halts on a worker that fails to boot).
        """
        settings = self.runner.settings
        self._boot_pending = not self._finish_boot()
        scheduler_log = logging.getLogger("apscheduler")
        scheduler_log.setLevel(logging.WARNING)
        # Its lines as runnerkit's (JSON), not Python's last-resort plain text on stderr.
        scheduler_log.handlers = list(logging.getLogger("runnerkit").handlers)
        scheduler_log.propagate = False
        self.scheduler = BackgroundScheduler(
            daemon=True,
            executors={"default": DaemonThreadExecutor()},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
        )
        self._tick_s = self._tick_for(settings.heartbeat_interval_ms)
        self.state.leader.expiry_s = lease_expiry_s(settings.heartbeat_interval_ms)
        # The lease is renewed on a job of its own, so a slow heartbeat or delivery (an HTTP
        # call waiting for its timeout) never looks like a stalled leader.
        self.scheduler.add_job(
            self.renew_lease,
            "interval",
            seconds=self._tick_s,
            id="runnerkit-lease",
            next_run_time=datetime.now(UTC),
        )
        self.scheduler.add_job(
            self.tick,
            "interval",
            seconds=self._tick_s,
            id="runnerkit-lifecycle",
            next_run_time=datetime.now(UTC),
        )
        self.scheduler.add_job(
            self.housekeeping,
            "interval",
            seconds=HOUSEKEEPING_S,
            id="runnerkit-housekeeping",
            next_run_time=datetime.now(UTC),
        )
        self.scheduler.start()
        if under_gunicorn() and self._drain is None:
            # Not a daemon: the worker's process waits for it to finish a drain.
            self._drain = threading.Thread(target=self._watch, name="runnerkit-drain", daemon=False)
            self._drain.start()

    def _finish_boot(self) -> bool:
        """The instance's files of this worker's start; True once every one is written."""
        done = self.state.ensure_directory()
        for what, write in (
            ("instance.json", self._publish_instance),
            ("the masters entry", self._publish_master),
            ("the sentinel lock", self._ensure_sentinel),
        ):
            try:
                write()
            except OSError as exc:
                done = False
                if STORAGE.failed(what, exc):
                    log.warning("could not write %s (%s); retrying every tick", what, exc)
                continue
            STORAGE.recovered(what)
        return done

    def _publish_instance(self) -> None:
        """``instance.json``: what the sentinel and the master's hook need to deregister."""
        settings = self.runner.settings
        write_json_atomic(
            self.state.instance_path,
            {
                "instance": self.key,
                "ownerPid": self.owner[0],
                "jobforgeUrl": settings.jobforge_url,
                "token": settings.runner_token,
                "connectTimeoutS": settings.http_connect_timeout_ms / 1000.0,
                "readTimeoutS": settings.http_read_timeout_ms / 1000.0,
            },
        )
        os.chmod(self.state.instance_path, 0o600)

    def stop(self) -> None:
        if self.scheduler is not None and self.scheduler.running:
            self.scheduler.shutdown(wait=False)
        self.state.leader.release()

    @staticmethod
    def _tick_for(interval_ms: float) -> float:
        """Ticks come often enough that a takeover happens well within one interval."""
        return max(0.05, min(1.0, interval_ms / 1000.0 / 5.0))

    def _publish_master(self) -> None:
        """Tell the master's ``on_exit`` hook where this instance's state lives."""
        if not under_gunicorn():
            return
        secure_directory(os.path.dirname(masters_dir()))
        secure_directory(masters_dir())
        _forget_dead_masters()
        path = os.path.join(masters_dir(), f"{self.owner[0]}.json")
        entry = read_json(path) or {}
        dirs = entry.get("stateDirs", [])
        if self.state.directory not in dirs:
            write_json_atomic(
                path,
                {
                    "instance": self.key,
                    "stateDirs": [*dirs, self.state.directory],
                    # So the master's own lines (it never loads the app) name the runner.
                    "service": self.runner.name,
                    "version": self.runner.version,
                },
            )

    def _ensure_sentinel(self) -> None:
        probe = FileLock(os.path.join(self.state.directory, "sentinel.lock"))
        if not probe.acquire():
            return  # a sentinel holds it: this instance is watched
        probe.release()
        with contextlib.suppress(OSError):
            spawn_detached(
                [
                    sys.executable,
                    "-m",
                    "runnerkit.runner.sentinel",
                    self.state.directory,
                    self.key,
                    str(self.owner[0]),
                ]
            )

    # -- the tick -------------------------------------------------------------------

    def tick(self) -> None:
        """One scheduler tick: take or keep leadership; if leader, do what is due.

        A draining worker keeps ticking, and leading, until its drain is done (see
        :meth:`drain`): the instance heartbeats and delivers its outbox while any of its
        workers drains.
        """
        if self._boot_pending:
            self._boot_pending = not self._finish_boot()
        identity = self.current_identity()
        if identity is not None:
            # Every worker ticks at the registered interval's pace, not only the leader, so
            # a takeover happens well within one interval.
            self._retick(identity["heartbeatIntervalMs"])
        try:
            leading = self.state.leader.acquire()
        except OSError as exc:  # the state directory is unwritable: no leader here
            self._note("lease-failed", logging.ERROR, "cannot take the leader lease: %s", exc)
            return
        if not leading:
            # Only the leader writes the identity: one that lost the lease (it could not renew
            # it on a full disk) must not keep its unsaved copy, nor its failure to save it.
            self.state.forget_unsaved_identity()
            return
        with self._tick_lock:
            try:
                self._lead()
            except Exception:
                log.exception("lifecycle tick failed")

    def _watch(self) -> None:
        """Wait for SIGTERM, then drain; return at once when the worker ends without one
        (a ``max_requests`` recycle, a crash: not the instance's end). Started with the
        worker, not from the signal handler (starting a thread there could deadlock on
        threading's own locks) nor from a tick (the worker may be gone before the next one).
        """
        main = threading.main_thread()
        while not self.runner.draining:
            if not main.is_alive():
                return
            time.sleep(DRAIN_POLL_S)
        self.drain()

    def drain(self) -> None:
        """A draining worker's last duty (a thread that is not a daemon, so the process waits
        for it): once its jobs are done, wait until the instance's outbox is delivered, then
        stop ticking and let the lease go. Bounded by the drain's deadline (gunicorn's
        graceful timeout less a margin), so the master never has to kill the worker.

        Its jobs are done when the main thread has finished serving (gunicorn answered every
        request in flight) and no other thread that holds the process's exit is left (the
        asynchronous jobs' threads). Outbox rows a deadline leaves undelivered are counted
        by the deregistration's one warning (:func:`deregister_instance`).
        """
        deadline = self.runner.drain_deadline or time.monotonic() + DEFAULT_GRACEFUL_S
        me, main = threading.current_thread(), threading.main_thread()
        outbox = self.runner.outbox
        try:
            while time.monotonic() < deadline:
                if main.is_alive() or any(
                    t is not me and t is not main and not t.daemon for t in threading.enumerate()
                ):
                    time.sleep(DRAIN_POLL_S)
                    continue
                if outbox is None or self._ledger_count(outbox.pending) == 0:
                    break
                time.sleep(DRAIN_POLL_S)
        finally:
            self.stop()

    def renew_lease(self) -> None:
        """Leader only: renew the lease (its own scheduler job; see :meth:`start`).

        A renewal that fails (a full disk) is logged once; the lease then expires and another
        worker takes over, which this one sees at its next look and steps down.
        """
        try:
            self.state.leader.renew()
        except OSError as exc:
            self._note("lease-failed", logging.ERROR, "cannot renew the leader lease: %s", exc)

    def housekeeping(self) -> None:
        """Every worker: check the state's storage (the ledger is the instance's own file;
        writes work again after a failure). Leader only: deliver due outbox rows, finish
        jobs orphaned by dead workers, prune.

        A separate scheduler job from the heartbeat, so a slow delivery cannot delay one.
        """
        try:
            replaced = self.state.check_storage()
        except Exception:
            log.exception("state storage check failed")
            replaced = False
        if replaced or self.runner.outbox is None or not self.state.leader.check():
            return  # a replaced ledger has nothing to deliver or recover that can be trusted
        try:
            self._recover_orphans()
            self.runner.outbox.deliver_due()
            now = time.monotonic()
            if now - self._pruned_at > PRUNE_EVERY_S:
                self._pruned_at = now
                self.state.ledger.prune()
                self.runner.outbox.prune()
        except Exception:
            log.exception("lifecycle housekeeping failed")

    def _recover_orphans(self) -> None:
        """A worker died mid-job: tell JobForge the asynchronous ones failed (retryably)."""
        for job_id, is_async, correlation_id, owner in self.state.ledger.orphans():
            if not is_async:
                self.state.ledger.forget(job_id, owner)
                continue
            error = make_envelope(
                "RUNTIME_ERROR",
                "WORKER_DIED",
                "The worker running this job stopped before it finished",
                service=self.runner.name,
                retryable=True,
                operation="execute",
                correlation_id=correlation_id or None,
            )
            body = {
                "jobId": job_id,
                "success": False,
                "error": error,
                "executionTimeMs": 0,
                "runnerId": self.runner.runner_id,
            }
            if not self.state.ledger.fail_orphan(job_id, owner, 500, body):
                continue  # redelivered and claimed by a live worker meanwhile
            self.runner.executor.deliver_result(job_id, correlation_id, body)
            log.warning("job %s was orphaned by a dead worker; reported as failed", job_id)

    def _lead(self) -> None:
        identity = self.current_identity()
        now = time.time()
        if identity is None:
            if now >= self._next_register_at:
                self.register()
            return
        if now >= max(identity.get("nextHeartbeatAt", 0.0), self._heartbeat_due):
            self.heartbeat(identity)

    def _retick(self, interval_ms: float) -> None:
        tick = self._tick_for(interval_ms)
        self.state.leader.expiry_s = lease_expiry_s(interval_ms)
        if self.scheduler is not None and abs(tick - self._tick_s) > 1e-6:
            self._tick_s = tick
            for job in ("runnerkit-lifecycle", "runnerkit-lease"):
                self.scheduler.reschedule_job(job, trigger="interval", seconds=tick)

    def _runner_token(self) -> str:
        """The runnerToken JobForge gave this instance ('' when none: the shared token)."""
        identity = self.current_identity()
        return str(identity.get("runnerToken") or "") if identity else ""

    def current_identity(self) -> dict[str, Any] | None:
        """This instance's registration, ignoring one left behind by an earlier instance."""
        identity = self.state.identity()
        if identity and identity.get("instance") == self.key and identity.get("runnerId"):
            return identity
        return None

    def _note(self, condition: str, level: int, message: str, *args: Any) -> None:
        """Log once per change of condition, not once per retry."""
        if condition != self._condition:
            self._condition = condition
            log.log(level, message, *args)

    def register(self) -> None:
        document = self.runner.registration_document()
        try:
            response = self.client.register(document)
        except requests.RequestException as exc:
            self._backoff()
            self._note(
                "unreachable",
                logging.WARNING,
                "JobForge unreachable at %s (%s); retrying registration with backoff",
                ", ".join(self.client.base_urls),
                type(exc).__name__,
            )
            return
        if response.status_code >= 500:
            self._backoff()
            self._note(
                f"register-{response.status_code}",
                logging.WARNING,
                "JobForge answered %s to registration; retrying with backoff",
                response.status_code,
            )
            return
        if response.status_code >= 400:
            self._refused(response)
            return
        try:
            answer = _REGISTRATION_SCHEMA.load(response.json())
        except (ValueError, ValidationError):
            self._backoff()
            self._note(
                "bad-answer",
                logging.ERROR,
                "JobForge's registration answer is not a RunnerRegistrationResponse",
            )
            return
        identity = {
            "instance": self.key,
            "runnerId": answer["runnerId"],
            "registeredAt": answer["registeredAt"],
            "heartbeatIntervalMs": answer["heartbeatIntervalMs"],
            "nextHeartbeatAt": time.time() + answer["heartbeatIntervalMs"] / 1000.0,
        }
        runner_token = _runner_token_in(response)
        if runner_token:  # the file is written with mode 0600
            identity["runnerToken"] = runner_token
        self.state.save_identity(identity)
        self._attempt = 0
        self._next_register_at = 0.0
        self._note(
            "registered",
            logging.INFO,
            "registered with JobForge as runner %s (heartbeat every %s ms)",
            answer["runnerId"],
            answer["heartbeatIntervalMs"],
        )

    def _backoff(self) -> None:
        cap = self.runner.settings.registration_backoff_max_ms / 1000.0
        delay = min(cap, 0.5 * 2**self._attempt) * random.uniform(0.5, 1.0)
        self._attempt = min(self._attempt + 1, 32)
        self._next_register_at = time.time() + delay

    def _refused(self, response: requests.Response) -> None:
        try:
            envelope = response.json().get("error", response.json())
        except ValueError:
            envelope = {}
        theirs = envelope.get("contractVersion") if isinstance(envelope, dict) else None
        self._next_register_at = time.time() + max(
            REFUSED_RETRY_S, self.runner.settings.registration_backoff_max_ms / 1000.0
        )
        self._note(
            f"refused-{response.status_code}",
            logging.ERROR,
            "JobForge refused the registration (%s %s: %s); runner contract version %s, "
            "JobForge contract version %s; retrying every %.0f s",
            response.status_code,
            envelope.get("code", "") if isinstance(envelope, dict) else "",
            envelope.get("message", response.text[:200]) if isinstance(envelope, dict) else "",
            format_version(CONTRACT_VERSION),
            format_version(theirs) if isinstance(theirs, dict) else "unknown",
            REFUSED_RETRY_S,
        )

    def heartbeat(self, identity: dict[str, Any]) -> None:
        body = self.heartbeat_body(identity["runnerId"])
        try:
            response = self.client.heartbeat(body, str(identity.get("runnerToken") or ""))
        except requests.RequestException as exc:
            self._note(
                "heartbeat-unreachable",
                logging.WARNING,
                "heartbeat to %s failed (%s)",
                ", ".join(self.client.base_urls),
                type(exc).__name__,
            )
            self._save_heartbeat_time(identity)
            return
        if response.status_code in (401, 403, 404):
            # JobForge forgot us (it restarted), or no longer takes our credential (the
            # runner was replaced, or registered before JobForge issued runnerTokens):
            # register again at once.
            self._note(
                "forgotten",
                logging.WARNING,
                "JobForge answered %s to the heartbeat of runner %s; registering again",
                response.status_code,
                identity["runnerId"],
            )
            self.state.clear_identity()
            self._next_register_at = 0.0
            self.register()
            return
        if response.status_code >= 400:
            self._note(
                f"heartbeat-{response.status_code}",
                logging.WARNING,
                "JobForge answered %s to a heartbeat",
                response.status_code,
            )
        else:
            metrics().heartbeat_timestamp.labels(identity["runnerId"]).set(time.time())
            self._note(
                "heartbeating", logging.INFO, "heartbeating as runner %s", identity["runnerId"]
            )
        self._save_heartbeat_time(identity)

    def _save_heartbeat_time(self, identity: dict[str, Any]) -> None:
        """Schedule the next heartbeat on the interval's grid, so ticks add no drift."""
        interval = identity["heartbeatIntervalMs"] / 1000.0
        now = time.time()
        due = identity.get("nextHeartbeatAt", now) + interval
        if due <= now:
            due = now + interval
        # Also kept here: with a full disk the file keeps the old time, and every tick would
        # heartbeat (and fail to save) again.
        self._heartbeat_due = due
        try:
            self.state.save_identity({**identity, "nextHeartbeatAt": due})
        except OSError as exc:
            self.state.storage.failed(exc)

    def heartbeat_body(self, runner_id: str) -> dict[str, Any]:
        """The RunnerHeartbeat: status, jobs across all workers, instance metrics.

        ``degraded`` while the leader cannot write the instance's files (a full disk): it
        still serves, and JobForge's dashboard should say why its jobs fail.
        """
        _, health = self.runner.health()
        status = health["status"] if health["status"] in ("healthy", "degraded") else "unhealthy"
        if status == "healthy" and STORAGE.problems():
            status = "degraded"
        return {
            "runnerId": runner_id,
            "timestamp": utc_now(),
            "status": status,
            "activeJobs": self.state.slots.total_in_use(),
            "queuedJobs": self._ledger_count(self.runner.queued_jobs),
            "metrics": self.metrics(),
        }

    @staticmethod
    def _ledger_count(count: Callable[[], int]) -> int:
        """A count read from the ledger, 0 when it cannot be read: a heartbeat saying the
        runner is unhealthy (its ``state`` check) beats no heartbeat at all."""
        try:
            return count()
        except STORAGE_ERRORS:
            return 0

    def metrics(self) -> dict[str, float]:
        """CPU and memory of the instance's processes (%), and jobs completed per second."""
        cpu = 0.0
        rss = 0
        try:
            owner = psutil.Process(self.owner[0])
            processes = [owner, *owner.children(recursive=True)]
        except psutil.Error:
            processes = [psutil.Process()]
        live: dict[int, psutil.Process] = {}
        for proc in processes:
            cached = self._processes.get(proc.pid, proc)
            try:
                cpu += cached.cpu_percent(interval=None)
                rss += cached.memory_info().rss
            except psutil.Error:
                continue
            live[proc.pid] = cached
        self._processes = live
        total_memory = psutil.virtual_memory().total or 1
        completed = self._ledger_count(
            lambda: self.state.ledger.completed_since(time.time() - 60.0)
        )
        return {
            "cpuUsage": round(min(100.0, cpu / (psutil.cpu_count() or 1)), 2),
            "memoryUsage": round(min(100.0, 100.0 * rss / total_memory), 3),
            "jobThroughput": round(completed / 60.0, 4),
        }

    def readiness_item(self) -> dict[str, Any]:
        registered = self.current_identity() is not None
        item: dict[str, Any] = {
            "name": "registration",
            "status": "healthy" if registered else "unhealthy",
            "responseTimeMs": 0,
        }
        urls = self.client.base_urls
        if not registered:
            item["message"] = "not registered with JobForge yet"
        elif self.client.unreachable:
            # Registered, but the last call reached none of the forges: jobs already
            # dispatched still run; results wait in the outbox.
            item["status"] = "degraded"
            item["message"] = "JobForge unreachable at " + ", ".join(urls)
        elif len(urls) > 1:
            item["message"] = f"JobForge at {self.client.base_url} (of {len(urls)} URLs)"
        return item


# -- shutdown -----------------------------------------------------------------------------


def install_drain_handler(runner: Runner) -> None:
    """On SIGTERM, turn ready off and refuse new jobs before gunicorn's own handler runs.

    gunicorn then stops accepting, lets in-flight requests finish (up to its graceful
    timeout) and exits; a request that still reaches the app meanwhile gets 503. The
    lifecycle's drain (:meth:`Lifecycle.drain`) has until the graceful timeout less a margin
    (gunicorn's handler is a method of the worker, whose settings say it).
    """
    if threading.current_thread() is not threading.main_thread():
        return
    previous = signal.getsignal(signal.SIGTERM)
    cfg = getattr(getattr(previous, "__self__", None), "cfg", None)
    graceful = getattr(cfg, "graceful_timeout", None)
    graceful_s = float(graceful) if isinstance(graceful, int | float) else DEFAULT_GRACEFUL_S
    budget_s = graceful_s - max(0.5, min(2.0, 0.2 * graceful_s))

    def on_term(signum: int, frame: FrameType | None) -> None:
        if not runner.draining:
            runner.drain_deadline = time.monotonic() + budget_s
        runner.draining = True
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)

    if getattr(previous, "__runnerkit_drain__", False):
        return
    on_term.__runnerkit_drain__ = True  # type: ignore[attr-defined]
    signal.signal(signal.SIGTERM, on_term)
    signal.siginterrupt(signal.SIGTERM, False)


def deregister_instance(state_dir: str, key: str, lock_timeout_s: float = 15.0) -> bool:
    """DELETE the instance's runner from JobForge, once, whoever calls first.

    An ``flock`` on ``leader.lock`` makes the sentinel and the master hook take turns; the
    identity is removed after a successful DELETE, so a second caller finds nothing to do.
    The caller also takes the leader lease, waiting for a worker still leading to let go
    (it would heartbeat after the DELETE, and JobForge's 404 would make it register again),
    and taking it over from one that is stopped: that one steps down if it ever resumes.
    """
    instance = read_json(os.path.join(state_dir, "instance.json"))
    if not instance or instance.get("instance") != key or not instance.get("jobforgeUrl"):
        return False
    state_lock = FileLock(os.path.join(state_dir, "leader.lock"))
    if not state_lock.acquire(blocking=True, timeout=lock_timeout_s):
        log.warning("could not take the leader lock to deregister; deregistering anyway")
    lease = LeaderLease(state_dir, expiry_s=lock_timeout_s)
    deadline = time.monotonic() + lock_timeout_s
    while not lease.acquire(force=time.monotonic() >= deadline):
        if time.monotonic() >= deadline + 1.0:
            log.warning("could not take the leader lease to deregister; deregistering anyway")
            break
        time.sleep(0.05)
    try:
        identity_path = os.path.join(state_dir, "identity.json")
        identity = read_json(identity_path)
        if not identity or identity.get("instance") != key or not identity.get("runnerId"):
            return False
        left = undelivered(state_dir)
        if left:
            log.warning(
                "deregistering with %d outbox message(s) (results, progress, assertions) "
                "not delivered: the workers' drain ended first; they stay in %s",
                left,
                state_dir,
            )
        client = JobForgeClient(
            instance["jobforgeUrl"],
            token=instance.get("token", ""),
            connect_timeout_s=float(instance.get("connectTimeoutS", 3.0)),
            read_timeout_s=float(instance.get("readTimeoutS", 10.0)),
        )
        for attempt in range(3):
            try:
                response = client.deregister(
                    identity["runnerId"], str(identity.get("runnerToken") or "")
                )
            except requests.RequestException as exc:
                log.warning("deregistration failed (%s)", type(exc).__name__)
                time.sleep(0.5 * (attempt + 1))
                continue
            if response.status_code < 300 or response.status_code == 404:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(identity_path)
                log.info("deregistered runner %s", identity["runnerId"])
                return True
            log.warning("JobForge answered %s to deregistration", response.status_code)
            return False
        return False
    finally:
        lease.close()
        state_lock.release()


def undelivered(state_dir: str) -> int:
    """Rows the instance's outbox still has to deliver (0 when it cannot be read)."""
    path = os.path.join(state_dir, "ledger.sqlite3")
    if not os.path.exists(path):
        return 0
    try:
        with contextlib.closing(
            sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1.0)
        ) as conn:
            (count,) = conn.execute("SELECT COUNT(*) FROM outbox WHERE dead = 0").fetchone()
    except sqlite3.Error:
        return 0
    return int(count)


def _runner_token_in(response: requests.Response) -> str:
    """``runnerToken`` of a registration answer (not part of the contract schema, so it is
    read beside it); '' from a JobForge that issues none."""
    try:
        token = response.json().get("runnerToken")
    except (ValueError, AttributeError):
        return ""
    return token if isinstance(token, str) else ""


def on_master_exit(master_pid: int | None = None) -> None:
    """gunicorn ``on_exit`` hook: deregister every runner instance this master served."""
    pid = os.getpid() if master_pid is None else master_pid
    path = os.path.join(masters_dir(), f"{pid}.json")
    entry = read_json(path)
    if not entry:
        return
    # The master never loaded the app, so nothing has set up runnerkit's log lines here.
    configure_logging(
        str(entry.get("service") or "runnerkit"),
        str(entry.get("version") or ""),
        "text" if os.environ.get("RUNNERKIT_LOG_FORMAT", "").strip().lower() == "text" else "json",
        os.environ.get("RUNNERKIT_LOG_LEVEL", "INFO"),
    )
    for state_dir in entry.get("stateDirs", []):
        deregister_instance(state_dir, entry["instance"])
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
