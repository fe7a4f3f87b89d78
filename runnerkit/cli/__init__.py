"""The ``runnerkit`` command: inspect a runner, run the reference control plane, submit jobs.

The click group lives here (``runnerkit.cli:main`` is the console script); its commands live in
modules by what they do: :mod:`~runnerkit.cli.runner_commands` (one runner),
:mod:`~runnerkit.cli.forge_commands` (the control plane), :mod:`~runnerkit.cli.dev_commands`
(a project and its dev stack) and :mod:`runnerkit.conformance.command`.
"""

from __future__ import annotations

import click

from runnerkit._version import __version__
from runnerkit.cli.dev_commands import new, up
from runnerkit.cli.forge_commands import forge, jobs, runners, submit
from runnerkit.cli.runner_commands import call, manifest, validate
from runnerkit.conformance.command import conformance


@click.group()
@click.version_option(__version__, prog_name="runnerkit")
def main() -> None:
    """runnerkit: write, run and check ControlPlane job runners."""


for _command in (manifest, new, validate, forge, submit, call, runners, jobs, up, conformance):
    main.add_command(_command)
