"""Valid contract documents to start tests from; each call returns a fresh copy."""

from __future__ import annotations

import uuid
from typing import Any

from runnerkit.contracts import CONTRACT_VERSION, utc_now


def execution_request(
    capability_id: str = "my-capability", payload: dict[str, Any] | None = None, **extra: Any
) -> dict[str, Any]:
    """A RunnerExecutionRequest (what JobForge posts to ``/execute``)."""
    return {
        "jobId": str(uuid.uuid4()),
        "moduleId": "my-module",
        "capabilityId": capability_id,
        "payload": {"test": True} if payload is None else payload,
        "timeoutMs": 30_000,
        "metadata": {"correlationId": str(uuid.uuid4())},
        **extra,
    }


def registration(name: str = "example-runner", **extra: Any) -> dict[str, Any]:
    """A RunnerRegistrationRequest with one capability."""
    return {
        "name": name,
        "version": "1.0.0",
        "contractVersion": dict(CONTRACT_VERSION),
        "capabilities": [
            {
                "id": "my-capability",
                "name": "My capability",
                "version": "1.0.0",
                "description": "Does one thing",
                "inputSchema": {"type": "object"},
                "outputSchema": {"type": "object"},
                "supportedJobTypes": ["my.job.type"],
                "maxConcurrency": 2,
                "timeoutMs": 30_000,
                "resourceRequirements": {"gpu": False},
            }
        ],
        "healthCheckEndpoint": "http://127.0.0.1:3000/health",
        "tags": [],
        **extra,
    }


def job_request(
    job_type: str = "my.job.type", data: dict[str, Any] | None = None, **extra: Any
) -> dict[str, Any]:
    """A JobRequest as a client posts it to ``POST /jobs``."""
    return {
        "id": str(uuid.uuid4()),
        "type": job_type,
        "priority": 50,
        "payload": {"type": job_type, "version": "1.0.0", "data": data or {"foo": "bar"}},
        "metadata": {"source": "tests", "createdAt": utc_now()},
        "timeoutMs": 30_000,
        **extra,
    }


def truth_assertion(subject: str | None = None, **extra: Any) -> dict[str, Any]:
    """A TruthAssertion recording a job's status."""
    return {
        "id": str(uuid.uuid4()),
        "subject": subject or str(uuid.uuid4()),
        "predicate": "status",
        "object": "completed",
        "confidence": 1,
        "source": "example-runner",
        "timestamp": utc_now(),
        "metadata": {},
        **extra,
    }


def truth_query(**extra: Any) -> dict[str, Any]:
    """A TruthQuery for every assertion about one subject."""
    return {
        "id": str(uuid.uuid4()),
        "pattern": {"predicate": "status"},
        "filters": {"minConfidence": 0},
        "limit": 100,
        "offset": 0,
        **extra,
    }
