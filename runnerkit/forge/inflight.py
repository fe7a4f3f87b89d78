"""Executions in flight: claims handed to the send pool, answers queued and recorded.

The tick's one write transaction (:meth:`InFlight._match`) first records the answers that
arrived since the last tick (:meth:`~.job_store.JobStore.finish_in` for each: completed,
retrying, failed), then claims new jobs (:mod:`.matching`), which are handed to a thread
pool of DISPATCH_THREADS so slow jobs do not block others. A send thread
(:meth:`InFlight._send`) only talks HTTP (:mod:`.sending`): it queues the answer and wakes
the dispatcher, whose next tick records it. An answer stays "in flight" (the sweep leaves
its job alone) until it is recorded; answers arriving after the dispatcher stopped are
recorded by their own send thread, one transaction each.

:class:`InFlight` is one part of :class:`~.dispatcher.Dispatcher` (a base class, so the
per-job path costs no extra lookup); its state is set up in ``Dispatcher.__init__``.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

from . import db
from .jobs import Claim, Clock, Outcome
from .matching import Matching
from .sending import Sending
from .settings import ForgeSettings

log = logging.getLogger("runnerkit.forge.dispatcher")


class InFlight(Sending, Matching):
    """Executions between their claim and their recorded answer (a part of the Dispatcher)."""

    # Set up in Dispatcher.__init__.
    settings: ForgeSettings
    dispatched: int
    _stop: threading.Event
    _pool: ThreadPoolExecutor | None
    _in_flight: dict[str, int]
    _busy: int
    _answers: list[tuple[Claim, Outcome]]
    _in_flight_lock: threading.Lock
    _record_lock: threading.Lock

    def wake(self, everywhere: bool = False) -> None:
        """Look for work now (the Dispatcher's, which knows how to reach it)."""
        raise NotImplementedError

    @property
    def in_flight(self) -> dict[str, int]:
        with self._in_flight_lock:
            return dict(self._in_flight)

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
                with self.db.tx(pipeline=True) as conn:
                    # In a pipeline (PostgreSQL), writes whose answer nobody reads now go
                    # out with the next read, the BEGIN with the first and the COMMIT with
                    # the last writes: a tick costs a few round trips, not a few per job.
                    # Each step stamps its time after its first read, which the turn
                    # precedes: a slot freed by a result another worker recorded meanwhile
                    # is taken after that result.
                    now = self._record_in(conn, answers) if answers else Clock()
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

    # -- answers ------------------------------------------------------------------------------

    def _record_in(self, conn: db.Conn, answers: list[tuple[Claim, Outcome]]) -> Clock:
        """Record ``answers`` in the caller's transaction; the time they were recorded at
        (taken once their rows are read: in the transaction's turn)."""
        # The answered jobs' rows in one query; a job answered twice in this batch (an
        # earlier attempt's late answer) is read again after the first answer changed it.
        rows = db.get_jobs(conn, list({claim.job_id for claim, _outcome in answers}))
        now = Clock()
        fresh: set[str] = set()
        for claim, outcome in answers:
            job_id = claim.job_id
            row: db.Row | Literal[False] | None = False
            if job_id not in fresh:
                fresh.add(job_id)
                row = rows.get(job_id)
            result = self.jobs.finish_in(
                conn, job_id, claim.attempt, outcome, now, runner_id=claim.runner_id, row=row
            )
            _log_answer(claim, outcome, result)
        return now

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
