"""Kept import path: the code lives in :mod:`runnerkit.service.gunicorn_logging`."""

from runnerkit.service.gunicorn_logging import (
    JsonLogger,
)

__all__ = [
    "JsonLogger",
]
