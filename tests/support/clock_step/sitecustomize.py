"""A wall clock a test can step, for the processes it starts (imported at their start-up).

A process started with this directory on ``PYTHONPATH`` and ``RUNNERKIT_TEST_CLOCK_OFFSET``
naming a file reads ``time.time()`` (and ``time.time_ns()``) as the real time plus the
number of seconds in that file, read again at most every 20 ms: writing the file steps
the wall clock of every such process, as an NTP step or an operator would, without
touching the machine's. ``time.monotonic()`` is left alone, as a real step leaves it.
"""

from __future__ import annotations

import os
import time

_PATH = os.environ.get("RUNNERKIT_TEST_CLOCK_OFFSET", "")

if _PATH:
    _real_time, _real_time_ns, _monotonic = time.time, time.time_ns, time.monotonic
    _state = [0.0, -1.0]  # the offset in seconds, when to read the file again (monotonic)

    def _offset() -> float:
        now = _monotonic()
        if now >= _state[1]:
            try:
                with open(_PATH, encoding="ascii") as handle:
                    _state[0] = float(handle.read().strip() or 0)
            except (OSError, ValueError):
                pass
            _state[1] = now + 0.02
        return _state[0]

    def _time() -> float:
        return _real_time() + _offset()

    def _time_ns() -> int:
        return _real_time_ns() + int(_offset() * 1e9)

    time.time = _time
    time.time_ns = _time_ns
