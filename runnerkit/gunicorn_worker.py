"""Kept import path: the code lives in :mod:`runnerkit.service.gunicorn_worker`."""

from runnerkit.service.gunicorn_worker import (
    BUFFER_BUDGET,
    CHUNKED_MALFORMED,
    CHUNKED_MORE,
    CHUNKED_TOO_LARGE,
    DEFAULT_BODY_CAP,
    READ_SIZE,
    SWEEP_INTERVAL_S,
    ThreadWorker,
    envelope_response,
    fit_threads,
    scan_chunked,
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
