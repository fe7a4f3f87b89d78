"""The ``runnerkit`` command: inspect a runner, run the reference control plane, submit jobs."""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import click
import requests

from runnerkit._version import __version__
from runnerkit.conformance.command import conformance
from runnerkit.contracts import utc_now
from runnerkit.forge.serving import WORKERS, gunicorn_argv
from runnerkit.forge.trust import is_loopback
from runnerkit.service.settings import split_base_urls
from runnerkit.service.signing import sign

DEFAULT_FORGE_URL = "http://127.0.0.1:3002"
TERMINAL_STATUSES = ("completed", "failed", "cancelled")


def load_runner(spec: str) -> Any:
    """Import ``module:variable`` as gunicorn does and find its Runner."""
    from runnerkit.runner.app import EXTENSION_KEY, Runner

    module_name, _, attr = spec.partition(":")
    if "" not in sys.path:
        sys.path.insert(0, "")
    module = importlib.import_module(module_name)
    target = getattr(module, attr or "app")
    if isinstance(target, Runner):
        return target
    runner = getattr(target, "extensions", {}).get(EXTENSION_KEY)
    if runner is None:
        raise click.ClickException(f"{spec} is neither a Runner nor a Flask app serving one")
    return runner


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


def _call(method: str, url: str, **kwargs: Any) -> requests.Response:
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


def _table(rows: list[list[str]], headers: list[str]) -> str:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


@click.group()
@click.version_option(__version__, prog_name="runnerkit")
def main() -> None:
    """runnerkit: write, run and check ControlPlane job runners."""


@main.command()
@click.argument("app", default="app:app")
def manifest(app: str) -> None:
    """Print the registration document of APP (module:variable, as gunicorn takes it).

    Example: runnerkit manifest app:app
    """
    try:
        runner = load_runner(app)
    except click.ClickException:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever the app raised while importing
        raise click.ClickException(f"cannot load {app}: {type(exc).__name__}: {exc}") from None
    click.echo(json.dumps(runner.registration_document(), indent=2))


@main.command()
@click.argument("name")
@click.option("--dir", "directory", default=None, help="Where to create it (default ./NAME).")
@click.option("--runnerkit-spec", default=None, help="The runnerkit requirement to depend on.")
def new(name: str, directory: str | None, runnerkit_spec: str | None) -> None:
    """Create a runner project NAME: app.py, tests, Makefile, Dockerfile, compose file.

    Example: runnerkit new image-resizer && cd image-resizer && make test
    """
    from runnerkit.cli.scaffold import create_project

    target = Path(directory or name)
    try:
        files = create_project(name, target, runnerkit_spec)
    except (ValueError, FileExistsError, RuntimeError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"created {target}/ ({len(files)} files). Next: cd {target} && make test")


@main.command()
@click.argument("app", default="app:app")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--junit", "junit_path", default=None, help="Also write a JUnit XML report here.")
def validate(app: str, as_json: bool, junit_path: str | None) -> None:
    """Check APP against the contracts: exit 0 valid, 1 invalid, 2 could not load.

    Example: runnerkit validate app:app --junit reports/contract.xml
    """
    from runnerkit.cli.validate import Check, Report, validate_runner
    from runnerkit.runner.capability import CapabilityDefinitionError

    try:
        runner = load_runner(app)
    except CapabilityDefinitionError as exc:
        report = Report(app, [Check("capabilities are declared correctly", False, [str(exc)])])
    except Exception as exc:  # noqa: BLE001 - anything the app raised while importing
        message = exc.message if isinstance(exc, click.ClickException) else str(exc)
        click.echo(f"error: cannot load {app}: {type(exc).__name__}: {message}", err=True)
        sys.exit(2)
    else:
        report = validate_runner(runner)
    if junit_path:
        Path(junit_path).parent.mkdir(parents=True, exist_ok=True)
        Path(junit_path).write_text(report.as_junit())
    click.echo(json.dumps(report.as_dict(), indent=2) if as_json else report.as_text())
    sys.exit(0 if report.valid else 1)


@main.command()
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


def _json_object_arg(value: str, option: str) -> dict[str, Any]:
    """An option's JSON object: inline, ``@FILE`` or ``-`` for standard input (like curl).

    A payload too big for the shell's argument list still fits in a file or a pipe.
    """
    if value == "-":
        text = sys.stdin.read()
    elif value.startswith("@"):
        try:
            with open(value[1:], encoding="utf-8") as handle:
                text = handle.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise click.BadParameter(f"cannot read {value[1:]}: {exc}", param_hint=option) from None
    else:
        text = value
    try:
        parsed = json.loads(text)
    except ValueError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint=option) from None
    if not isinstance(parsed, dict):
        raise click.BadParameter("must be a JSON object", param_hint=option)
    return parsed


@main.command()
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
    payload_data = _json_object_arg(data, "--data")
    job = job_request(job_type, payload_data, priority=priority, timeout_ms=timeout_ms)
    base = forge_url(url)
    response = _call("POST", f"{base}/jobs", json=job)
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


def runner_job_types(base: str) -> set[str] | None:
    """Job types that runners not offline list, or None when JobForge will not say."""
    try:
        response = _call("GET", f"{base}/runners?limit=500")
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


