"""The hand-written JobRequest loader agrees with the schema, value for value.

``load_job_request`` (every ``POST /jobs`` of the forge) takes a shortcut for plainly valid
bodies; these tests hold the shortcut to the schema's exact result (and the JSON document the
forge stores from it), and make sure errors still come from the schema.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
from marshmallow import ValidationError

from runnerkit.contracts import JobRequestSchema, load_job_request
from runnerkit.contracts.jobs import _load_job_request_fast
from runnerkit.forge import db
from tests.json_strategies import anything, schema_result, uuids

SCHEMA = JobRequestSchema()

times = st.one_of(
    st.sampled_from(
        [
            "2026-11-28T10:00:00Z",
            "2026-11-28T10:00:00.123Z",
            "2026-11-28T10:00Z",
            "2024-02-29T23:59:59.999999Z",
            "2026-11-28T10:00:00+00:00",
            "2026-02-30T10:00:00Z",
            "2026-11-28 10:00:00Z",
        ]
    ),
    st.text(max_size=6),
)

# Values of a parsed JSON body: the forge's parser refuses NaN and Infinity before loading.
finite_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False)
)
objects = st.dictionaries(st.text(max_size=4), finite_scalars, max_size=3)
valid_times = times.filter(lambda t: t.endswith("Z") and len(t) >= 17 and " " not in t)


def mostly(valid: st.SearchStrategy[Any], noise: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``valid`` nine times in ten, else ``noise``: most bodies are then valid or nearly so,
    which is where a shortcut and the schema could disagree."""
    return st.integers(0, 9).flatmap(lambda n: valid if n else noise)


texts = st.text(max_size=5)
payloads = mostly(
    st.fixed_dictionaries(
        {"type": mostly(texts, anything), "data": mostly(objects, anything)},
        optional={
            "version": mostly(texts, anything),
            "options": mostly(objects, anything),
            "extra": anything,
        },
    ),
    anything,
)
metadata = mostly(
    st.fixed_dictionaries(
        {"source": mostly(texts, anything), "createdAt": mostly(valid_times, times)},
        optional={
            "userId": mostly(texts, anything),
            "sessionId": mostly(texts, anything),
            "correlationId": mostly(uuids, anything),
            "causationId": mostly(uuids, anything),
            "tags": mostly(st.lists(st.text(max_size=3), max_size=3), anything),
            "scheduledAt": mostly(valid_times, times),
            "expiresAt": mostly(valid_times, times),
            "extra": anything,
        },
    ),
    anything,
)
bodies = st.fixed_dictionaries(
    {
        "id": mostly(uuids, anything),
        "type": mostly(texts, anything),
        "payload": payloads,
        "metadata": metadata,
    },
    optional={
        "priority": mostly(st.integers(min_value=-3, max_value=103), anything),
        "timeoutMs": mostly(
            st.one_of(
                st.integers(min_value=-5, max_value=10**12),
                st.floats(allow_nan=True, allow_infinity=True),
            ),
            anything,
        ),
        "unknownKey": anything,
    },
)


@settings(max_examples=800)
@given(bodies)
def test_the_shortcut_returns_what_the_schema_returns_or_defers(body: dict[str, Any]) -> None:
    fast = _load_job_request_fast(body)
    expected = schema_result(SCHEMA, body)
    event("shortcut" if fast is not None else "schema")
    if fast is not None:
        assert fast == expected
        assert expected is not None
        assert type(fast["timeoutMs"]) is type(expected["timeoutMs"])
        # The forge stores db.dumps(request): the same document either way.
        assert db.dumps(fast) == db.dumps(expected)


def _valid() -> dict[str, Any]:
    return {
        "id": str(uuid.uuid4()),
        "type": "text.summarize",
        "priority": 70,
        "payload": {"type": "text.summarize", "version": "2.0.0", "data": {"text": "hi"}},
        "metadata": {
            "source": "cli",
            "createdAt": "2026-11-28T10:00:00.000Z",
            "correlationId": str(uuid.uuid4()),
            "tags": ["a"],
        },
        "timeoutMs": 5000,
    }


@pytest.mark.parametrize(
    "change",
    [
        {},
        {"timeoutMs": 2.5},
        {"priority": 0},
        {"extra": [1, 2]},
        {"payload": {"type": "t", "data": {}, "options": {"x": 1}, "other": 1}},
        {"metadata": {"source": "s", "createdAt": "2026-11-28T10:00Z", "userId": "u"}},
    ],
)
def test_plain_valid_requests_take_the_shortcut(change: dict[str, Any]) -> None:
    body = {**_valid(), **change}
    fast = _load_job_request_fast(body)
    assert fast is not None
    assert fast == SCHEMA.load(body)


def test_absent_optional_fields_get_the_schema_defaults() -> None:
    body = _valid()
    del body["priority"], body["timeoutMs"], body["payload"]["version"]
    del body["metadata"]["tags"]
    fast = _load_job_request_fast(body)
    assert fast is not None
    assert (fast["priority"], fast["timeoutMs"], fast["payload"]["version"]) == (50, 30000, "1.0.0")
    assert fast["metadata"]["tags"] == [] and fast["payload"]["options"] == {}
    assert fast["retryPolicy"]["retryableCategories"] == []
    assert fast == SCHEMA.load(body)


def test_the_loaded_request_shares_nothing_mutable_with_the_body_or_other_loads() -> None:
    body = _valid()
    first, second = load_job_request(body), load_job_request(body)
    first["payload"]["data"]["text"] = "changed"
    first["metadata"]["tags"].append("b")
    first["retryPolicy"]["retryableCategories"].append("TIMEOUT")
    assert body["payload"]["data"]["text"] == "hi" and body["metadata"]["tags"] == ["a"]
    assert second["retryPolicy"]["retryableCategories"] == []


def test_a_retry_policy_of_its_own_goes_through_the_schema() -> None:
    body = {**_valid(), "retryPolicy": {"maxRetries": 1}}
    assert _load_job_request_fast(body) is None
    loaded = load_job_request(body)
    assert loaded["retryPolicy"]["maxRetries"] == 1
    assert loaded == SCHEMA.load(body)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"id": "not-a-uuid"}, "id"),
        ({"priority": 101}, "priority"),
        ({"priority": True}, "priority"),
        ({"timeoutMs": 0}, "timeoutMs"),
        ({"timeoutMs": "5000"}, "timeoutMs"),
        ({"payload": [1]}, "payload"),
        ({"payload": {"type": "t"}}, "payload"),
        ({"metadata": {"source": "s", "createdAt": "yesterday"}}, "metadata"),
        (
            {"metadata": {"source": "s", "createdAt": "2026-11-28T10:00:00Z", "tags": [1]}},
            "metadata",
        ),
    ],
)
def test_invalid_requests_fail_with_the_schemas_error(change: dict[str, Any], field: str) -> None:
    body = {**_valid(), **change}
    assert _load_job_request_fast(body) is None
    with pytest.raises(ValidationError) as raised:
        load_job_request(body)
    assert field in raised.value.messages
