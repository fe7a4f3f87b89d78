"""The ``runnerkit`` command."""

from __future__ import annotations

import importlib
import json
import sys
from typing import Any

import click

from runnerkit._version import __version__


def load_runner(spec: str) -> Any:
    """Import ``module:variable`` as gunicorn does and find its Runner."""
    from runnerkit.runner import EXTENSION_KEY, Runner

    module_name, _, attr = spec.partition(":")
    sys.path.insert(0, "")
    module = importlib.import_module(module_name)
    target = getattr(module, attr or "app")
    if isinstance(target, Runner):
        return target
    runner = getattr(target, "extensions", {}).get(EXTENSION_KEY)
    if runner is None:
        raise click.ClickException(f"{spec} is neither a Runner nor a Flask app serving one")
    return runner


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
    except (ImportError, AttributeError) as exc:
        raise click.ClickException(f"cannot load {app}: {exc}") from None
    click.echo(json.dumps(runner.registration_document(), indent=2))
