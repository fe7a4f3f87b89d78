"""What forked children of the test process make: for ids drawn from a per-process generator
(the ``random`` module's, reseeded in every child)."""

from __future__ import annotations

import os
from collections.abc import Callable


def made_in_children(make: Callable[[], str], children: int = 2) -> list[str]:
    """``make()`` called once in each of ``children`` forked children: their results."""
    read, write = os.pipe()
    pids = []
    for _ in range(children):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            try:
                os.write(write, (make() + "\n").encode())
            finally:
                os._exit(0)
        pids.append(pid)
    os.close(write)
    for pid in pids:
        os.waitpid(pid, 0)
    with os.fdopen(read) as lines:
        return lines.read().split()
