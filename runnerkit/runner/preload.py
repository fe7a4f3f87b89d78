"""The app imported in the gunicorn master before it forks its workers (``--preload``).

Without ``--preload`` each worker imports the app, and ``Runner.init_app`` starts what belongs
to one process there: the lifecycle scheduler, the drain handler, the sentinel, the metrics
directory. With it, the master imports the app once, before it binds its sockets, and forks
the workers from that copy: whatever started in the master would run in the master alone
(the master would register and heartbeat, read port 3000 before the bind, and take its own
parent for the instance's owner), and no worker would start anything.

So ``init_app`` in the master only wires the app (:func:`in_gunicorn_master` tells) and hands
the per-process start to :func:`start_in_workers`. An ``os.register_at_fork`` hook then finds,
in each child the master forks, the gunicorn ``Worker`` being booted (a local of the master's
frame that forked it) and runs the start where the worker would have imported the app: in its
``load_wsgi``, after gunicorn's ``post_fork`` hook and its own signal handlers (so the drain
handler chains in front of them), with the sockets bound. Children forked for anything else
(gunicorn re-executing itself on USR2, a job's isolated process) start nothing.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from types import FrameType
from typing import Any

log = logging.getLogger("runnerkit")

#: What each worker forked by this master runs once it loads the app (in order).
_STARTS: list[Callable[[], None]] = []
#: The master that preloaded the app; 0 until :func:`start_in_workers` is first called.
_MASTER_PID = 0


def _gunicorn_classes() -> tuple[type, type] | None:
    """gunicorn's ``Arbiter`` and ``Worker`` classes, if gunicorn runs this process."""
    arbiter = sys.modules.get("gunicorn.arbiter")
    worker = sys.modules.get("gunicorn.workers.base")
    if arbiter is None or worker is None:
        return None
    return arbiter.Arbiter, worker.Worker


def _on_stack(kind: type, frame: FrameType | None) -> Any:
    """The first ``kind`` instance among the locals of ``frame`` and its callers, or None."""
    while frame is not None:
        for value in frame.f_locals.values():
            if isinstance(value, kind):
                return value
        frame = frame.f_back
    return None


def in_gunicorn_master() -> bool:
    """Whether the caller runs in a gunicorn master loading the app (``--preload``).

    The master's ``Arbiter`` is on the stack while it loads the app; in a worker, the worker
    being booted is too (its stack is the master's, forked, plus the worker's own frames).
    """
    classes = _gunicorn_classes()
    if classes is None:
        return False
    arbiter, worker = classes
    frame = sys._getframe(1)
    return _on_stack(arbiter, frame) is not None and _on_stack(worker, frame) is None


def start_in_workers(start: Callable[[], None]) -> None:
    """Run ``start`` in every worker this master forks, when the worker loads the app."""
    global _MASTER_PID
    if not _STARTS:
        _MASTER_PID = os.getpid()
        os.register_at_fork(after_in_child=_after_fork_in_child)
    _STARTS.append(start)


def _after_fork_in_child() -> None:
    if os.getppid() != _MASTER_PID:
        return  # forked by a worker (an isolated job), not by the master
    classes = _gunicorn_classes()
    worker = _on_stack(classes[1], sys._getframe(1)) if classes is not None else None
    if worker is None:
        return  # not a worker being booted: gunicorn re-executing itself, say
    load_wsgi = worker.load_wsgi

    def load_and_start() -> None:
        for start in _STARTS:
            start()
        load_wsgi()

    worker.load_wsgi = load_and_start
