"""Kept import path: the code lives in :mod:`runnerkit.service.gunicorn_settings`."""

from runnerkit.service.gunicorn_settings import (
    gunicorn_config,
    problems,
)

__all__ = [
    "gunicorn_config",
    "problems",
]
