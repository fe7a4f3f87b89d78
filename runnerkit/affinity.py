"""Kept import path: the code lives in :mod:`runnerkit.service.affinity`."""

from runnerkit.service.affinity import (
    PIN_WORKERS_ENV,
    pin_requested,
    pin_worker,
)

__all__ = [
    "PIN_WORKERS_ENV",
    "pin_requested",
    "pin_worker",
]
