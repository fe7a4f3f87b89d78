"""The forge's own event and assertion ids: version 7 uuids, sorted by time, never repeated,
different in forked workers (their random bits come from the reseeded ``random`` generator)."""

from __future__ import annotations

import time
import uuid

from runnerkit.forge.db import time_ordered_id
from tests.support.forking import made_in_children


def test_ids_are_distinct_version_7_uuids_in_time_order() -> None:
    made = []
    for _ in range(5):
        made += [time_ordered_id() for _ in range(2000)]
        time.sleep(0.002)
    assert len(set(made)) == len(made)
    for text in made[::50]:
        parsed = uuid.UUID(text)
        assert (parsed.version, parsed.variant, str(parsed)) == (7, uuid.RFC_4122, text)
    stamps = [int(text.replace("-", "")[:12], 16) for text in made]
    assert stamps == sorted(stamps)
    assert abs(stamps[-1] - time.time() * 1000) < 60_000


def test_forked_workers_draw_different_ids() -> None:
    ids = [*made_in_children(time_ordered_id), time_ordered_id()]
    assert len(ids) == 3 and len({text[14:] for text in ids}) == 3, ids
