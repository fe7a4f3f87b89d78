"""The commands of the reference control plane: serve it (``forge``), and ``submit``,
``runners`` and ``jobs`` against a running one."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import click

from runnerkit.cli.forge_client import (
    URL_HELP,
    forge_call,
    forge_url,
    job_request,
    runner_job_types,
    wait_for_job,
)
from runnerkit.cli.options import json_object_arg
from runnerkit.forge.serving import WORKERS, gunicorn_argv
from runnerkit.forge.trust import is_loopback


def _listed(url: str, params: dict[str, Any], as_json: bool) -> list[dict[str, Any]] | None:
    """A list endpoint's items; None once they are printed as JSON (``--json``)."""
    response = forge_call("GET", url, params=params)
    if response.status_code != 200:
        raise click.ClickException(f"JobForge answered {response.status_code}: {response.text}")
    items: list[dict[str, Any]] = response.json().get("items", [])
    if as_json:
        click.echo(json.dumps(items, indent=2))
        return None
    return items


def _table(rows: list[list[str]], headers: list[str]) -> str:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", default=3002, show_default=True, help="Port to bind.")
@click.option("--workers", default=WORKERS, show_default=True, help="gunicorn workers.")
@click.option("--db", "db_path", default=None, help="SQLite file (default ./var/forge.sqlite3).")
def forge(host: str, port: int, workers: int, db_path: str | None) -> None:
    """Run the reference control plane (JobForge + TruthCore) under gunicorn.

    Example: runnerkit forge --port 3002 --db var/forge.sqlite3
    """
    if not os.environ.get("RUNNERKIT_FORGE_TOKEN") and not (
        host == "localhost" or is_loopback(host)
    ):
        # Without a token the forge serves loopback peers only: binding elsewhere would
        # only answer 403, or be a mistake. Say so before anything starts.
        click.echo(
            f"runnerkit forge: refusing to bind {host} without RUNNERKIT_FORGE_TOKEN "
            "(set it, or bind 127.0.0.1)",
            err=True,
        )
        sys.exit(2)
    if db_path:
        os.environ["RUNNERKIT_FORGE_DB_PATH"] = db_path
    argv = gunicorn_argv(f"{host}:{port}", workers)
    os.execv(sys.executable, argv)


@click.command()
@click.option("--type", "job_type", required=True, help="The job type, e.g. text.stats.")
@click.option(
    "--data",
    default="{}",
    show_default=True,
    help="payload.data as a JSON object; @FILE reads it from FILE, - from standard input.",
)
@click.option("--priority", default=50, show_default=True, help="0-100, higher first.")
@click.option("--timeout-ms", default=30_000, show_default=True, help="The job's timeoutMs.")
@click.option("--wait", is_flag=True, help="Wait for the job to finish and print it.")
@click.option("--wait-timeout", default=120.0, show_default=True, help="Seconds to wait.")
@click.option("--url", default=None, help=URL_HELP)
def submit(
    job_type: str,
    data: str,
    priority: int,
    timeout_ms: int,
    wait: bool,
    wait_timeout: float,
    url: str | None,
) -> None:
    """Submit a job to JobForge and print the JobResponse.

    Example: runnerkit submit --type text.stats --data '{"text": "Hello"}' --wait
    (or --data @payload.json, or --data - to read it from standard input, as curl does).
    """
    payload_data = json_object_arg(data, "--data")
    job = job_request(job_type, payload_data, priority=priority, timeout_ms=timeout_ms)
    base = forge_url(url)
    response = forge_call("POST", f"{base}/jobs", json=job)
    if response.status_code >= 300:
        raise click.ClickException(f"JobForge answered {response.status_code}: {response.text}")
    result = response.json()
    types = runner_job_types(base)
    if types is not None and job_type not in types:
        known = ", ".join(sorted(types)) or "none"
        click.echo(
            f"no registered runner lists job type {job_type!r} (types runners list: {known}); "
            "the job waits for one",
            err=True,
        )
    if wait:
        result = wait_for_job(base, job["id"], wait_timeout)
    click.echo(json.dumps(result, indent=2))
    if wait and result.get("status") != "completed":
        status = result.get("status")
        ended = status in ("failed", "cancelled")
        click.echo(
            f"job {job['id']} {'ended' if ended else 'is still'} {status}"
            + ("" if ended else f" after {wait_timeout:g} s"),
            err=True,
        )
        sys.exit(1)


@click.command()
@click.option("--url", default=None, help=URL_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def runners(url: str | None, as_json: bool) -> None:
    """List the runners JobForge knows (bearer token: $RUNNERKIT_FORGE_TOKEN, else
    $RUNNERKIT_RUNNER_TOKEN, when set).

    Example: runnerkit runners --json
    """
    items = _listed(f"{forge_url(url)}/runners", {}, as_json)
    if items is None:
        return
    rows = [
        [
            r["id"],
            r["name"],
            r["version"],
            r["status"],
            r["lastHeartbeatAt"],
            str(r.get("contractViolations", "-")),  # runnerkit's forge counts them
            ",".join(c["id"] for c in r["capabilities"]),
        ]
        for r in items
    ]
    headers = ["ID", "NAME", "VERSION", "STATUS", "LAST HEARTBEAT", "VIOLATIONS", "CAPABILITIES"]
    click.echo(_table(rows, headers))
    for r in items:
        if r.get("refusal"):
            click.echo(f"{r['name']} {r['id']}: {r['refusal']}")
    if any(r.get("contractViolations") for r in items):
        click.echo(
            "What broke which contract: the forge's dashboard, or GET /violations?runnerId=<id>"
        )


@click.command()
@click.option("--status", default=None, help="Only jobs with this status.")
@click.option("--type", "job_type", default=None, help="Only jobs of this type.")
@click.option("--limit", default=50, show_default=True)
@click.option("--url", default=None, help=URL_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def jobs(
    status: str | None, job_type: str | None, limit: int, url: str | None, as_json: bool
) -> None:
    """List jobs, newest first.

    Example: runnerkit jobs --status failed
    """
    params: dict[str, Any] = {"limit": limit}
    if status:
        params["status"] = status
    if job_type:
        params["type"] = job_type
    items = _listed(f"{forge_url(url)}/jobs", params, as_json)
    if items is None:
        return
    rows = []
    for job in items:
        result = job.get("result") or {}
        meta = result.get("metadata") or {}
        rows.append(
            [
                job["id"],
                job["request"]["type"],
                job["status"],
                str(job["request"]["priority"]),
                str(meta.get("attempts", "")),
                str(meta.get("durationMs", "")),
            ]
        )
    click.echo(_table(rows, ["ID", "TYPE", "STATUS", "PRIORITY", "ATTEMPTS", "DURATION MS"]))
