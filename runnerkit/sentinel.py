"""Kept import path: the code lives in :mod:`runnerkit.runner.sentinel`."""

from runnerkit.runner.sentinel import (
    main,
    wait_for_exit,
)

__all__ = [
    "main",
    "wait_for_exit",
]
