"""Matching: which waiting jobs go to which runner capabilities in one round.

Waiting jobs (queued, or retrying with their next-attempt time come) are taken by priority
desc then age; each goes to a healthy or degraded runner with a capability listing the job
type in ``supportedJobTypes`` and a free slot under that capability's ``maxConcurrency``
(counted from the forge's own records, in the tick's transaction, so the slots its answers
just freed count), the runner with the fewest held slots first. Every job taken is claimed
in that transaction (:meth:`~.job_store.JobStore.claim_all`); a job no runner can take stays
queued.

:class:`Matching` is one part of :class:`~.dispatcher.Dispatcher` (a base class); its state
(the parsed capabilities of each runner's registration) is set up in ``Dispatcher.__init__``.
"""

from __future__ import annotations

from . import db
from . import jobs as jobs_module
from .job_store import JobStore
from .jobs import Claim, Clock


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


class Matching:
    """Matching waiting jobs to free runner slots (a part of the Dispatcher)."""

    # Set up in Dispatcher.__init__.
    jobs: JobStore
    _capabilities: dict[str, tuple[str, list[tuple[str, int, frozenset[str]]]]]

    def _claim_in(self, conn: db.Conn, now: Clock, free: int) -> list[Claim]:
        """Match waiting jobs to free runner slots and claim them (the caller's transaction)."""
        runners, used = db.runners_and_slots(conn)
        fresh = Clock()  # read in the transaction's turn (see InFlight._match)
        if fresh.ts > now.ts:
            now = fresh
        offers = self._offers(runners, used)
        capacity: dict[str, int] = {}
        for offer in offers:
            for job_type in offer.types if offer.free > 0 else ():
                capacity[job_type] = capacity.get(job_type, 0) + offer.free
        if not capacity:
            return []
        # Per type, at most as many jobs as could start: a backlog of one saturated type
        # must not hide the jobs of another type behind it.
        # In dispatch order: priority desc, then age.
        rows = db.waiting_jobs(
            conn,
            now=now.ts,
            limits=[(job_type, min(slots, free)) for job_type, slots in sorted(capacity.items())],
        )
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
