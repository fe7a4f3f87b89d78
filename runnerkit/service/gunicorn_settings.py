"""Whether the gunicorn serving a runner can keep the runner's promises, said at startup.

``deploy/gunicorn.conf.py`` (and ``./gunicorn.conf.py``, which plain ``gunicorn app:app``
reads) sets what a runner needs: runnerkit's gthread worker class, a worker timeout above the
largest capability timeout, more request threads than the ones kept for ``/health``. Served
any other way (another config, ``--worker-class sync``, a short ``--timeout``), a long job
would be killed mid-run with gunicorn's HTML 500 instead of the promised ``504 TIMEOUT``, or
``/health`` would not answer while jobs run. This module finds the settings gunicorn is
actually using and returns one line per problem, naming the setting to change.
"""

from __future__ import annotations

import signal
from typing import Any

from gunicorn.workers import gthread


def gunicorn_config() -> Any | None:
    """The ``gunicorn.config.Config`` of this gunicorn process, or None outside gunicorn.

    gunicorn hands the app no reference to its settings, but by the time a worker loads the
    app it has installed its signal handlers, bound methods of the worker (of the arbiter,
    with ``--preload``), which hold them as ``cfg``.
    """
    for sig in (signal.SIGUSR1, signal.SIGQUIT, signal.SIGTERM):
        owner = getattr(signal.getsignal(sig), "__self__", None)
        cfg = getattr(owner, "cfg", None)
        if type(cfg).__module__ == "gunicorn.config":
            return cfg
    return None


def problems(cfg: Any, max_timeout_s: float, reserved_threads: int) -> list[str]:
    """What in gunicorn's settings ``cfg`` breaks a runner's promises, a line each."""
    lines = []
    worker_class = cfg.worker_class
    threaded = isinstance(worker_class, type) and issubclass(worker_class, gthread.ThreadWorker)
    if not threaded:
        lines.append(
            f"gunicorn serves with the {cfg.worker_class_str!r} worker class: a job cannot be "
            "answered 504 TIMEOUT at its deadline nor /health while jobs run; serve with "
            "-c deploy/gunicorn.conf.py, or --worker-class "
            "runnerkit.gunicorn_worker.ThreadWorker --threads 8"
        )
    elif cfg.threads <= reserved_threads:
        lines.append(
            f"gunicorn runs {cfg.threads} threads per worker and RUNNERKIT_RESERVED_THREADS "
            f"keeps {reserved_threads} of them for /health: no job can run; raise "
            "GUNICORN_THREADS (--threads)"
        )
    if cfg.timeout and cfg.timeout <= max_timeout_s:
        lines.append(
            f"gunicorn's worker timeout ({cfg.timeout} s) is not above the largest capability "
            f"timeout ({max_timeout_s:g} s): a job running that long is killed with an HTML "
            "500; raise GUNICORN_TIMEOUT (--timeout)"
        )
    return lines
