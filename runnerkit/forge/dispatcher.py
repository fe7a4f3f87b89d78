"""The dispatcher: sends waiting jobs to runners and turns their answers into job outcomes.

Every forge process runs one dispatcher thread, but only the holder of the ``flock`` on
``<DB_PATH>.dispatcher.lock`` dispatches. Under gunicorn with several workers exactly one
dispatches; when its process dies the kernel frees the lock and another worker's next tick
takes over. On PostgreSQL the lock is a session-level advisory lock instead
(:class:`~.postgres.PgLeadership`), held on a connection of its own, so one process of all
the forge instances on the database dispatches; new jobs reach it with ``NOTIFY``. The
holder records a heartbeat in the database (``meta.dispatcher``), which ``/health`` reads.

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
"""

from __future__ import annotations

import http.client
import json
import logging
import math
import os
import select
import socket
import ssl
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

from marshmallow import ValidationError

from runnerkit._version import __version__
from runnerkit.contracts import ErrorEnvelopeSchema
from runnerkit.errors import ValidationFailed
from runnerkit.service.filelocks import FileLock
from runnerkit.service.jsonbody import check_json_limits
from runnerkit.service.signing import sign

from . import db
from . import jobs as jobs_module
from .answers import Answer, AnswerHeaders
from .job_store import JobStore
from .jobs import Claim, Clock, Outcome
from .referee import Referee
from .settings import ForgeSettings
from .targets import TargetPolicy
from .wakeup import Wakeup

log = logging.getLogger("runnerkit.forge.dispatcher")

#: A runner's response headers (``get`` ignores case).
Headers = AnswerHeaders | http.client.HTTPMessage | Mapping[str, str]

_ENVELOPE_SCHEMA = ErrorEnvelopeSchema()

#: How often the lock holder records its heartbeat (at most; and at least 4 times per
#: DISPATCHER_STALE_MS) and runs housekeeping.
HEARTBEAT_EVERY_S = 1.0
SWEEP_EVERY_S = 0.25
#: How often the holder deletes finished jobs past HISTORY_RETENTION_HOURS (a batch a time).
PRUNE_EVERY_S = 60.0
#: A non-holder tries to take the lock this often (at least).
FOLLOWER_POLL_S = 0.25


def execution_request(claim: Claim) -> dict[str, Any]:
    """The RunnerExecutionRequest of one attempt."""
    request = claim.request
    metadata: dict[str, Any] = {"correlationId": claim.correlation_id}
    user_id = request["metadata"].get("userId")
    if user_id is not None:
        metadata["userId"] = user_id
    return {
        "jobId": claim.job_id,
        "moduleId": claim.runner_name,
        "capabilityId": claim.capability_id,
        "payload": request["payload"]["data"],
        "timeoutMs": request["timeoutMs"],
        "metadata": metadata,
    }


def _retry_after_header(headers: Headers) -> float | None:
    value = (headers.get("Retry-After") or "").strip()
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


class _ConnectFailed(Exception):
    """No connection to the runner could be made (the cause says why)."""


class _TargetRefused(Exception):
    """The connection reached an address runners may not have (``args[0]``)."""


class _NotTaken(Exception):
    """The runner closed the connection without reading the request (the cause says how)."""


def _await_answer(conn: http.client.HTTPConnection, read_s: float) -> None:
    """Wait for the first byte of the answer on a reused plain connection.

    :class:`_NotTaken` when the runner had closed the connection without reading the request:
    a peer that closed its socket resets the connection when the request reaches it, at
    once or just after the end of the stream shows. An end of the stream with no reset is
    a runner that read the request and then closed (a worker that died running the job):
    that is left to ``getresponse`` (``RemoteDisconnected``, the attempt's failure).
    """
    sock = conn.sock
    if sock is None or isinstance(sock, ssl.SSLSocket):  # TLS records cannot be peeked
        return
    poller = select.poll()
    poller.register(sock, select.POLLIN | select.POLLERR | select.POLLHUP)
    if not poller.poll(read_s * 1000.0):
        raise TimeoutError("no answer")
    try:
        if sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b"":
            return  # the answer is arriving
    except BlockingIOError:
        return
    except OSError as exc:  # reset: the request was not read
        raise _NotTaken() from exc
    deadline = time.monotonic() + RESET_WAIT_S
    while True:
        error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            raise _NotTaken() from OSError(error, os.strerror(error))
        if time.monotonic() >= deadline:
            return
        time.sleep(RESET_WAIT_S / 10)


