"""How the forge is served: the gunicorn command of ``runnerkit forge`` and ``runnerkit up``.

One place for it, so the command people run, the development stack and ``make bench`` serve
the forge the same way.
"""

from __future__ import annotations

import sys

#: gunicorn workers. The worker that holds the dispatcher lock takes no new connections while
#: a sibling is alive (:mod:`runnerkit.service.new_connections`): two serve the API, one
#: dispatches. Interleaved bursts of 3,000 jobs (one runner, 2 cores): with the dispatching
#: worker serving its share as well, 3 workers and 2 cost the same CPU per job and 4 more;
#: with it yielding, 3 workers spent 5 to 10 % less CPU per job than before, 2 about as
#: little, 4 more (a third process competing for the 2 cores).
WORKERS = 3

#: Options after ``--bind`` and ``--workers``: gthread, so ``/health`` and the dashboard answer
#: while requests wait on the database, and a short graceful timeout (the dispatcher's sends
#: are bounded by their own HTTP timeouts).
OPTIONS = (
    "--worker-class",
    "runnerkit.service.gunicorn_worker.ThreadWorker",  # gthread; its own errors as ErrorEnvelopes
    "--threads",
    "16",
    "--graceful-timeout",
    "10",
)


def no_control_socket() -> list[str]:
    """``--no-control-socket`` where gunicorn has one (25.1 and later), else nothing.

    gunicorn's control socket sits at one path per user (``~/.gunicorn/gunicorn.ctl``): every
    gunicorn the user starts takes it over from the last, and a read-only home logs an error.
    runnerkit does not use it.
    """
    from gunicorn.config import KNOWN_SETTINGS

    if any(s.name == "control_socket_disable" for s in KNOWN_SETTINGS):
        return ["--no-control-socket"]
    return []


def gunicorn_argv(bind: str, workers: int = WORKERS) -> list[str]:
    """``python -m gunicorn runnerkit.forge:app`` bound to ``bind`` (``host:port``)."""
    return [
        sys.executable,
        "-m",
        "gunicorn",
        "runnerkit.forge:app",
        "--bind",
        bind,
        "--workers",
        str(workers),
        *OPTIONS,
        *no_control_socket(),
    ]
