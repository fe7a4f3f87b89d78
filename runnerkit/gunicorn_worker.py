"""Kept import path: the code lives in :mod:`runnerkit.service.gunicorn_worker` (the worker),
:mod:`runnerkit.service.chunked_framing`, :mod:`runnerkit.service.client_sockets` and
:mod:`runnerkit.runner.thread_fitting`."""

from runnerkit.runner.thread_fitting import fit_threads
from runnerkit.service.chunked_framing import (
    CHUNKED_MALFORMED,
    CHUNKED_MORE,
    CHUNKED_TOO_LARGE,
    DEFAULT_BODY_CAP,
    scan_chunked,
)
from runnerkit.service.client_sockets import envelope_response
from runnerkit.service.gunicorn_worker import (
    BUFFER_BUDGET,
    READ_SIZE,
    SWEEP_INTERVAL_S,
    ThreadWorker,
)

__all__ = [
    "BUFFER_BUDGET",
    "CHUNKED_MALFORMED",
    "CHUNKED_MORE",
    "CHUNKED_TOO_LARGE",
    "DEFAULT_BODY_CAP",
    "READ_SIZE",
    "SWEEP_INTERVAL_S",
    "ThreadWorker",
    "envelope_response",
    "fit_threads",
    "scan_chunked",
]