class _AnswerTooLarge(Exception):
    """The runner's answer is longer than MAX_ANSWER_BYTES (``args[0]`` says how it showed)."""


def _connection(base_url: str, timeout: float) -> http.client.HTTPConnection:
    parts = urlsplit(base_url)
    host, port = parts.hostname or "", parts.port
    conn: http.client.HTTPConnection
    if parts.scheme == "https":
        conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=_tls())
    else:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
    conn.response_class = Answer  # headers read without the email package
    return conn


def _peer(conn: http.client.HTTPConnection) -> str:
    """The IP address a connection's socket is connected to ('' when unknown)."""
    try:
        return str(conn.sock.getpeername()[0]) if conn.sock is not None else ""
    except (OSError, IndexError):
        return ""


def _path(base_url: str) -> str:
    return urlsplit(base_url).path.rstrip("/")


_TLS: ssl.SSLContext | None = None


def _tls() -> ssl.SSLContext:
    global _TLS
    if _TLS is None:
        try:
            import certifi  # what requests verified with

            _TLS = ssl.create_default_context(cafile=certifi.where())
        except ImportError:
            _TLS = ssl.create_default_context()
    return _TLS


def _dropped(conn: http.client.HTTPConnection) -> bool:
    """Whether an idle keep-alive connection was closed (or sent something unasked)."""
    sock = conn.sock
    if sock is None:
        return True
    try:
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        return bool(poller.poll(0))
    except (OSError, ValueError):
        return True


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


# Made once: ``json.dumps``/``json.loads`` with arguments build a new coder on every call.
_encode = json.JSONEncoder(separators=(",", ":")).encode
_decode = json.JSONDecoder(parse_constant=_reject_constant).decode


#: A gap this long between two ticks means the process was frozen, not merely slow.
STALL_S = 5.0

#: How long a probe's new connection to a runner must stay open to count (see _connects).
PROBE_HOLD_S = 0.25

#: How long a reused connection that ended without an answer is watched for the reset that
#: shows the request reached a closed socket (a round trip, on the failure path only).
RESET_WAIT_S = 0.05

#: A change of the wall clock against the monotonic one this large between two ticks is a
#: step of the system clock (NTP slews by 0.5 ms a second at most).
CLOCK_STEP_S = 1.0

#: While the previous dispatcher still holds the wake-up channel, poll this often.
WAKE_RETRY_S = 0.01


