"""A worker process that leaves the instance's new connections to its sibling workers.

gunicorn's workers accept from one listening socket, so each takes about an equal share of
the instance's new connections. A process with other work of its own (the forge's
dispatching worker: its dispatcher and send threads) then competes for its GIL with every
request it serves. On 2 cores, a forge whose dispatching worker served no requests spent
about 8 % less CPU per job end to end and completed about 5 % more jobs per second.

While a process yields (:func:`yield_to_siblings`), its
:class:`~runnerkit.service.gunicorn_worker.ThreadWorker` takes no new connection (the
listening socket leaves its poller at the next turn of its loop); the connections it holds
are served to their end. It yields only where that cannot leave the instance deaf: in a
ThreadWorker whose arbiter has another worker alive. The caller asks again now and then (the
forge's dispatcher: every second), so a sibling that died, or a worker count cut to one
(``TTOU``), has it accepting again within that second, meanwhile new connections wait in the
listening socket's backlog.
"""

from __future__ import annotations

import os
from typing import Protocol

import psutil


class Worker(Protocol):
    """What this module needs of the worker: its arbiter's pid, and a call that has its main
    loop follow :data:`yielding` at once (from any thread)."""

    ppid: int

    def yielding_changed(self) -> None: ...


_worker: Worker | None = None
_pid = 0
#: Whether this process leaves new connections to its siblings: read by the worker's main
#: loop at every turn (a module global, so the read costs no call).
yielding = False


def attach(worker: Worker) -> None:
    """The worker whose main loop runs in this process (``ThreadWorker.run``)."""
    global _worker, _pid, yielding
    _worker, _pid, yielding = worker, os.getpid(), False


def yield_to_siblings(on: bool) -> bool:
    """Leave new connections to the sibling workers (``on``), or take a share again.

    Returns whether this process now yields: never outside a ThreadWorker (another server,
    a test client, a forked child of the worker), nor while no sibling worker is alive.
    Cheap when nothing changes, but ``on`` looks for siblings (a scan of the processes): call
    it every second or so, not per request.
    """
    global yielding
    worker = _worker
    if worker is None or _pid != os.getpid():
        return False
    if on and not siblings_alive(worker.ppid):
        on = False
    if on != yielding:
        yielding = on
        worker.yielding_changed()  # followed now, not after the loop's next event
    return on


def siblings_alive(ppid: int) -> bool:
    """Whether the arbiter ``ppid`` has a live child process other than this one."""
    me = os.getpid()
    try:
        children = psutil.Process(ppid).children()
    except psutil.Error:
        return False
    for child in children:
        if child.pid == me:
            continue
        try:
            if child.status() != psutil.STATUS_ZOMBIE:
                return True
        except psutil.Error:
            continue
    return False
