"""The job store: every job operation of the forge, and the state machine they follow.

The state machine (every change happens in one transaction that also writes a JobEvent and
a TruthCore assertion ``(jobId, "status", <status>)``; the dispatcher records answers and
claims jobs many to a transaction, and ``POST /jobs`` requests arriving together share one)::

    queued ──dispatch──▶ running ──success──▶ completed
    running ──failure, policy says retry──▶ retrying ──next attempt time──▶ running
    running ──failure, no retry / retries used up──▶ failed
    running ──refused (the runner did not run it)──▶ retrying (the attempt is given back)
    running ──runner offline or gone──▶ retrying (counted as an attempt, eligible at once)
    queued/retrying past metadata.expiresAt ──▶ failed (TIMEOUT / JOB_EXPIRED)
    queued UNMATCHED_JOB_EXPIRY_S, no runner lists the type ──▶ failed (NO_RUNNER_FOR_TYPE)
    queued/retrying/running ──cancel──▶ cancelled

A status change is stamped (its events, assertions and ``updated_at``) once its transaction
holds the writers' turn, not before it waited for it: write transactions take turns, so the
forge's records are in the order the changes happened, and a job started in a slot another
job freed is never recorded as starting before that job ended.

A job that is sent to a runner holds one of that runner's capability slots (``slot_runner``)
until the attempt's answer arrives, the runner goes offline, or the attempt's lease passes.
A cancelled job keeps its slot while the runner is still working on it, so ``maxConcurrency``
counts what runners really run.

:class:`JobStore` is assembled from one part per concern: :mod:`.job_submission`
(queueing, cancelling), :mod:`.job_reads`, :mod:`.job_claims` (starting attempts),
:mod:`.job_results` (recording answers), :mod:`.job_retries` (policy, refusals),
:mod:`.job_sweep` (liveness, overdue, expiry) and :mod:`.job_retention`, over
:mod:`.job_records` (how a change is written). Its vocabulary is :mod:`.jobs`. The API and
the dispatcher hold one object for all of it, as before; the parts are base classes rather
than objects of their own so that the dispatch path pays nothing for the split (a method is
found through the class's cached lookup, with no extra call or attribute in between).
"""

from __future__ import annotations

from .job_claims import JobClaims
from .job_reads import JobReads
from .job_results import JobResults
from .job_retention import JobRetention
from .job_submission import JobSubmission
from .job_sweep import JobSweep


class JobStore(JobSubmission, JobReads, JobClaims, JobResults, JobSweep, JobRetention):
    """Every job operation of the forge, shared by the HTTP API and the dispatcher."""
