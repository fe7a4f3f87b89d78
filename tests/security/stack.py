"""Real servers for the security and observability tests: runners and the forge under gunicorn.

A :class:`Stack` starts gunicorn processes on loopback ports and stops them all (runners
before the forge, so they can deregister) whatever happens. Every wait is bounded. The
helpers at the bottom check answers strictly: JSON proper (no ``NaN``), contract envelopes.
"""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import requests
from marshmallow import ValidationError
from prometheus_client.parser import text_string_to_metric_families

from runnerkit.contracts import ErrorEnvelopeSchema, RunnerExecutionResponseSchema
from tests.support import GunicornProcess

#: The product's gunicorn settings for runners (gthread workers, reserved health threads).
GUNICORN_CONF = "deploy/gunicorn.conf.py"

#: (connect, read) timeout of every quick request.
QUICK = (2.0, 10.0)

#: Variables that would tie a server to the test process or another control plane.
_ISOLATED: dict[str, str | None] = {
    "RUNNERKIT_JOBFORGE_URL": None,
    "JOBFORGE_URL": None,
    "RUNNERKIT_TRUTHCORE_URL": None,
    "TRUTHCORE_URL": None,
    "RUNNERKIT_RUNNER_TOKEN": None,
    "RUNNER_TOKEN": None,
    "RUNNERKIT_SIGNING_SECRET": None,
    # Whoever runs the tests may have set this: a server that inherited it would put every
    # prometheus-client metric of its own (none of runnerkit's) in memory-mapped files there.
    "PROMETHEUS_MULTIPROC_DIR": None,
    "GUNICORN_GRACEFUL_TIMEOUT": "5",
}


class Stack:
    """Gunicorn processes of one test or module, stopped together (last started first)."""

    def __init__(self, base_dir: Path) -> None:
        self.base_dir = base_dir
        self.procs: list[GunicornProcess] = []

    def _start(
        self,
        app_spec: str,
        name: str,
        *,
        workers: int,
        config: str | None,
        env: Mapping[str, str | None],
        extra_args: tuple[str, ...] = (),
        ready_path: str,
        all_workers: bool = False,
        timeout: float = 30.0,
    ) -> GunicornProcess:
        log_dir = self.base_dir / f"{name}{len(self.procs)}"
        proc = GunicornProcess(
            app_spec,
            log_dir=log_dir,
            workers=workers,
            config=config,
            env={**_ISOLATED, "RUNNERKIT_STATE_DIR": str(log_dir / "state"), **env},
            extra_args=extra_args,
            name=name,
        )
        self.procs.append(proc)
        proc.start()
        proc.wait_ready(ready_path, timeout=timeout)
        if all_workers:
            proc.wait_workers_serving(timeout=timeout, path=ready_path)
        return proc

    def runner(
        self,
        app_spec: str = "app:app",
        *,
        workers: int = 2,
        env: Mapping[str, str | None] | None = None,
        jobforge_url: str | None = None,
        all_workers: bool = False,
    ) -> GunicornProcess:
        """A runner under the product's gunicorn config; standalone unless ``jobforge_url``."""
        merged: dict[str, str | None] = {}
        if jobforge_url is not None:
            merged["RUNNERKIT_JOBFORGE_URL"] = jobforge_url
        merged.update(env or {})
        return self._start(
            app_spec,
            "runner",
            workers=workers,
            config=GUNICORN_CONF,
            env=merged,
            ready_path="/health/live",
            all_workers=all_workers,
        )

    def forge(
        self,
        db_path: Path,
        *,
        workers: int = 2,
        settings: Mapping[str, str] | None = None,
        all_workers: bool = False,
    ) -> GunicornProcess:
        """``gunicorn runnerkit.forge:app`` (gthread) on a fresh database; ready when its
        dispatcher has ticked (``/health`` 200)."""
        env: dict[str, str | None] = {
            "RUNNERKIT_FORGE_DB_PATH": str(db_path),
            "RUNNERKIT_FORGE_HEARTBEAT_INTERVAL_MS": "1000",
            "RUNNERKIT_FORGE_POLL_INTERVAL_MS": "20",
        }
        env.update({f"RUNNERKIT_FORGE_{k}": v for k, v in (settings or {}).items()})
        return self._start(
            "runnerkit.forge:app",
            "forge",
            workers=workers,
            config=None,
            env=env,
            extra_args=("--worker-class", "gthread", "--threads", "8", "--graceful-timeout", "5"),
            ready_path="/health",
            all_workers=all_workers,
        )

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop(timeout=10)

    def logs(self) -> list[tuple[str, str]]:
        return [(f"{p.log_path.name}", p.log_text()[-5000:]) for p in self.procs]


