"""Judging one answer of the runner: the contract it must obey, the error category it must carry.

Shared by every check of the suite, so "what a conforming answer is" is written once: a
document checked against a contract yields findings with dotted paths; an error answer is an
``ErrorEnvelope`` (bare, or as the ``error`` of a body), and one that names the job is a whole
``RunnerExecutionResponse`` with ``success: false``.
"""

from __future__ import annotations

from typing import Any

from runnerkit.contracts.validator import ContractValidator

from .probe import Reply
from .report import Check

_VALIDATOR = ContractValidator()


def contract_findings(check: Check, contract: str, document: Any, prefix: str = "") -> bool:
    """Add a finding for each way ``document`` breaks ``contract``; True when it keeps it."""
    result = _VALIDATOR.validate(contract, document)
    for problem in result.errors:
        path = ".".join([*([prefix] if prefix else []), *problem.path])
        value = "" if problem.value is None else f" (got {problem.value!r:.60})"
        check.fail(f"{problem.message}{value}", path)
    return result.valid


def json_answer(check: Check, reply: Reply) -> bool:
    """Whether the runner answered with JSON at all; a finding saying what came instead."""
    if not reply.answered:
        check.fail(reply.problem)
        return False
    if reply.json_problem:
        check.fail(f"{reply.describe()}: {reply.json_problem}")
        return False
    return True


def error_answer(
    check: Check, reply: Reply, category: str, status: int, job_id: str | None = None
) -> None:
    """Judge an answer that must refuse the request with ``category``.

    ``status`` is the HTTP status runnerkit and ControlPlane use for it; any 4xx is accepted
    (the category is what JobForge's retry decision reads), a 2xx or 5xx is a finding.
    """
    if not json_answer(check, reply):
        return
    if 200 <= reply.status < 300:
        check.fail(
            f"answered HTTP {reply.status}: the request was accepted; expected a refusal, "
            f"{status} {category}",
            "(status)",
        )
        return
    if not 400 <= reply.status < 500:
        check.fail(f"answered HTTP {reply.status}; expected a refusal, {status}", "(status)")
    body = reply.body
    if not isinstance(body, dict):
        check.fail(f"the answer is a JSON {type(body).__name__}, not an object")
        return
    if "jobId" in body or "runnerId" in body:
        contract_findings(check, "RunnerExecutionResponse", body)
        if body.get("success") is not False:
            check.fail(f"{body.get('success')!r} on a refused request", "success")
        if job_id is not None and body.get("jobId") != job_id:
            check.fail(f"{body.get('jobId')!r}, not the request's {job_id}", "jobId")
    if "error" in body or "category" not in body:
        envelope, prefix = body.get("error"), "error"
    else:
        envelope, prefix = body, ""
    if envelope is None:
        check.fail("no ErrorEnvelope: neither the body nor its error is one", prefix)
        return
    contract_findings(check, "ErrorEnvelope", envelope, prefix)
    if isinstance(envelope, dict):
        got = envelope.get("category")
        if got != category:
            check.fail(
                f"{got!r}; expected {category}", ".".join(filter(None, [prefix, "category"]))
            )


def describe_error(body: Any) -> str:
    """A refused request's error in a few words: category, code and message."""
    error = body.get("error") if isinstance(body, dict) else None
    source = error if isinstance(error, dict) else body if isinstance(body, dict) else {}
    parts = [str(source.get(k)) for k in ("category", "code") if source.get(k)]
    message = str(source.get("message", ""))[:120]
    return " ".join(parts) + (f": {message}" if message else "") or "no error given"
