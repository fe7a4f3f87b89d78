"""``python -m runnerkit`` is the ``runnerkit`` command."""

from runnerkit.cli import main

main()