class Dispatcher:
    """The background dispatcher of one forge app (see the module docstring)."""

    def __init__(self, jobs: JobStore, settings: ForgeSettings, *, instance_id: str) -> None:
        self.jobs = jobs
        self.db = jobs.db
        self.settings = settings
        self.instance_id = instance_id
        #: Who dispatches: on SQLite one process of this host (a ``flock`` beside the file);
        #: on PostgreSQL one process of every forge instance on the database (an advisory
        #: lock, :class:`~.postgres.PgLeadership`).
        self.lock: Any = FileLock(f"{settings.db_path}.dispatcher.lock")
        self.leadership: Any = None
        if getattr(self.db, "postgres", False):
            from .db.leadership import PgLeadership

            self.leadership = self.lock = PgLeadership(self.db)  # type: ignore[arg-type]
        self.dispatched = 0
        #: Requests sent again on a new connection, their kept-alive one found closed.
        self.reconnects = 0
        self._leader_since: float | None = None
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

    @property
    def in_flight(self) -> dict[str, int]:
        with self._in_flight_lock:
            return dict(self._in_flight)

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
        PostgreSQL database, so NOTIFY it too (SQLite has one host: the datagram reaches it).
        """
        self._wake.set()
        self._wakeup.send()
        if everywhere and self.leadership is not None:
            self.leadership.notify()

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
                    if woken or time.monotonic() >= next_tick:
                        self.tick()
                        next_tick = time.monotonic() + poll
                    else:
                        self.beat()
                else:
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
                woken = self._wake.wait(max(step, FOLLOWER_POLL_S))
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
                },
            )

    def _match(self) -> int:
        """Record the answers that arrived, then take waiting jobs: one transaction.

        Returns how many executions were handed to the send pool.
        """
        pool = self._pool
        with self._record_lock:
            with self._in_flight_lock:
                answers = list(self._answers)
                free = int(self.settings.dispatch_threads) - self._busy
            if not answers and (pool is None or free <= 0):
                return 0
            try:
                with self.db.tx() as conn:
                    # Stamped now that the transaction has its turn: a slot freed by a
                    # result another worker recorded meanwhile is taken after that result.
                    now = Clock()
                    self._record_in(conn, answers, now)
                    claims = self._claim_in(conn, now, free) if pool is not None else []
            except Exception:
                if not answers:
                    raise
                # Record the answers one transaction each; a broken one cannot hold the others
                # back (it fails its own job).
                log.exception("recording %d answers with the next claims failed", len(answers))
                self._record_each(answers)
                return 0
            self._recorded(answers)
        sent = 0
        for claim in claims:
            with self._in_flight_lock:
                self._in_flight[claim.job_id] = claim.attempt
                self._busy += 1
            try:
                assert pool is not None
                pool.submit(self._send, claim)
            except RuntimeError:  # the pool was shut down under us: the leases recover them
                with self._in_flight_lock:
                    self._busy -= 1
                    del self._in_flight[claim.job_id]
                break
            sent += 1
            self.dispatched += 1
        return sent

    def _claim_in(self, conn: db.Conn, now: Clock, free: int) -> list[Claim]:
        """Match waiting jobs to free runner slots and claim them (the caller's transaction)."""
        runners = db.dispatchable_runners(conn)
        used = db.slot_counts(conn)
        offers = self._offers(runners, used)
        capacity: dict[str, int] = {}
        for offer in offers:
            for job_type in offer.types if offer.free > 0 else ():
                capacity[job_type] = capacity.get(job_type, 0) + offer.free
        if not capacity:
            return []
        # Per type, at most as many jobs as could start: a backlog of one saturated type
        # must not hide the jobs of another type behind it.
        rows = [
            row
            for job_type, slots in sorted(capacity.items())
            for row in db.eligible_jobs(conn, now=now.ts, limit=min(slots, free), types=[job_type])
        ]
        rows.sort(key=lambda r: (-int(r["priority"]), int(r["seq"])))
        runner_load: dict[str, int] = {}
        for (runner_id, _capability), count in used.items():
            runner_load[runner_id] = runner_load.get(runner_id, 0) + count
        picks: list[jobs_module.Pick] = []
        for row in rows:
            if len(picks) >= free:
                break
            choices = [o for o in offers if o.free > 0 and row["type"] in o.types]
            if not choices:
                continue
            offer = min(choices, key=lambda o: (runner_load.get(o.runner["id"], 0), o.order))
            picks.append((row, offer.runner, offer.capability_id))
            offer.free -= 1
            runner_load[offer.runner["id"]] = runner_load.get(offer.runner["id"], 0) + 1
        return self.jobs.claim_all(conn, picks, now) if picks else []

    def _offers(self, runners: list[db.Row], used: dict[tuple[str, str], int]) -> list[_Offer]:
        """The free slots of every capability of ``runners``, in registration order."""
        offers: list[_Offer] = []
        cache = self._capabilities
        for order, runner in enumerate(runners):
            document = runner["document"]
            cached = cache.get(runner["id"])
            if cached is None or cached[0] != document:
                cached = (document, _capabilities(document))
                cache[runner["id"]] = cached
            for capability_id, limit, types in cached[1]:
                free = limit - used.get((runner["id"], capability_id), 0)
                offers.append(_Offer(runner, capability_id, types, free, order))
        if len(cache) > 4 * len(runners) + 64:  # forget runners long gone
            current = {r["id"] for r in runners}
            for runner_id in [k for k in cache if k not in current]:
                del cache[runner_id]
        return offers

    # -- answers ------------------------------------------------------------------------------

    def _record_in(self, conn: db.Conn, answers: list[tuple[Claim, Outcome]], now: Clock) -> None:
        for claim, outcome in answers:
            result = self.jobs.finish_in(
                conn, claim.job_id, claim.attempt, outcome, now, runner_id=claim.runner_id
            )
            _log_answer(claim, outcome, result)

    def _record_each(self, answers: list[tuple[Claim, Outcome]]) -> None:
        """Record answers one transaction each (the fallback, and after the dispatcher stopped).

        An answer the forge cannot record fails its job (:meth:`JobStore.finish`) instead of
        leaving it running until its lease passes.
        """
        for claim, outcome in answers:
            try:
                result = self.jobs.finish(
                    claim.job_id, claim.attempt, outcome, runner_id=claim.runner_id
                )
                _log_answer(claim, outcome, result)
            except Exception:
                log.exception("recording the answer for job %s failed", claim.job_id)
        self._recorded(answers)

    def _recorded(self, answers: list[tuple[Claim, Outcome]]) -> None:
        """Forget answers just recorded (the oldest ones: only one thread records at a time)."""
        with self._in_flight_lock:
            del self._answers[: len(answers)]
            for claim, _outcome in answers:
                if self._in_flight.get(claim.job_id) == claim.attempt:
                    del self._in_flight[claim.job_id]

    def record_answers(self) -> None:
        """Record every answer that arrived, now, without claiming anything."""
        with self._record_lock:
            with self._in_flight_lock:
                answers = list(self._answers)
            if answers:
                self._record_each(answers)

    # -- one execution -----------------------------------------------------------------------

    def _send(self, claim: Claim) -> None:
        try:
            outcome = self.execute(claim)
        except Exception:
            # A fault of the forge's own: the attempt fails with the reason (its RetryPolicy
            # decides on another), rather than waiting out its lease with nobody listening.
            log.exception("dispatch of job %s failed", claim.job_id)
            outcome = Outcome(
                success=False,
                error=self.jobs.envelope(
                    "INTERNAL_ERROR",
                    "DISPATCH_FAILED",
                    f"The forge failed to send attempt {claim.attempt} of job {claim.job_id} "
                    "(see the forge's log)",
                    retryable=True,
                    correlation_id=claim.correlation_id,
                ),
            )
        # The dispatcher thread records the answer in its next transaction, with the claims
        # that take the slot it frees; after stop() nobody ticks, so record it here.
        with self._in_flight_lock:
            self._answers.append((claim, outcome))
            self._busy -= 1
        if self._stop.is_set():
            self.record_answers()
        self.wake()

    def execute(self, claim: Claim) -> Outcome:
        """Send one attempt to its runner and read the answer (never raises)."""
        raw = _encode(execution_request(claim)).encode()
        headers = {
            "User-Agent": f"runnerkit-forge/{__version__}",
            "Content-Type": "application/json",
            "Accept": "application/json",
            "X-Correlation-Id": claim.correlation_id,
        }
        if claim.asynchronous:
            headers["Prefer"] = "respond-async"
        if self.settings.runner_token:
            headers["Authorization"] = f"Bearer {self.settings.runner_token}"
        if self.settings.signing_secret:
            headers.update(sign(raw, self.settings.signing_secret))
        timeout_ms = min(
            float(claim.request["timeoutMs"]) + float(self.settings.dispatch_margin_ms),
            jobs_module.MAX_WAIT_MS,
        )
        connect_timeout = float(self.settings.connect_timeout_ms) / 1000.0
        url = f"{claim.base_url}/execute"
        try:
            answer = self._post(claim.base_url, raw, headers, connect_timeout, timeout_ms / 1000.0)
        except _ConnectFailed as exc:
            self._suspect(claim.runner_id)
            if isinstance(exc.__cause__, TimeoutError):
                return self._network_failure(claim, f"Connecting to {url} timed out")
            return self._network_failure(claim, f"ConnectionError calling {url}")
        except _TargetRefused as exc:
            self._disable(claim.runner_id, str(exc.args[0]))
            return Outcome(
                success=False,
                error=self.jobs.envelope(
                    "NETWORK_ERROR",
                    "RUNNER_ADDRESS_REFUSED",
                    f"Runner {claim.runner_id} is at {exc.args[0]}, an address runners may "
                    "not have here (RUNNERKIT_FORGE_ALLOWED_RUNNER_NETWORKS); nothing was sent",
                    retryable=True,
                    correlation_id=claim.correlation_id,
                ),
            )
        except _AnswerTooLarge as exc:
            return Outcome(
                success=False,
                error=self.jobs.envelope(
                    "RUNNER_ERROR",
                    "ANSWER_TOO_LARGE",
                    f"Runner {claim.runner_id} answered with {exc.args[0]}, more than "
                    f"RUNNERKIT_FORGE_MAX_ANSWER_BYTES ({self.max_answer} bytes); "
                    "the answer was not read",
                    retryable=False,
                    correlation_id=claim.correlation_id,
                ),
            )
        except TimeoutError:
            return Outcome(
                success=False,
                error=self.jobs.envelope(
                    "TIMEOUT",
                    "DISPATCH_TIMEOUT",
                    f"Runner {claim.runner_id} did not answer within {timeout_ms:g} ms",
                    retryable=True,
                    correlation_id=claim.correlation_id,
                ),
            )
        except (OSError, http.client.HTTPException) as exc:  # the connection broke
            # Only a failed connect takes a runner out of dispatch: one that died (its
            # port closed) is, one that merely broke this answer (or a connection it had
            # kept open) is not.
            if not self._connects(claim.base_url, connect_timeout):
                self._suspect(claim.runner_id)
            name = "SSLError" if isinstance(exc, ssl.SSLError) else "ConnectionError"
            return self._network_failure(claim, f"{name} calling {url}")
        return self.interpret(claim, *answer)

    def _post(
        self, base_url: str, body: bytes, headers: dict[str, str], connect_s: float, read_s: float
    ) -> tuple[int, Headers, bytes]:
        """``POST <base_url>/execute`` on this thread's keep-alive connection to that runner.

        http.client directly (neither requests nor urllib3): the forge sends every job this
        way and their layers above http.client (request preparation, hooks, the proxy and
        netrc look-ups, pool keys, retry objects) cost more CPU than the request itself.
        What those gave that is kept: keep-alive connections (one per send thread and runner),
        a connection the runner closed while idle is not reused, separate connect and read
        timeouts, certificates checked for https (certifi's bundle when it is installed).
        Redirects are not followed and proxies from the environment are not used.

        A runner may close an idle keep-alive connection just as the forge sends on it (its
        idle timeout): when a reused connection shows the runner closed it without reading
        the request (see :meth:`_exchange`), the request is sent once more on a new
        connection (``/execute`` is idempotent per ``jobId`` in any case). Nothing else is
        retried here (an attempt is retried by the job's RetryPolicy): a request the runner
        read before the connection ended may have run, so that is the attempt's failure.

        Raises :class:`_ConnectFailed` when no connection could be made, ``TimeoutError`` when
        the runner did not answer in ``read_s``, ``OSError`` or ``HTTPException`` when the
        connection broke.
        """
        connections: dict[str, http.client.HTTPConnection] = self._http.__dict__.setdefault(
            "connections", {}
        )
        conn = connections.pop(base_url, None)
        if conn is not None and _dropped(conn):
            conn.close()
            conn = None
        if conn is not None:
            try:
                return self._exchange(connections, base_url, conn, body, headers, read_s)
            except _NotTaken:
                self.reconnects += 1
                log.info("a kept-alive connection to %s was closed; sending again", base_url)
        conn = self._connect(base_url, connect_s)
        return self._exchange(connections, base_url, conn, body, headers, read_s, reused=False)

    def _connect(self, base_url: str, connect_s: float) -> http.client.HTTPConnection:
        """A new connection to the runner, its peer checked (see :meth:`_post`)."""
        conn = _connection(base_url, connect_s)
        try:
            conn.connect()
        except OSError as exc:
            conn.close()
            raise _ConnectFailed() from exc
        # The address really connected to, not the one a name resolved to before.
        peer = _peer(conn)
        if not self.targets.allows(peer, conn.host):
            conn.close()
            raise _TargetRefused(f"{conn.host} ({peer})")
        return conn

    def _connects(self, base_url: str, connect_s: float) -> bool:
        """Whether a new TCP connection to the runner can be made, and stays open a moment.

        A runner dying as it is probed may still complete the handshake from its listening
        socket's backlog, then reset it as the socket closes: a connection that is closed
        (or sent anything unasked) within PROBE_HOLD_S counts as failed.
        """
        parts = urlsplit(base_url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            with socket.create_connection((parts.hostname or "", port), connect_s) as sock:
                poller = select.poll()
                poller.register(sock, select.POLLIN | select.POLLHUP | select.POLLERR)
                return not poller.poll(PROBE_HOLD_S * 1000.0)
        except (OSError, ValueError):
            return False

    def _exchange(
        self,
        connections: dict[str, http.client.HTTPConnection],
        base_url: str,
        conn: http.client.HTTPConnection,
        body: bytes,
        headers: dict[str, str],
        read_s: float,
        *,
        reused: bool = True,
    ) -> tuple[int, Headers, bytes]:
        """One request and its answer on ``conn``; kept in ``connections`` if reusable.

        On a ``reused`` connection, :class:`_NotTaken` (its cause the error) when the runner
        closed it without reading the request: the request could not be written, or the
        peer reset the connection (see :func:`_await_answer`). A connection that just ends,
        the runner having read the request (a worker that died running the job), is not:
        that attempt may have run.
        """
        limit = self.max_answer
        try:
            assert conn.sock is not None
            conn.sock.settimeout(read_s)
            try:
                conn.request("POST", _path(base_url) + "/execute", body, headers)
            except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError) as exc:
                if reused:
                    raise _NotTaken() from exc
                raise
            if reused:
                _await_answer(conn, read_s)
            try:
                response = conn.getresponse()
            except http.client.RemoteDisconnected:  # the end of the stream, no reset
                raise
            except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError) as exc:
                if reused:  # reset: the request was not read
                    raise _NotTaken() from exc
                raise
            declared = response.getheader("Content-Length", "")
            if declared.strip().isdigit() and int(declared) > limit:
                raise _AnswerTooLarge(f"Content-Length {int(declared)}")
            data = response.read(limit + 1)
            if len(data) > limit:
                raise _AnswerTooLarge(f"more than {limit} bytes")
        except BaseException:
            conn.close()  # an unread or half-read answer: the connection is not reused
            raise
        if response.will_close or not response.isclosed():
            conn.close()
        else:
            connections[base_url] = conn
        return response.status, response.headers, data

    def _disable(self, runner_id: str, where: str) -> None:
        """A runner at a refused address gets no work until it registers again."""
        with self.db.tx() as conn:
            db.disable_runner_dispatch(conn, runner_id)
        log.warning("runner %s is at %s, a refused address; it gets no work", runner_id, where)

    def _suspect(self, runner_id: str) -> None:
        """A runner that cannot be reached gets no more work until it heartbeats again.

        Otherwise the retry of its job would go straight back to it (it still counts as
        healthy until it misses OFFLINE_AFTER_MISSED heartbeats), while a live runner idles.
        """
        with self.db.tx() as conn:
            db.mark_runner_unreachable(conn, runner_id)
        log.warning("runner %s is unreachable; no work for it until its next heartbeat", runner_id)

    def _network_failure(self, claim: Claim, message: str) -> Outcome:
        return Outcome(
            success=False,
            error=self.jobs.envelope(
                "NETWORK_ERROR",
                "RUNNER_UNREACHABLE",
                message,
                retryable=True,
                correlation_id=claim.correlation_id,
            ),
        )

    def interpret(self, claim: Claim, status: int, headers: Headers, content: bytes) -> Outcome:
        """Turn a runner's HTTP answer (status, headers, body) into an Outcome."""
        try:
            body = _decode(content.decode("utf-8"))
            if isinstance(body, dict):
                settings = self.settings
                check_json_limits(body, settings.max_json_depth, settings.max_json_keys, content)
        except (UnicodeDecodeError, ValueError, RecursionError, ValidationFailed):
            body = None
        if status == 202:
            return Outcome(success=False, accepted=True)
        found = None
        if 200 <= status < 300 and isinstance(body, dict) and body.get("success") is True:
            execution = body.get("executionTimeMs")
            outcome = Outcome(
                success=True,
                data=body.get("data"),
                has_data="data" in body,
                execution_ms=float(execution) if isinstance(execution, int | float) else None,
            )
        else:
            envelope = found = _envelope_in(body)
            retry_after = _retry_after_header(headers)
            if envelope is None:
                envelope = self._envelope_for_status(claim, status, retry_after)
            elif retry_after is not None and "retryAfter" not in envelope:
                envelope = {**envelope, "retryAfter": retry_after}
            outcome = Outcome(success=False, error=envelope)
        # The answer against its contract: recorded when it breaks it (see referee.py).
        return self.referee.answer(claim, status, body, outcome, found)

    def _envelope_for_status(
        self, claim: Claim, status: int, retry_after: float | None
    ) -> dict[str, Any]:
        name = f"Runner {claim.runner_id} answered HTTP {status}"
        category, code, retryable = {
            429: ("RATE_LIMITED", "RATE_LIMITED", True),
            503: ("SERVICE_UNAVAILABLE", "SERVICE_UNAVAILABLE", True),
            408: ("TIMEOUT", "RUNNER_TIMEOUT", True),
            504: ("TIMEOUT", "RUNNER_TIMEOUT", True),
            401: ("AUTHENTICATION_ERROR", "RUNNER_REFUSED_CREDENTIALS", False),
            403: ("AUTHORIZATION_ERROR", "RUNNER_FORBIDDEN", False),
            404: ("RESOURCE_NOT_FOUND", "RUNNER_HAS_NO_EXECUTE", False),
        }.get(status, ("", "", False))
        if not category:
            if 200 <= status < 300:
                category, code, retryable = "RUNNER_ERROR", "INVALID_RUNNER_RESPONSE", True
                name = f"Runner {claim.runner_id} answered {status} without a valid result"
            elif status < 500:
                category, code, retryable = "VALIDATION_ERROR", "RUNNER_REJECTED", False
            else:
                category, code, retryable = "RUNNER_ERROR", "RUNNER_FAILED", True
        return self.jobs.envelope(
            category,
            code,
            name,
            retryable=retryable,
            retry_after=retry_after,
            correlation_id=claim.correlation_id,
        )