def attach_logs(item: pytest.Item, report: pytest.TestReport) -> None:
    """Add the logs of the servers a failed test used to its report."""
    if not report.failed:
        return
    seen: set[int] = set()
    for value in getattr(item, "funcargs", {}).values():
        stacks = [value] if isinstance(value, Stack) else getattr(value, "stacks", [])
        procs = [value] if isinstance(value, GunicornProcess) else []
        for stack in stacks:
            procs.extend(stack.procs)
        for proc in procs:
            if id(proc) not in seen:
                seen.add(id(proc))
                report.sections.append(
                    (f"server log {proc.log_path.name}", proc.log_text()[-5000:])
                )


# --------------------------------------------------------------------------- checks


def strict_loads(text: str | bytes) -> Any:
    """JSON proper: ``NaN``/``Infinity`` (Python's extension) are refused."""

    def refuse(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


def envelope_errors(envelope: Any) -> dict[str, Any]:
    """Marshmallow's complaints about ``envelope`` as an ErrorEnvelope ({} when valid)."""
    if not isinstance(envelope, dict):
        return {"envelope": f"not an object: {type(envelope).__name__}"}
    try:
        ErrorEnvelopeSchema().load(envelope)
    except ValidationError as exc:
        return {"errors": exc.messages}
    if not str(envelope.get("timestamp", "")).endswith("Z"):
        return {"timestamp": "does not end in Z"}
    return {}


def failure_envelope(response: requests.Response) -> dict[str, Any]:
    """The valid ErrorEnvelope of a JSON error answer (``{"success": false, "error": …}``)."""
    assert response.headers.get("Content-Type", "").startswith("application/json"), (
        response.status_code,
        response.headers,
        response.text[:500],
    )
    body = strict_loads(response.content)
    assert body["success"] is False, body
    problems = envelope_errors(body["error"])
    assert problems == {}, (problems, body)
    if "jobId" in body:
        RunnerExecutionResponseSchema().load(body)
    error: dict[str, Any] = body["error"]
    return error


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """A Prometheus text exposition as ``{(sample name, sorted labels): value}``."""
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = float(sample.value)
    return out


def value(scrape: Mapping[Any, float], name: str, **labels: str) -> float:
    """One sample of a parsed scrape (0 when absent)."""
    return scrape.get((name, tuple(sorted(labels.items()))), 0.0)


def get_from_each_worker(proc: GunicornProcess, path: str, timeout: float = 20.0) -> dict[int, str]:
    """``GET path`` answered once by every worker (told apart by who holds the connection).

    Returns ``{worker pid: body text}``; fails if some worker never answered in time.
    """
    answers: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    workers = set(proc.worker_pids())
    while workers - set(answers):
        if time.monotonic() > deadline:
            raise AssertionError(f"workers {workers - set(answers)} never answered {path}")
        conn = http.client.HTTPConnection(proc.host, proc.port, timeout=5.0)
        try:
            conn.connect()
            assert conn.sock is not None
            client_port = conn.sock.getsockname()[1]
            conn.request("GET", path)
            response = conn.getresponse()
            text = response.read().decode("utf-8")
            assert response.status == 200, (response.status, text[:500])
            pid = proc.worker_for_client_port(client_port)
            if pid is not None and pid not in answers:
                answers[pid] = text
        finally:
            conn.close()
    return answers
