"""The dispatcher: sends waiting jobs to runners and turns their answers into job outcomes.

Every forge process runs one dispatcher thread, but only the holder of the ``flock`` on
``<DB_PATH>.dispatcher.lock`` dispatches. Under gunicorn with several workers exactly one
dispatches; when its process dies the kernel frees the lock and another worker's next tick
takes over. On PostgreSQL the lock is a session-level advisory lock instead
(:class:`~.db.leadership.PgLeadership`), held on a connection of its own, so one process
of all the forge instances on the database dispatches; new jobs reach it with ``NOTIFY``.
The holder records a heartbeat in the database (``meta.dispatcher``), which ``/health`` reads.
Under the forge's worker class with sibling workers alive, the holder's process takes no new
connections while it dispatches (:mod:`runnerkit.service.new_connections`): its siblings serve
the API, and its GIL is left to the dispatcher and its send threads.

The holder keeps time with ``time.monotonic()`` (see :class:`~.jobs.Clock`): a step of the
system clock neither stops its housekeeping nor makes every runner look silent.

One tick of the holder:

1. housekeeping (:meth:`JobStore.sweep`): offline runners, requeues, overdue attempts,
   expired jobs; once a minute, finished jobs past HISTORY_RETENTION_HOURS and assertions
   past ASSERTION_RETENTION_HOURS (or their expiresAt) are deleted (:meth:`JobStore.prune`,
   :meth:`JobStore.prune_assertions`); queued jobs whose type no runner lists fail after
   UNMATCHED_JOB_EXPIRY_S (:meth:`JobStore.expire_unmatched`);
2. one write transaction for everything else: first the runners' answers that arrived
   since the last tick (:meth:`JobStore.finish_in` for each: completed, retrying, failed),
   then matching: waiting jobs (queued, or retrying with their next-attempt time come) by
   priority desc then age; each goes to a healthy or degraded runner with a capability
   listing the job type in ``supportedJobTypes`` and a free slot under that capability's
   ``maxConcurrency`` (counted from the forge's own records, in the same transaction, so the
   slots just freed count), the runner with the fewest held slots first. Every job taken is
   claimed in that transaction (:meth:`JobStore.claim_all`). A job no runner can take stays
   queued;
3. sending, after the commit: ``POST <runner base>/execute`` with a RunnerExecutionRequest,
   in a thread pool of DISPATCH_THREADS so slow jobs do not block others, with
   ``X-Correlation-Id``, the RUNNER_TOKEN as a bearer token and, with SIGNING_SECRET, the
   ControlPlane webhook signature (:mod:`runnerkit.signing`); a new connection whose peer
   address ALLOWED_RUNNER_NETWORKS refuses is closed unused (:mod:`.targets`), and an answer
   longer than MAX_ANSWER_BYTES fails the attempt (ANSWER_TOO_LARGE) unread. Jobs with
   ``timeoutMs`` above ASYNC_THRESHOLD_MS are sent with ``Prefer: respond-async``; a 202
   means the result will arrive on ``POST /jobs/<id>/result``. A send thread only talks
   HTTP: it queues the answer and wakes the dispatcher, whose next tick records it. An
   answer stays "in flight" (the sweep leaves its job alone) until it is recorded; answers
   arriving after :meth:`stop` are recorded by their own send thread.

This module holds the lock holder's loop: leadership, the tick and the cadence of its
chores, the heartbeat, the clock, wake-ups. The rest of :class:`Dispatcher` comes from its
base classes, one concern a module (base classes rather than objects it calls, so the
per-job path costs no extra lookup): :mod:`.inflight` (the tick's transaction, the send
pool, answers queued and recorded), :mod:`.matching` (which job goes to which runner),
:mod:`.sending` (one attempt's request, and its answer made an Outcome) and
:mod:`.connections` (the HTTP to runners).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from runnerkit.service import new_connections
from runnerkit.service.filelocks import FileLock

from . import db
from . import jobs as jobs_module
from .inflight import InFlight
from .job_store import JobStore
from .jobs import Claim, Clock, Outcome
from .referee import Referee
from .settings import ForgeSettings
from .targets import TargetPolicy
from .wakeup import Wakeup

log = logging.getLogger("runnerkit.forge.dispatcher")

#: How often the lock holder records its heartbeat (at most; and at least 4 times per
#: DISPATCHER_STALE_MS) and runs housekeeping.
HEARTBEAT_EVERY_S = 1.0
SWEEP_EVERY_S = 0.25
#: How often the holder deletes finished jobs past HISTORY_RETENTION_HOURS (a batch a time).
PRUNE_EVERY_S = 60.0
#: A non-holder tries to take the lock this often (wake-ups do not hurry it).
FOLLOWER_POLL_S = 0.25
#: How often the holder confirms it may leave new connections to its sibling workers.
YIELD_EVERY_S = 1.0


#: A gap this long between two ticks means the process was frozen, not merely slow.
STALL_S = 5.0

#: A change of the wall clock against the monotonic one this large between two ticks is a
#: step of the system clock (NTP slews by 0.5 ms a second at most).
CLOCK_STEP_S = 1.0

#: While the previous dispatcher still holds the wake-up channel, poll this often.
WAKE_RETRY_S = 0.01


class Dispatcher(InFlight):
    """The background dispatcher of one forge app (see the module docstring)."""

    def __init__(self, jobs: JobStore, settings: ForgeSettings, *, instance_id: str) -> None:
        self.jobs = jobs
        self.db = jobs.db
        self.settings = settings
        self.instance_id = instance_id
        #: Who dispatches: on SQLite one process of this host (a ``flock`` beside the file);
        #: on PostgreSQL one process of every forge instance on the database (an advisory
        #: lock, :class:`~.db.leadership.PgLeadership`).
        self.lock: Any = FileLock(f"{settings.db_path}.dispatcher.lock")
        self.leadership: Any = None
        if getattr(self.db, "postgres", False):
            from .db.leadership import PgLeadership

            self.leadership = self.lock = PgLeadership(
                self.db,  # type: ignore[arg-type]
                notify_gap_s=float(settings.notify_gap_ms) / 1000.0,
            )
        self.dispatched = 0
        #: Requests sent again on a new connection, their kept-alive one found closed.
        self.reconnects = 0
        self._leader_since: float | None = None
        self._yielding = False  # new connections left to sibling workers
        self._last_tick: float | None = None
        self._clock_offset: float | None = None  # time.time() - time.monotonic() last tick
        self._stop = threading.Event()
        self._wake = threading.Event()
        # Any forge process may take a new job; the dispatching one may be another.
        self._wakeup = Wakeup(settings.db_path)
        self._thread: threading.Thread | None = None
        self._pool: ThreadPoolExecutor | None = None
        #: job id → attempt of every execution sent whose answer is not recorded yet.
        self._in_flight: dict[str, int] = {}
        self._busy = 0  # executions being sent (a requeued job may briefly have two)
        #: Answers received, oldest first, waiting for the dispatcher's next transaction.
        self._answers: list[tuple[Claim, Outcome]] = []
        self._in_flight_lock = threading.Lock()
        self._record_lock = threading.Lock()  # one thread records answers at a time
        self._capabilities: dict[str, tuple[str, list[tuple[str, int, frozenset[str]]]]] = {}
        #: chore → the time.monotonic() reading of its last run.
        self._last_run: dict[str, float] = {}
        self._http = threading.local()  # each send thread's connections, by runner
        self.targets = TargetPolicy(str(settings.allowed_runner_networks))
        self.max_answer = int(settings.max_answer_bytes)
        self.referee = Referee(self.db, settings)  # checks every answer against its contract

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def leader(self) -> bool:
        """Whether this dispatcher holds the dispatcher lock now."""
        return self.lock.held

    def start(self) -> None:
        """Start the dispatcher thread (idempotent)."""
        if self.running:
            return
        os.makedirs(os.path.dirname(os.path.abspath(self.settings.db_path)), exist_ok=True)
        self._stop.clear()
        self._pool = ThreadPoolExecutor(
            max_workers=int(self.settings.dispatch_threads), thread_name_prefix="forge-dispatch"
        )
        self._thread = threading.Thread(target=self._run, name="forge-dispatcher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop ticking, give the lock up, and stop taking new executions.

        Executions already sent finish in the background (their HTTP timeouts bound them);
        their outcomes are still recorded.
        """
        self._stop.set()
        self.wake()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        if thread is None or not thread.is_alive():
            self._resign()
        else:  # a tick is stuck; the thread gives the lock up when it ends
            log.warning("dispatcher thread did not stop within %.1f s", timeout)
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        # Answers that arrived before the stop; later ones are recorded by their send thread.
        self.record_answers()

    def wake(self, everywhere: bool = False) -> None:
        """Look for work now instead of at the next poll, in whichever process dispatches.

        ``everywhere``: the dispatcher may run in another forge instance on the same
        PostgreSQL database, so NOTIFY it, unless the datagram found it listening in this
        instance (SQLite has one host: the datagram reaches it). A NOTIFY is a transaction
        of its own: skipping it when the dispatcher is local saves one per submitted job.
        """
        self._wake.set()
        if not self._wakeup.send() and everywhere and self.leadership is not None:
            # Nobody of this instance listens, so the dispatcher is another instance's.
            self.leadership.notify()

    def remote_channel(self) -> str | None:
        """The channel to NOTIFY within a write (PostgreSQL), when the dispatcher looks like
        another instance's: this process's last wake-up found no local listener.

        A NOTIFY sent by the statement that queues new jobs costs no transaction of its own;
        :meth:`wake` then only sends the datagram. Should the guess be wrong (the lock moved
        here meanwhile), the datagram reaches the new holder all the same. None too while
        this process's last NOTIFY is under NOTIFY_GAP_MS old: :meth:`wake` then leaves it
        to the notifier, which sends one for them all when the gap ends.
        """
        if self.leadership is None or self._wakeup.heard is not False:
            return None
        return self.leadership.carried()

    def _wait(self, timeout: float) -> bool:
        """Sleep until woken (from this process or another) or ``timeout`` passes; True when
        woken."""
        if self._wake.is_set() or self._stop.is_set():
            return True
        if self._wakeup.listen():
            # Wakes in this process send a datagram too, so one select serves both.
            if self.leadership is None:
                return self._wakeup.wait(timeout)
            if self._wakeup.wait(timeout, also=self.leadership.fileno):
                self.leadership.consume()
                return True
            return False
        # The previous dispatcher has not closed the channel yet: poll briefly.
        return self._wake.wait(min(timeout, WAKE_RETRY_S))

    def _resign(self) -> None:
        if self.lock.held:
            log.info("dispatcher %s gives up the dispatcher lock", self.instance_id)
        self._wakeup.close()
        self.lock.release()
        self._leader_since = None
        self._take_connections_again()

    def _yield_connections(self) -> None:
        """While it dispatches, this process leaves new connections to its sibling workers
        (:mod:`runnerkit.service.new_connections`), so its requests do not compete with the
        dispatcher and its send threads for the GIL. Asked again every second: should the
        siblings be gone, it takes connections again."""
        if self._due("yield", time.monotonic(), YIELD_EVERY_S):
            self._follow_yielding(new_connections.yield_to_siblings(True))

    def _take_connections_again(self) -> None:
        """No longer dispatching: take a share of new connections again."""
        self._last_run.pop("yield", None)
        self._follow_yielding(new_connections.yield_to_siblings(False))

    def _follow_yielding(self, yielding: bool) -> None:
        if yielding != self._yielding:
            self._yielding = yielding
            log.info(
                "dispatching process %d %s",
                os.getpid(),
                "leaves new connections to its sibling workers"
                if yielding
                else "takes its share of new connections",
            )

    def _run(self) -> None:
        """Tick when woken or every poll interval; between ticks, keep the heartbeat fresh.

        A poll longer than the heartbeat's cadence (a quiet deployment that relies on
        wake-ups) would otherwise let ``/health`` call a working dispatcher stale, and a
        follower would wait that long to take a lost lock over.
        """
        poll = float(self.settings.poll_interval_ms) / 1000.0
        beat = self._heartbeat_every()
        step = min(poll, beat)
        woken, next_tick, outage = True, 0.0, False
        while not self._stop.is_set():
            try:
                if self.lock.acquire():
                    if self._leader_since is None:
                        self._leader_since = time.monotonic()
                        log.info("dispatcher %s took the dispatcher lock", self.instance_id)
                        self._take_over()
                        woken = True
                    self._yield_connections()
                    if woken or time.monotonic() >= next_tick:
                        self.tick()
                        next_tick = time.monotonic() + poll
                    else:
                        self.beat()
                elif self._leader_since is not None:
                    # The lock is lost (its connection cut): stop listening, so a wake-up
                    # from this instance goes to whichever instance dispatches now.
                    log.info("dispatcher %s lost the dispatcher lock", self.instance_id)
                    self._wakeup.close()
                    self._take_connections_again()
                    self._leader_since = None
                if outage:
                    log.warning("dispatcher: the database is back")
                outage = False
            except db.UNAVAILABLE as exc:
                if not outage:  # once per outage, not once per poll
                    log.warning("dispatcher: the database is unavailable (%s); retrying", exc)
                outage = True
            except Exception:
                log.exception("dispatcher tick failed")
            if self.lock.held:
                woken = self._wait(step)
            else:
                # New work is the holder's to see: a follower only tries for the lock now and
                # then, not at every wake-up (each try is a query on PostgreSQL; under load
                # this process's requests wake it once per job).
                woken = self._stop.wait(max(step, FOLLOWER_POLL_S))
            self._wake.clear()
        self._resign()

    def _take_over(self) -> None:
        """What a new lock holder does first about the clock.

        The previous holder's record gives the wall clock's offset from the monotonic one
        then (the same clock for every process of one machine until it restarts: the record
        names the boot), so the first tick sees a step taken since. Retries waiting longer
        than their own delay (a backward step nobody saw) are cut to it.
        """
        self._clock_offset = None
        with self.db.connection() as conn:
            record = db.get_meta(conn, "dispatcher")
        if isinstance(record, dict) and isinstance(record.get("ts"), int | float):
            mono = jobs_module.monotonic_of(record)
            if mono is not None:
                self._clock_offset = float(record["ts"]) - mono
        capped = self.jobs.cap_retry_waits()
        if capped:
            log.warning("%d retries waited longer than their delay; rescheduled", capped)

    # -- one tick ----------------------------------------------------------------------------

    def tick(self) -> int:
        """One round as the lock holder: heartbeat, housekeeping, matching; jobs sent.

        Its cadence runs on the monotonic clock (:class:`Clock` ``mono``): a step of the
        system clock neither stops housekeeping nor runs it all at once.
        """
        now = Clock()
        mono = now.mono
        self._alive(mono)
        offset = now.ts - mono  # the wall clock's offset from the monotonic one
        if self._clock_offset is not None and abs(offset - self._clock_offset) > CLOCK_STEP_S:
            step = offset - self._clock_offset
            log.warning("the system clock stepped %+.1f s", step)
            self.jobs.follow_clock_step(step)
        self._clock_offset = offset
        self.beat(now)
        if self._due("sweep", mono, SWEEP_EVERY_S):
            grace = self._leader_since if self._leader_since is not None else mono
            summary = self.jobs.sweep(in_flight=self.in_flight, grace_from=grace)
            if any(summary.values()):
                log.info("housekeeping: %s", summary)
        if self._due("prune", mono, PRUNE_EVERY_S):
            pruned = self.jobs.prune(now)
            if pruned:
                log.info("housekeeping: deleted %d finished jobs past their retention", pruned)
            pruned = self.jobs.prune_assertions(now)
            if pruned:
                log.info("housekeeping: deleted %d assertions past their retention", pruned)
        expiry = float(self.settings.unmatched_job_expiry_s)
        every = max(SWEEP_EVERY_S, min(PRUNE_EVERY_S, expiry / 4.0))
        if expiry > 0 and self._due("unmatched", mono, every):
            failed = self.jobs.expire_unmatched(now)
            if failed:
                log.warning("housekeeping: %d jobs failed, no runner takes their type", failed)
        return self._match()

    def _heartbeat_every(self) -> float:
        """Seconds between heartbeat records: well inside DISPATCHER_STALE_MS."""
        return min(HEARTBEAT_EVERY_S, float(self.settings.dispatcher_stale_ms) / 4000.0)

    def _alive(self, mono: float) -> None:
        """Note that the holder runs at ``mono``; a long gap since the last note is a stall."""
        if self._last_tick is not None and mono - self._last_tick > STALL_S:
            # This process was frozen (SIGSTOP, a paused VM): runners could not reach it, so
            # give them a full heartbeat window again before calling any of them offline.
            log.warning(
                "dispatcher stalled for %.1f s; runners get a fresh grace period",
                mono - self._last_tick,
            )
            self._leader_since = mono
        self._last_tick = mono

    def beat(self, now: Clock | None = None) -> None:
        """Record the dispatcher's heartbeat (what ``/health`` reads) when one is due."""
        if now is None:
            now = Clock()
            self._alive(now.mono)
        if self._due("heartbeat", now.mono, self._heartbeat_every()):
            self._heartbeat(now)

    def _due(self, chore: str, mono: float, every: float) -> bool:
        """Whether ``chore`` is due at ``mono`` (it then counts as run)."""
        last = self._last_run.get(chore)
        if last is not None and mono - last < every:
            return False
        self._last_run[chore] = mono
        return True

    def _heartbeat(self, now: Clock) -> None:
        with self.db.tx() as conn:
            db.set_meta(
                conn,
                "dispatcher",
                {
                    "instance": self.instance_id,
                    "pid": os.getpid(),
                    "ts": now.ts,
                    "at": now.z,
                    "mono": now.mono,
                    "boot": jobs_module.BOOT_ID,
                    "notified": self.leadership.notified if self.leadership is not None else 0,
                    "yields": self._yielding,
                },
            )
