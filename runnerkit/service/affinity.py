"""Optional CPU pinning of gunicorn workers: ``GUNICORN_PIN_WORKERS=1``.

A worker's threads take turns holding one GIL. Spread over several CPUs, every hand-over
between them (a request thread waking its job thread, and back) is a wake-up across CPUs;
with the whole worker on one CPU the same hand-over costs a fraction of that, and
``make bench`` measures the difference at 16 and 64 connections. The price: a capability
whose work runs outside the GIL (numpy, compression, image code) gets one CPU per worker
instead of several, and on a shared host a pinned worker cannot move off a busy CPU. So it
is off unless asked for; ``deploy/gunicorn.conf.py`` calls :func:`pin_worker` once the
worker is up (``post_worker_init``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

#: The environment variable that turns pinning on (``1``, ``true``, ``yes`` or ``on``).
PIN_WORKERS_ENV = "GUNICORN_PIN_WORKERS"


def pin_requested(environ: Mapping[str, str] = os.environ) -> bool:
    return environ.get(PIN_WORKERS_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def pin_worker(age: int, environ: Mapping[str, str] = os.environ) -> int | None:
    """Pin the calling process to one of the CPUs it may use, round robin by gunicorn's
    worker ``age``; the CPU chosen, or None when pinning is off or not possible here."""
    if not pin_requested(environ) or not hasattr(os, "sched_setaffinity"):
        return None
    cpus = sorted(os.sched_getaffinity(0))
    cpu = cpus[age % len(cpus)]
    os.sched_setaffinity(0, {cpu})
    return cpu
