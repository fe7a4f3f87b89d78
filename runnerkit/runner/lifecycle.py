"""The lifecycle of one runner instance, as each gunicorn worker runs it: the scheduler's ticks.

Every gunicorn worker runs the same APScheduler job. Each tick a worker tries the instance's
leader lease without blocking (:class:`~runnerkit.state.LeaderLease`); only the holder
registers and heartbeats, and the runnerId it gets is kept in the state directory, so when
the holder dies, or stalls past its lease, the next worker to take the lease carries on as
the same runner. Deregistration belongs to the instance, not to a worker:
it happens once, after the gunicorn master has exited (a small sentinel process watches it),
or in the master's ``on_exit`` hook when ``deploy/gunicorn.conf.py`` is used.

Here: starting a worker's part (the instance's files, the sentinel, the schedule), the tick,
the leader's housekeeping (outbox delivery, orphaned jobs, pruning) and a worker's drain.
Registration, heartbeats, the SIGTERM handler and deregistration have modules of their own
(:mod:`~runnerkit.runner.registration`, :mod:`~runnerkit.runner.heartbeat`,
:mod:`~runnerkit.runner.draining`, :mod:`~runnerkit.runner.deregistration`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import psutil
from apscheduler.executors.base import BaseExecutor, run_job
from apscheduler.job import Job
from apscheduler.schedulers.background import BackgroundScheduler

from runnerkit.errors import make_envelope
from runnerkit.runner.deregistration import forget_dead_masters, instance_key, masters_dir
from runnerkit.runner.draining import DEFAULT_GRACEFUL_S, DRAIN_POLL_S
from runnerkit.runner.heartbeat import Heartbeats
from runnerkit.runner.job_threads import JobThreads
from runnerkit.runner.jobforge import JobForgeClient
from runnerkit.runner.lease import lease_expiry_s
from runnerkit.runner.serving import Serving
from runnerkit.runner.state import InstanceState
from runnerkit.runner.statefiles import read_json, secure_directory, write_json_atomic
from runnerkit.service.filelocks import FileLock
from runnerkit.service.process import instance_owner, under_gunicorn
from runnerkit.service.write_failures import STORAGE

log = logging.getLogger("runnerkit.lifecycle")

#: How often the leader delivers the outbox and recovers jobs of dead workers.
HOUSEKEEPING_S = 0.5
#: How often the leader prunes the ledger and the outbox.
PRUNE_EVERY_S = 300.0


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


class Lifecycle(Heartbeats):
    """The per-worker half of the instance lifecycle (see the module docstring).

    Handed the pieces of the runner it uses, never the Runner itself: the instance
    ``state``, ``serving`` for what changes while it serves (settings, draining, the
    outbox), and the runner's name, version, id, documents and result delivery.
    """

    def __init__(
        self,
        state: InstanceState,
        *,
        serving: Serving,
        name: str,
        version: str,
        runner_id: Callable[[], str],
        registration_document: Callable[[], dict[str, Any]],
        health: Callable[[], tuple[int, dict[str, Any]]],
        deliver_result: Callable[[str, str, dict[str, Any]], None],
    ) -> None:
        settings = serving.settings
        self._serving = serving
        self._name = name
        self._version = version
        self._runner_id = runner_id
        self._registration_document = registration_document
        self._health = health
        self._deliver_result = deliver_result
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
        settings = self._serving.settings
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
        settings = self._serving.settings
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
        forget_dead_masters()
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
                    "service": self._name,
                    "version": self._version,
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
        while not self._serving.draining:
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
        deadline = self._serving.drain_deadline or time.monotonic() + DEFAULT_GRACEFUL_S
        me, main = threading.current_thread(), threading.main_thread()
        outbox = self._serving.outbox
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
        if replaced or self._serving.outbox is None or not self.state.leader.check():
            return  # a replaced ledger has nothing to deliver or recover that can be trusted
        try:
            self._recover_orphans()
            self._serving.outbox.deliver_due()
            now = time.monotonic()
            if now - self._pruned_at > PRUNE_EVERY_S:
                self._pruned_at = now
                self.state.ledger.prune()
                self._serving.outbox.prune()
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
                service=self._name,
                retryable=True,
                operation="execute",
                correlation_id=correlation_id or None,
            )
            body = {
                "jobId": job_id,
                "success": False,
                "error": error,
                "executionTimeMs": 0,
                "runnerId": self._runner_id(),
            }
            if not self.state.ledger.fail_orphan(job_id, owner, 500, body):
                continue  # redelivered and claimed by a live worker meanwhile
            self._deliver_result(job_id, correlation_id, body)
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
