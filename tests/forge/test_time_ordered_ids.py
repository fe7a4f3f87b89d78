"""The forge's own event and assertion ids: version 7 uuids, sorted by time, never repeated,
different in forked workers (their random bits come from the reseeded ``random`` generator)."""

from __future__ import annotations

import os
import time
import uuid

from runnerkit.forge.db import time_ordered_id


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
    read, write = os.pipe()
    children = []
    for _ in range(2):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            os.write(write, (time_ordered_id() + "\n").encode())
            os._exit(0)
        children.append(pid)
    os.close(write)
    for pid in children:
        os.waitpid(pid, 0)
    with os.fdopen(read) as lines:
        ids = lines.read().split()
    ids.append(time_ordered_id())
    assert len(ids) == 3 and len({text[14:] for text in ids}) == 3, ids
