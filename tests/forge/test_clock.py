"""The forge's Clock: the contract timestamp and its milliseconds, read as datetime reads an
epoch time (microseconds rounded half to even), without making a datetime."""

from __future__ import annotations

import random
from datetime import UTC, datetime

from runnerkit.contracts import format_timestamp
from runnerkit.forge.jobs import Clock
from runnerkit.forge.truth import epoch


def _by_datetime(ts: float) -> tuple[str, float]:
    moment = datetime.fromtimestamp(ts, UTC)
    whole_ms = moment.replace(microsecond=moment.microsecond // 1000 * 1000)
    return format_timestamp(moment), whole_ms.timestamp()


def test_clock_reads_an_instant_as_datetime_does() -> None:
    rng = random.Random(7)
    instants = [rng.uniform(0, 4e9) for _ in range(20_000)]
    # Where rounding to microseconds carries into the next millisecond or second.
    instants += [
        second + edge
        for second in range(1_700_000_000, 1_700_000_050)
        for edge in (0.0, 0.0000005, 0.0009995, 0.9994999, 0.9999995, 0.9999996)
    ]
    for ts in instants:
        clock = Clock(ts)
        assert (clock.z, clock.ms) == _by_datetime(ts), ts
        assert clock.ms == epoch(clock.z)


def test_now_is_now() -> None:
    before = datetime.now(UTC).timestamp()
    clock = Clock()
    after = datetime.now(UTC).timestamp()
    assert before - 0.001 <= clock.ms <= after
    assert clock.z.endswith("Z") and len(clock.z) == 24
