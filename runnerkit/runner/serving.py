"""What a serving runner changes after its executor and lifecycle are made, shared with both.

The :class:`~runnerkit.runner.app.Runner` owns one :class:`Serving` per app it serves and
hands it to its :class:`~runnerkit.runner.execution.Executor` and
:class:`~runnerkit.runner.lifecycle.Lifecycle` instead of itself: they read the few values
that change while the runner serves (the settings read when an app is served, the drain flag
SIGTERM sets, the outbox made once JobForge is configured) as plain attributes of this small
object. That is the cheapest live read on the ``/execute`` path (no call, no property), and it
keeps the pipeline and the lifecycle free of the Runner (only :mod:`runnerkit.runner.app`
builds them from it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from runnerkit.runner.config import Settings
    from runnerkit.runner.outbox import Outbox


class Serving:
    """The live values of one served app (see the module docstring)."""

    __slots__ = ("drain_deadline", "draining", "outbox", "settings")

    def __init__(self, settings: Settings) -> None:
        #: The runner's settings; the Runner replaces them (``Runner.settings`` in step) when
        #: an app is served and again in a gunicorn worker of a preloaded app.
        self.settings = settings
        #: True once the instance is shutting down: ready turns 503, new jobs get 503.
        self.draining = False
        #: When (time.monotonic()) a drain must be done: the graceful timeout less a margin.
        self.drain_deadline = 0.0
        #: Durable delivery of async results, progress and assertions (with JobForge only).
        self.outbox: Outbox | None = None
