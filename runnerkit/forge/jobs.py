"""The forge's job vocabulary: what the job store, the dispatcher, the API and the referee
share about jobs and about time.

Job statuses, the longest wait the forge schedules, which runner errors are refusals, an
attempt's :class:`Outcome` and the :class:`Claim` the dispatcher sends; and the forge's time:
a :class:`Clock` reading (the wall clock for records, the monotonic clock for intervals),
whether another process's monotonic reading compares with ours (:func:`monotonic_of`), and
what this process times on the monotonic clock (runner :class:`Sightings`, attempt
:class:`Leases`). The work itself is :class:`~.job_store.JobStore`'s; these names live
below it so that the dispatcher, the API and the store's own parts share them without
importing the store.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from . import db

#: Statuses a job can still leave.
ACTIVE_STATUSES = ("pending", "queued", "retrying", "running")
#: Statuses a job never leaves.
FINAL_STATUSES = ("completed", "failed", "cancelled")

#: The longest wait the forge schedules (100 years): a retry delay, a lease, a read timeout.
#: The contract bounds none of timeoutMs, backoffMs or maxBackoffMs; longer values are cut to
#: this, which every clock, timestamp and socket timeout here can still represent.
MAX_WAIT_MS = 100 * 365.25 * 24 * 3600 * 1000.0

#: Error codes with which runnerkit runners refuse a job without running it.
REFUSAL_CODES = frozenset(
    {"JOB_ALREADY_RUNNING", "CAPACITY_EXCEEDED", "QUEUE_FULL", "WORKER_BUSY", "SHUTTING_DOWN"}
)

#: A job row, or a copy of one with some columns replaced.
RowLike = db.Row | Mapping[str, Any]


def is_refusal(envelope: Mapping[str, Any]) -> bool:
    """Whether a runner's error says it did not run the job (it may be sent again as it was).

    runnerkit's own refusal codes, and any RATE_LIMITED answer (HTTP 429 means the request
    was not processed).
    """
    return envelope.get("code") in REFUSAL_CODES or envelope.get("category") == "RATE_LIMITED"


class Clock:
    """One instant as epoch seconds, a contract timestamp and a monotonic reading.

    ``ts`` and ``z`` are what the forge stores and shows (wall-clock time, for people and the
    contracts); ``mono`` (``time.monotonic()``, one clock for every process of the machine)
    is what the forge measures intervals with, so a step of the system clock neither stops
    its housekeeping nor makes every runner look silent. An instant given as ``ts`` is as
    far from now on the monotonic clock as on the wall clock.
    """

    __slots__ = ("mono", "ms", "ts", "z")

    def __init__(self, ts: float | None = None) -> None:
        if ts is None:
            self.ts, self.mono = time.time(), time.monotonic()
        else:
            self.ts, self.mono = ts, time.monotonic() + (ts - time.time())
        # What datetime.fromtimestamp(ts, UTC) reads (microseconds, rounded half to even),
        # without a datetime: the forge makes several Clocks per job.
        fraction, whole = math.modf(self.ts)
        micros = round(fraction * 1e6)
        second = int(whole) + (micros >= 1_000_000) - (micros < 0)
        millis = micros % 1_000_000 // 1000
        self.z = f"{_second_text(second)}.{millis:03d}Z"
        #: ``z`` read back as epoch seconds (whole milliseconds, as ``truth.epoch(z)``).
        self.ms = (second * 1000 + millis) / 1000


_SECOND: tuple[int, str] = (0, "1970-01-01T00:00:00")


def _second_text(second: int) -> str:
    """``YYYY-MM-DDTHH:MM:SS`` of a Unix second (UTC), the last one kept: most Clocks fall
    in the same second as the one before."""
    global _SECOND
    cached = _SECOND
    if cached[0] == second:
        return cached[1]
    text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    _SECOND = (second, text)
    return text


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as handle:
            return handle.read().strip()
    except OSError:
        return ""


#: This machine's boot: ``time.monotonic()`` readings of two processes compare only within
#: one ('' where the system does not say, and then never).
BOOT_ID = _boot_id()


def monotonic_of(record: Mapping[str, Any]) -> float | None:
    """The ``mono`` reading of a record another process wrote with its ``boot``, if it was
    taken on this machine since it started (so comparable with ``time.monotonic()``)."""
    mono = record.get("mono")
    if not BOOT_ID or record.get("boot") != BOOT_ID or isinstance(mono, bool):
        return None
    if not isinstance(mono, int | float) or not 0 <= mono <= time.monotonic():
        return None
    return float(mono)


class Sightings:
    """When this process saw each runner's latest heartbeat, on the monotonic clock.

    A heartbeat is stored with its wall-clock time (``last_seen``), which a clock step moves.
    The sweep notes the monotonic time at which it first sees each new ``last_seen`` and
    counts a runner's silence from there: a heartbeat is seen within one sweep of its
    arrival, and a runner seen for the first time (just registered, or the dispatcher just
    took over) gets a full window.
    """

    def __init__(self) -> None:
        self._seen: dict[str, tuple[float, float]] = {}  # id → (last_seen, monotonic then)

    def silent(
        self, runners: Sequence[db.Row], now: Clock, grace_from: float, missed: int
    ) -> list[str]:
        """Ids of ``runners`` silent for more than ``missed`` heartbeat intervals, counted
        from ``grace_from`` (monotonic) at the earliest."""
        seen: dict[str, tuple[float, float]] = {}
        silent: list[str] = []
        for runner in runners:
            runner_id, stored = runner["id"], float(runner["last_seen"])
            previous = self._seen.get(runner_id)
            at = previous[1] if previous is not None and previous[0] == stored else now.mono
            seen[runner_id] = (stored, at)
            window = float(runner["heartbeat_interval_ms"]) * missed / 1000.0
            if now.mono - max(at, grace_from) > window:
                silent.append(runner_id)
        self._seen = seen
        return silent


class Leases:
    """Each attempt's lease on this process's monotonic clock.

    The database keeps a lease as wall-clock time (``lease_until``: a forge that restarts
    finds it there, and people read it). This process counts a lease from when it wrote it,
    or else from when it first read it, for at most one lease length: a forward step of the
    clock does not expire every lease at once, and a backward one does not stretch them.
    """

    def __init__(self) -> None:
        self._due: dict[tuple[str, int, float], float] = {}  # (job, attempt, lease) → due

    def note(self, job_id: str, attempt: int, until: float, due_mono: float) -> None:
        """A lease this process just wrote: ``until`` (stored) is due at ``due_mono``."""
        self._due[(job_id, attempt, until)] = due_mono

    def passed(self, row: RowLike, now: Clock, longest_s: float) -> bool:
        """Whether the lease of ``row`` (holding one) has passed."""
        until = float(row["lease_until"])
        key = (row["id"], int(row["attempts"]), until)
        due = self._due.get(key)
        if due is None:
            due = now.mono + min(max(0.0, until - now.ts), longest_s)
            self._due[key] = due
        return now.mono > due

    def keep(self, job_ids: set[str]) -> None:
        """Forget the leases of jobs that hold no slot any more."""
        if len(self._due) > len(job_ids):
            self._due = {k: v for k, v in self._due.items() if k[0] in job_ids}


@dataclass
class Outcome:
    """What one attempt produced, whichever way it arrived."""

    success: bool
    data: Any = None
    has_data: bool = False
    error: dict[str, Any] | None = None
    execution_ms: float | None = None
    #: The runner answered 202: the job runs on and its result will be POSTed later.
    accepted: bool = False


Pick = tuple[db.Row, db.Row, str]


@dataclass(frozen=True)
class Claim:
    """One attempt the dispatcher has taken: everything needed to send it."""

    job_id: str
    attempt: int
    request: dict[str, Any]
    runner_id: str
    runner_name: str
    base_url: str
    capability_id: str
    asynchronous: bool
    correlation_id: str


Claims = list[Claim]


def correlation_id_for(job_id: str, request: Mapping[str, Any]) -> str:
    """The job's own correlationId, else a uuid derived from its id (stable across retries)."""
    given = request.get("metadata", {}).get("correlationId")
    return str(given) if given else str(uuid.uuid5(uuid.NAMESPACE_URL, f"jobforge:job:{job_id}"))
