"""Correlation ids made for jobs that came without one: version 4 uuids, never repeated,
different in every forked worker (the ``random`` generator they come from is reseeded)."""

from __future__ import annotations

import uuid

from runnerkit.runner.job_answers import or_new_id
from tests.support.forking import made_in_children


def test_a_given_correlation_id_is_kept() -> None:
    given = str(uuid.uuid4())
    assert or_new_id(given) == given


def test_new_ids_are_distinct_version_4_uuids() -> None:
    made = [or_new_id(None) for _ in range(20_000)]
    assert len(set(made)) == len(made)
    for text in made[:2000]:
        parsed = uuid.UUID(text)
        assert (parsed.version, parsed.variant, str(parsed)) == (4, uuid.RFC_4122, text)


def test_forked_workers_make_different_ids() -> None:
    ids = [*made_in_children(lambda: or_new_id("")), or_new_id("")]
    assert len(ids) == 3 and len(set(ids)) == 3, ids


def test_envelopes_and_forge_assertions_get_new_version_4_ids_too() -> None:
    """They draw from the same generator (``new_uuid``), not ``os.urandom``."""
    from runnerkit.errors import make_envelope

    ids = [make_envelope("INTERNAL_ERROR", "X", "m", service="s")["id"] for _ in range(500)]
    assert len(set(ids)) == 500
    assert all(uuid.UUID(text).version == 4 for text in ids)