def _envelope_in(body: Any) -> dict[str, Any] | None:
    """The contract-valid ErrorEnvelope in a runner's answer (``body.error`` or the body)."""
    if not isinstance(body, dict):
        return None
    for candidate in (body.get("error"), body):
        if isinstance(candidate, dict):
            try:
                loaded: dict[str, Any] = _ENVELOPE_SCHEMA.load(candidate)
            except ValidationError:
                continue
            return loaded
    return None


class _Offer:
    """Free slots of one capability of one runner, during one matching round."""

    __slots__ = ("capability_id", "free", "order", "runner", "types")

    def __init__(
        self, runner: db.Row, capability_id: str, types: frozenset[str], free: int, order: int
    ) -> None:
        self.runner = runner
        self.capability_id = capability_id
        self.types = types
        self.free = free
        self.order = order


def _capabilities(document: str) -> list[tuple[str, int, frozenset[str]]]:
    """(capability id, maxConcurrency, supportedJobTypes) of a registration document."""
    return [
        (
            capability["id"],
            int(capability.get("maxConcurrency", 1)),
            frozenset(capability.get("supportedJobTypes", [])),
        )
        for capability in db.loads(document).get("capabilities", [])
    ]


def _log_answer(claim: Claim, outcome: Outcome, result: str) -> None:
    if log.isEnabledFor(logging.INFO):
        log.info(
            "job %s attempt %d on %s: %s",
            claim.job_id,
            claim.attempt,
            claim.runner_id,
            "success" if outcome.success else ("accepted" if outcome.accepted else "failure"),
            extra={"jobId": claim.job_id, "recorded": result},
        )
