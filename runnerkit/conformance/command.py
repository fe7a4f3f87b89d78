"""The ``runnerkit conformance`` command: options, exit status, text, JSON and JUnit output."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click

from .checks import Suite
from .probe import Probe
from .sources import Advertised, SourceError, from_file, from_forge, from_runner


def read_samples(path: str) -> dict[str, list[Any]]:
    """``--samples``: a JSON object of capability id → a payload object or a list of them."""
    try:
        with open(path, encoding="utf-8") as handle:
            document = json.load(handle)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise click.BadParameter(f"cannot read {path}: {exc}", param_hint="--samples") from None
    if not isinstance(document, dict):
        raise click.BadParameter(
            "must be a JSON object of capability id to payload", param_hint="--samples"
        )
    samples: dict[str, list[Any]] = {}
    for capability_id, value in document.items():
        payloads = value if isinstance(value, list) else [value]
        if not payloads or not all(isinstance(p, dict) for p in payloads):
            raise click.BadParameter(
                f"{capability_id}: a payload object or a non-empty list of them",
                param_hint="--samples",
            )
        samples[capability_id] = payloads
    return samples


@click.command()
@click.argument("url")
@click.option(
    "--manifest",
    "manifest_path",
    default=None,
    help="The runner's registration document (JSON) listing its capabilities.",
)
@click.option(
    "--forge",
    "forge_url",
    default=None,
    help="Read the capabilities from this forge (GET /runners): the runner registered at URL.",
)
@click.option(
    "--samples",
    "samples_path",
    default=None,
    help="JSON object of capability id to a payload (or a list of payloads) to send.",
)
@click.option(
    "--signing-secret",
    envvar="RUNNERKIT_SIGNING_SECRET",
    default="",
    show_envvar=True,
    help="Sign every request with it, and check that unsigned and badly signed ones fail.",
)
@click.option(
    "--timeout",
    "timeout_s",
    default=10.0,
    show_default=True,
    help="Seconds to wait for an answer (for /execute: the capability's timeoutMs + 10 s).",
)
@click.option("--junit", "junit_path", default=None, help="Also write a JUnit XML report here.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def conformance(
    url: str,
    manifest_path: str | None,
    forge_url: str | None,
    samples_path: str | None,
    signing_secret: str,
    timeout_s: float,
    junit_path: str | None,
    as_json: bool,
) -> None:
    """Check a live runner at URL against the contracts, over HTTP, whatever it is written in.

    Sends its health route, a valid POST /execute for each advertised capability (sample
    input made from each inputSchema, or --samples), malformed requests, a redelivered jobId
    and, with --signing-secret, signed and badly signed requests; judges every answer against
    RunnerExecutionResponse, ErrorEnvelope and HealthCheck. Capabilities come from --manifest,
    --forge, or else the runner's own GET /capabilities. Requests go to URL only (and to
    --forge for its runner list): no redirects are followed, no proxy is used.

    Exit 0 when every required check passes, 1 when one fails, 2 when the suite cannot run.

    Example: runnerkit conformance http://127.0.0.1:3000 --junit reports/conformance.xml
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        click.echo(f"error: {url!r} is not an http(s) URL", err=True)
        sys.exit(2)
    if manifest_path and forge_url:
        click.echo("error: give --manifest or --forge, not both", err=True)
        sys.exit(2)
    samples = read_samples(samples_path) if samples_path else {}
    probe = Probe(url, timeout_s=timeout_s, signing_secret=signing_secret)
    try:
        advertised: Advertised
        if manifest_path:
            advertised = from_file(manifest_path)
        elif forge_url:
            advertised = from_forge(forge_url, url)
        else:
            advertised = from_runner(probe)
        report = Suite(probe, advertised, samples=samples).run()
    except SourceError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    finally:
        probe.close()
    if junit_path:
        Path(junit_path).parent.mkdir(parents=True, exist_ok=True)
        Path(junit_path).write_text(report.as_junit(), encoding="utf-8")
    click.echo(json.dumps(report.as_dict(), indent=2) if as_json else report.as_text())
    sys.exit(0 if report.passed else 1)
