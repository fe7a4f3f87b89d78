"""What every stage of a job's path shares: the validated job, its :class:`Answer`, and the
base of the :class:`~runnerkit.runner.execution.Executor` that turns outcomes into answers.

:class:`JobAnswers` holds the narrow pieces of the runner the pipeline reads (handed in by
:class:`~runnerkit.runner.app.Runner`, never the Runner itself) and the code every stage ends
in: the response body, the error envelope, the job's one log line and its metrics. The
stages build on it: :mod:`~runnerkit.runner.job_running` (running a job),
:mod:`~runnerkit.runner.async_jobs` (accepted jobs and the outbox) and
:mod:`~runnerkit.runner.execution` (parsing, validation and admission).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

from runnerkit.contracts import new_uuid
from runnerkit.errors import RunnerError, Unavailable, build_envelope
from runnerkit.runner.capability import Capability
from runnerkit.runner.serving import Serving
from runnerkit.runner.state import InstanceState
from runnerkit.runner.storage import LedgerReplaced
from runnerkit.service.gil_locks import GILLock
from runnerkit.service.logs import emit
from runnerkit.service.metric_families import metrics
from runnerkit.service.metrics import labelled

job_log = logging.getLogger("runnerkit.job")

#: The ``priority`` label of runner-side job metrics: JobForge does not send it to runners.
NO_PRIORITY = "unknown"

#: The ``capability`` label of jobs naming a capability this runner does not have.
UNKNOWN_CAPABILITY = "unknown"

#: Header on an answer replayed from the idempotency ledger instead of a new execution.
REPLAY_HEADER = "Idempotent-Replayed"


@dataclass
class PipelineJob:
    """A validated job on its way through the pipeline."""

    capability: Capability
    payload: dict[str, Any]
    job_id: str
    correlation_id: str
    timeout_ms: float
    started: float

    def remaining_ms(self) -> float:
        return max(0.0, self.timeout_ms - (time.monotonic() - self.started) * 1000.0)


#: Sends an answer while the request is still in the app (from another thread): given by
#: a server that allows it (:mod:`~runnerkit.runner.execute_lane` under gunicorn).
SendEarly = Callable[["Answer"], None]


@dataclass
class Answer:
    """What the HTTP layer sends back."""

    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)
    _json: str | None = field(default=None, repr=False, compare=False)
    #: The traceback of an unexpected exception, for the job's log line (never sent).
    exception: str | None = field(default=None, repr=False, compare=False)
    #: Sent (and logged) already, at the job's deadline while its code ran on: the request
    #: ends with nothing more to write (:class:`~runnerkit.runner.deadlines.Deadlines`).
    sent: bool = field(default=False, repr=False, compare=False)

    def json(self) -> str:
        """The body as JSON text, encoded once for both the ledger and the response.

        Raises TypeError/ValueError for a body JSON cannot carry (an object a capability's
        ``Raw`` field let through, NaN).
        """
        if self._json is None:
            self._json = _ENCODER.encode(self.body)
        return self._json


#: Compact, ASCII-safe (a lone surrogate in a result cannot break the encoding) and strict:
#: NaN and Infinity are not JSON.
_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)


class Rejection(Exception):
    """Internal: stop the pipeline with this error and whatever is known of the job."""

    def __init__(self, error: RunnerError, job_id: str | None = None) -> None:
        super().__init__(error.message)
        self.error = error
        self.job_id = job_id


class JobAnswers:
    """The pipeline's collaborators and its answers (see the module docstring).

    The collaborators are set by :class:`~runnerkit.runner.execution.Executor`'s constructor:
    live values (draining, settings, the outbox) are plain attributes of the shared
    :class:`~runnerkit.runner.serving.Serving`; the instance state (made on first use) and
    the runner's id (JobForge's, read from the instance's identity file) are calls.
    """

    _serving: Serving
    _state: Callable[[], InstanceState]
    _capabilities: Mapping[str, Capability]
    _name: str
    _version: str
    _runner_id: Callable[[], str]
    _app_context: Callable[[], AbstractContextManager[Any]]
    _in_flight: int
    _in_flight_lock: GILLock

    def storage_error(self, exc: BaseException) -> Unavailable:
        """The retryable 503 for a job the instance's state could not take.

        A replaced ledger is ``LEDGER_REPLACED`` (for good, until a restart); any other
        failure (disk full, I/O error) is ``STATE_UNAVAILABLE`` and turns readiness
        unhealthy until a write succeeds again (:class:`~runnerkit.state.StorageHealth`).
        """
        retry_after = self._serving.settings.rate_limit_retry_after_s
        if isinstance(exc, LedgerReplaced):
            return Unavailable(
                "This runner's idempotency ledger was deleted or replaced while it ran; "
                "it takes no new jobs until it is restarted",
                code="LEDGER_REPLACED",
                retry_after=retry_after,
            )
        self._state().storage.failed(exc)
        return Unavailable(
            "This runner cannot write its state right now (disk full or I/O error); "
            "try again later",
            code="STATE_UNAVAILABLE",
            retry_after=retry_after,
        )

    def _failure(
        self, error: RunnerError, job_id: str | None, correlation_id: str, started: float
    ) -> Answer:
        envelope = build_envelope(
            error, service=self._name, operation="execute", correlation_id=correlation_id
        )
        answer = self._answer(error.status, job_id, False, started, error=envelope)
        if error.retry_after is not None:
            answer.headers["Retry-After"] = str(max(1, math.ceil(error.retry_after)))
        return answer

    def _answer(
        self,
        status: int,
        job_id: str | None,
        success: bool,
        started: float,
        *,
        data: Any = None,
        error: dict[str, Any] | None = None,
    ) -> Answer:
        if job_id is None:
            return Answer(status, {"success": False, "error": error})
        body: dict[str, Any] = {
            "jobId": job_id,
            "success": success,
            "executionTimeMs": round((time.monotonic() - started) * 1000.0, 3),
            "runnerId": self._runner_id(),
        }
        if success:
            body["data"] = data
        else:
            body["error"] = error
        return Answer(status, body)

    def _count(self, answer: Answer, capability_id: str, started: float) -> None:
        """The job metrics of one answered job (a 202 is counted when its result is)."""
        if answer.status == 202 or not capability_id or REPLAY_HEADER in answer.headers:
            return
        if capability_id not in self._capabilities:
            capability_id = UNKNOWN_CAPABILITY
        current = metrics()
        label = capability_id
        if answer.body.get("success"):
            labelled(current.jobs_completed, label, "success").inc()
        else:
            code = (answer.body.get("error") or {}).get("code", "UNKNOWN")
            labelled(current.jobs_completed, label, "failed").inc()
            labelled(current.jobs_failed, label, code).inc()
        labelled(current.job_duration, label).observe(time.monotonic() - started)

    def _log(
        self,
        answer: Answer,
        job_id: str | None,
        capability_id: str,
        correlation_id: str,
        started: float,
    ) -> None:
        error = answer.body.get("error") or {}
        if answer.status == 202:
            outcome = "accepted"
        elif REPLAY_HEADER in answer.headers:
            outcome = "replayed"
        elif answer.body.get("success"):
            outcome = "success"
        else:
            outcome = error.get("category", "error")
        self._count(answer, capability_id, started)
        fields: dict[str, Any] = {
            "jobId": job_id,
            "capabilityId": capability_id,
            "correlationId": correlation_id,
            "outcome": outcome,
            "status": answer.status,
            "durationMs": round((time.monotonic() - started) * 1000.0, 3),
        }
        level = logging.INFO
        if error:
            fields["error"] = {"code": error["code"], "category": error["category"]}
            if answer.exception is not None:
                level = logging.ERROR
                fields["exception"] = answer.exception
        emit(job_log, level, _JOB_MESSAGES.get(outcome, "job failed"), fields, trusted=True)


_JOB_MESSAGES = {
    "success": "job completed",
    "accepted": "job accepted",
    "replayed": "job replayed",
}


def or_new_id(correlation_id: str | None) -> str:
    """``correlation_id``, or a new one when there is none (:func:`~runnerkit.contracts.new_uuid`:
    no system call per job)."""
    return correlation_id or new_uuid()
