"""SIGTERM: how a worker learns its instance is stopping, and how long its drain may take.

The handler only flips :attr:`Serving.draining <runnerkit.runner.serving.Serving.draining>`
(ready turns 503, new jobs get 503) and sets the drain's deadline before gunicorn's own
handler runs; the lifecycle's drain (:meth:`Lifecycle.drain
<runnerkit.runner.lifecycle.Lifecycle.drain>`) does the rest within that deadline.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from types import FrameType

from runnerkit.runner.serving import Serving

#: gunicorn's default graceful timeout, for a drain whose worker does not say its own.
DEFAULT_GRACEFUL_S = 30.0
#: How often a draining worker looks whether its jobs are done and the outbox delivered.
DRAIN_POLL_S = 0.1


def install_drain_handler(serving: Serving) -> None:
    """On SIGTERM, turn ready off and refuse new jobs before gunicorn's own handler runs.

    gunicorn then stops accepting, lets in-flight requests finish (up to its graceful
    timeout) and exits; a request that still reaches the app meanwhile gets 503. The
    lifecycle's drain (:meth:`Lifecycle.drain`) has until the graceful timeout less a margin
    (gunicorn's handler is a method of the worker, whose settings say it).
    """
    if threading.current_thread() is not threading.main_thread():
        return
    previous = signal.getsignal(signal.SIGTERM)
    cfg = getattr(getattr(previous, "__self__", None), "cfg", None)
    graceful = getattr(cfg, "graceful_timeout", None)
    graceful_s = float(graceful) if isinstance(graceful, int | float) else DEFAULT_GRACEFUL_S
    budget_s = graceful_s - max(0.5, min(2.0, 0.2 * graceful_s))

    def on_term(signum: int, frame: FrameType | None) -> None:
        if not serving.draining:
            serving.drain_deadline = time.monotonic() + budget_s
        serving.draining = True
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)

    if getattr(previous, "__runnerkit_drain__", False):
        return
    on_term.__runnerkit_drain__ = True  # type: ignore[attr-defined]
    signal.signal(signal.SIGTERM, on_term)
    signal.siginterrupt(signal.SIGTERM, False)
