"""How many request threads a gunicorn worker of a runner needs, set once its app is loaded.

Only a runner has capabilities with a ``max_concurrency``, so sizing the worker's thread pool
to them is the runner's business; ``deploy/gunicorn.conf.py`` calls :func:`fit_threads` from
``post_worker_init`` (the documented path is ``runnerkit.gunicorn_worker.fit_threads``).
"""

from __future__ import annotations

from typing import Any

from runnerkit.service.request_threads import RequestThreads


def fit_threads(worker: Any, runner: Any) -> int:
    """Give a worker enough request threads for every job its runner advertises; the count.

    ``maxConcurrency`` is per instance and gunicorn decides which worker takes a connection,
    so one worker may be handed every job the instance can run: it needs the sum of its
    capabilities' ``max_concurrency`` in job threads, plus the threads kept for health checks
    (``RUNNERKIT_RESERVED_THREADS``). Called once the app is loaded (``post_worker_init``).
    runnerkit's worker keeps its ``threads`` as the pool's hot core and raises only the
    ceiling (:class:`~runnerkit.service.request_threads.RequestThreads` starts the extra
    threads when jobs hold the core ones); a pool that is already large enough, or of
    another kind, is left as it is.
    """
    have = int(worker.cfg.threads)
    need = runner.settings.reserved_threads + sum(
        int(c.max_concurrency) for c in runner.capabilities.values()
    )
    pool: Any = getattr(worker, "tpool", None)
    if need <= have:
        return have
    if isinstance(pool, RequestThreads):
        pool.max_workers = need
    elif hasattr(pool, "_max_workers"):  # a plain ThreadPoolExecutor (plain gthread)
        pool._max_workers = need
    else:
        return have
    runner.executor.worker_threads = need
    return need
