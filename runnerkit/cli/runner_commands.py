"""The commands that look at or talk to one runner: ``manifest``, ``validate`` and ``call``.

Each takes the runner's app as gunicorn does (``module:variable``, :func:`load_runner`) or its
URL, and needs no forge.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import uuid
from pathlib import Path
from typing import Any

import click
import requests

from runnerkit.cli.options import json_object_arg
from runnerkit.service.signing import sign


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


@click.command()
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


@click.command()
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


@click.command()
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
    payload = json_object_arg(data, "--data")
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
