"""Default gunicorn settings for a runnerkit runner (used by `make run` and the Dockerfile).

gthread workers keep a worker's main loop (and gunicorn's liveness notification) running while
request threads run jobs; runnerkit keeps RUNNERKIT_RESERVED_THREADS of each worker's threads
free of jobs so /health answers while every worker is busy. GUNICORN_PIN_WORKERS=1 pins each
worker to one CPU (see runnerkit/affinity.py for when that pays).
"""

import os

bind = f"{os.environ.get('BIND_HOST', '127.0.0.1')}:{os.environ.get('PORT', '3000')}"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
# gthread, with gunicorn's own error pages (414, 431, malformed requests) as ErrorEnvelopes.
worker_class = "runnerkit.gunicorn_worker.ThreadWorker"
# gunicorn's own lines as JSON, like the runner's (unless RUNNERKIT_LOG_FORMAT=text).
logger_class = "runnerkit.gunicorn_logging.JsonLogger"
# Request threads per worker kept busy. Unless GUNICORN_THREADS is set, a runner's workers
# may start more, up to what their capabilities need (post_worker_init), while long jobs hold
# these: a job within maxConcurrency gets a thread, short requests queue for these.
threads = int(os.environ.get("GUNICORN_THREADS", "8"))
# Above the largest capability timeout (the example's is 60 s); the runner checks at startup.
timeout = int(os.environ.get("GUNICORN_TIMEOUT", "120"))
graceful_timeout = int(os.environ.get("GUNICORN_GRACEFUL_TIMEOUT", "60"))
keepalive = 5
# gunicorn 25.1+ opens a control socket at one path per user (~/.gunicorn/gunicorn.ctl), which
# every gunicorn of that user takes over; runnerkit does not use it (older gunicorns ignore this).
control_socket_disable = True


def post_fork(server, worker):  # type: ignore[no-untyped-def]
    """Tell the app how many request threads it has, before it is loaded in the worker.

    Keep this instant: it runs before the worker installs its own signal handlers, so a
    SIGTERM arriving meanwhile is lost and the worker would live on until killed.
    """
    os.environ["RUNNERKIT_WORKER_THREADS"] = str(worker.cfg.threads)


def post_worker_init(worker):  # type: ignore[no-untyped-def]
    """Pin the worker to a CPU when asked; size its threads to the capabilities (unless
    GUNICORN_THREADS says how many). The runner itself says at startup when these settings
    cannot hold a capability's timeout (runnerkit.gunicorn_settings)."""
    from runnerkit.affinity import pin_worker
    from runnerkit.gunicorn_worker import fit_threads

    pin_worker(worker.age)
    runner = getattr(worker.wsgi, "extensions", {}).get("runnerkit")
    if runner is not None and "GUNICORN_THREADS" not in os.environ:
        fit_threads(worker, runner)


def on_exit(server):  # type: ignore[no-untyped-def]
    """Deregister from JobForge before the master exits (in a container, its exit ends all)."""
    from runnerkit.lifecycle import on_master_exit

    on_master_exit()
