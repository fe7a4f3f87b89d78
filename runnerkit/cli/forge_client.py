"""Talking to JobForge from the command line: which forge, with which token, and jobs.

Shared by the forge commands (``submit``, ``runners``, ``jobs``) and by ``runnerkit up``
(:mod:`runnerkit.cli.devstack`), which submits its sample jobs the same way.
"""

from __future__ import annotations

import os
import time
import uuid
from typing import Any

import click
import requests

from runnerkit.contracts import utc_now
from runnerkit.service.settings import split_base_urls

DEFAULT_FORGE_URL = "http://127.0.0.1:3002"
TERMINAL_STATUSES = ("completed", "failed", "cancelled")


URL_HELP = (
    "JobForge URL (default $RUNNERKIT_JOBFORGE_URL, else $JOBFORGE_URL, else :3002; "
    "the first of a comma-separated list)."
)


def forge_url(url: str | None) -> str:
    """The forge to call; of a runner's comma-separated URL list, the first (the forges of
    such a list share one database, so any of them answers alike)."""
    value = (
        url
        or os.environ.get("RUNNERKIT_JOBFORGE_URL")
        or os.environ.get("JOBFORGE_URL")
        or DEFAULT_FORGE_URL
    )
    return (split_base_urls(value) or [DEFAULT_FORGE_URL])[0]


def forge_call(method: str, url: str, **kwargs: Any) -> requests.Response:
    kwargs.setdefault("timeout", (3, 30))
    # The forge's own token, else the runner's (the same value when both are set up).
    token = next(
        (
            os.environ[name]
            for name in ("RUNNERKIT_FORGE_TOKEN", "RUNNERKIT_RUNNER_TOKEN", "RUNNER_TOKEN")
            if os.environ.get(name)
        ),
        "",
    )
    if token:
        kwargs.setdefault("headers", {})["Authorization"] = f"Bearer {token}"
    try:
        return requests.request(method, url, **kwargs)
    except requests.RequestException as exc:
        raise click.ClickException(f"cannot reach {url}: {type(exc).__name__}") from None


def runner_job_types(base: str) -> set[str] | None:
    """Job types that runners not offline list, or None when JobForge will not say."""
    try:
        response = forge_call("GET", f"{base}/runners?limit=500")
        items = response.json().get("items", []) if response.status_code == 200 else None
    except (click.ClickException, ValueError, AttributeError):
        return None
    if not isinstance(items, list):
        return None
    return {
        job_type
        for runner in items
        if isinstance(runner, dict) and runner.get("status") != "offline"
        for capability in runner.get("capabilities") or ()
        if isinstance(capability, dict)
        for job_type in capability.get("supportedJobTypes") or ()
    }


def job_request(
    job_type: str,
    data: dict[str, Any],
    *,
    priority: int = 50,
    timeout_ms: int = 30_000,
    source: str = "runnerkit-cli",
) -> dict[str, Any]:
    """A contract-valid JobRequest with a fresh id."""
    return {
        "id": str(uuid.uuid4()),
        "type": job_type,
        "priority": priority,
        "payload": {"type": job_type, "version": "1.0.0", "data": data},
        "metadata": {"source": source, "createdAt": utc_now(), "correlationId": str(uuid.uuid4())},
        "timeoutMs": timeout_ms,
    }


def wait_for_job(base: str, job_id: str, timeout_s: float) -> dict[str, Any]:
    """Poll ``GET /jobs/{id}`` until the job is finished or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        response = forge_call("GET", f"{base}/jobs/{job_id}")
        if response.status_code != 200:
            raise click.ClickException(f"JobForge answered {response.status_code}: {response.text}")
        job: dict[str, Any] = response.json()
        if job.get("status") in TERMINAL_STATUSES or time.monotonic() >= deadline:
            return job
        time.sleep(0.2)
