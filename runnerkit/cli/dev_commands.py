"""The commands for developing a runner: ``new`` (scaffold a project) and ``up`` (the forge
and the runner side by side, with sample jobs: :mod:`runnerkit.cli.devstack`)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click


@click.command()
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


@click.command()
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