@main.command()
@click.argument("capability")
@click.option(
    "--data",
    default="{}",
    show_default=True,
    help="The payload as a JSON object; @FILE reads it from FILE, - from standard input.",
)
@click.option(
    "--url",
    "runner_url",
    default=None,
    help="The runner's base URL (default http://127.0.0.1:$PORT, PORT 3000).",
)
@click.option(
    "--secret-file",
    default=os.path.join("var", "signing-secret"),
    show_default=True,
    help="Where `runnerkit up` keeps the secret it signs with; $RUNNERKIT_SIGNING_SECRET wins.",
)
@click.option("--timeout-ms", default=30_000, show_default=True, help="The request's timeoutMs.")
def call(
    capability: str, data: str, runner_url: str | None, secret_file: str, timeout_ms: int
) -> None:
    """Send one signed POST /execute straight to a runner and print its answer.

    Signs with the secret the runner checks, as JobForge would: $RUNNERKIT_SIGNING_SECRET, or
    the one `runnerkit up` (make run) made for its stack. Exit 0 when the job succeeded.

    Example: runnerkit call text-stats --data '{"text": "Hello"}'
    """
    payload = _json_object_arg(data, "--data")
    base = (runner_url or f"http://127.0.0.1:{os.environ.get('PORT', '3000')}").rstrip("/")
    body = json.dumps(
        {
            "jobId": str(uuid.uuid4()),
            "moduleId": "runnerkit-cli",
            "capabilityId": capability,
            "payload": payload,
            "timeoutMs": timeout_ms,
        }
    ).encode()
    headers = {"Content-Type": "application/json"}
    secret = os.environ.get("RUNNERKIT_SIGNING_SECRET") or _read_secret(secret_file)
    if secret:
        headers.update(sign(body, secret))
    else:
        click.echo(
            f"no signing secret ($RUNNERKIT_SIGNING_SECRET, {secret_file}): sending unsigned",
            err=True,
        )
    try:
        response = requests.post(
            base + "/execute", data=body, headers=headers, timeout=(3, timeout_ms / 1000 + 10)
        )
    except requests.RequestException as exc:
        raise click.ClickException(f"cannot reach {base}: {type(exc).__name__}") from None
    try:
        answer = response.json()
    except ValueError:
        raise click.ClickException(
            f"{base} answered {response.status_code} without JSON: {response.text[:200]}"
        ) from None
    click.echo(json.dumps(answer, indent=2, ensure_ascii=False))
    if not (response.ok and isinstance(answer, dict) and answer.get("success") is True):
        sys.exit(1)


def _read_secret(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read().strip()
    except OSError:
        return ""


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
        response = _call("GET", f"{base}/jobs/{job_id}")
        if response.status_code != 200:
            raise click.ClickException(f"JobForge answered {response.status_code}: {response.text}")
        job: dict[str, Any] = response.json()
        if job.get("status") in TERMINAL_STATUSES or time.monotonic() >= deadline:
            return job
        time.sleep(0.2)


@main.command()
@click.option("--url", default=None, help=URL_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def runners(url: str | None, as_json: bool) -> None:
    """List the runners JobForge knows (bearer token: $RUNNERKIT_FORGE_TOKEN, else
    $RUNNERKIT_RUNNER_TOKEN, when set).

    Example: runnerkit runners --json
    """
    response = _call("GET", f"{forge_url(url)}/runners")
    if response.status_code != 200:
        raise click.ClickException(f"JobForge answered {response.status_code}: {response.text}")
    items = response.json().get("items", [])
    if as_json:
        click.echo(json.dumps(items, indent=2))
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


@main.command()
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
    response = _call("GET", f"{forge_url(url)}/jobs", params=params)
    if response.status_code != 200:
        raise click.ClickException(f"JobForge answered {response.status_code}: {response.text}")
    items = response.json().get("items", [])
    if as_json:
        click.echo(json.dumps(items, indent=2))
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


@main.command()
@click.argument("app", default="app:app")
@click.option(
    "--samples",
    default="deploy/sample-jobs.json",
    show_default=True,
    help="JSON list of sample jobs to submit once the runner is registered.",
)
@click.option("--forge-port", default=3002, show_default=True)
@click.option("--runner-port", default=None, type=int, help="Default $PORT or 3000.")
@click.option(
    "--state",
    "state_dir",
    default="var",
    show_default=True,
    help="Folder for the forge database and the runner's state.",
)
@click.option("--exit-after-samples", is_flag=True, help="Stop both once the samples are done.")
def up(
    app: str,
    samples: str,
    forge_port: int,
    runner_port: int | None,
    state_dir: str,
    exit_after_samples: bool,
) -> None:
    """Start the forge and the runner APP, submit sample jobs, show results; Ctrl-C stops both.

    Example: runnerkit up app:app
    """
    from runnerkit.cli.devstack import run_stack

    port = runner_port or int(os.environ.get("PORT", "3000"))
    sys.exit(run_stack(app, samples, forge_port, port, state_dir, exit_after_samples))


main.add_command(conformance)
