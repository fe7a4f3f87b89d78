"""The runner framework: what a runner author's service is made of.

It builds on :mod:`runnerkit.service` and :mod:`runnerkit.contracts` and never imports the
forge. ``from runnerkit.runner import Runner`` is kept as the documented path to the class.
"""

from runnerkit.runner.app import Runner

__all__ = ["Runner"]
