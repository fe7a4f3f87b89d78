"""The hand-written RunnerExecutionRequest loader agrees with the schema, value for value.

``load_execution_request`` takes a shortcut for plainly valid bodies; these tests hold the
shortcut to the schema's exact result, and make sure errors still come from the schema.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from marshmallow import ValidationError

from runnerkit.contracts import RunnerExecutionRequestSchema, load_execution_request
from runnerkit.contracts.runners import _load_execution_request_fast
from runnerkit.errors import ValidationFailed
from runnerkit.runner.execution import check_json_limits
from tests.json_strategies import anything, json_scalars, schema_result, uuids

SCHEMA = RunnerExecutionRequestSchema()

objects = st.dictionaries(st.text(max_size=4), json_scalars, max_size=3)
metadata = st.one_of(
    anything,
    st.fixed_dictionaries(
        {},
        optional={
            "correlationId": st.one_of(uuids, anything),
            "userId": st.one_of(st.text(max_size=5), anything),
            "extra": anything,
        },
    ),
)
bodies = st.fixed_dictionaries(
    {},
    optional={
        "jobId": st.one_of(uuids, anything),
        "moduleId": st.one_of(st.text(max_size=5), anything),
        "capabilityId": st.one_of(st.text(max_size=5), anything),
        "payload": st.one_of(objects, anything),
        "timeoutMs": st.one_of(
            st.integers(min_value=-5, max_value=10**12),
            st.floats(allow_nan=True, allow_infinity=True),
            anything,
        ),
        "metadata": metadata,
        "unknownKey": anything,
    },
)


@settings(max_examples=600)
@given(bodies)
def test_the_shortcut_returns_what_the_schema_returns_or_defers(body: dict[str, Any]) -> None:
    fast = _load_execution_request_fast(body)
    expected = schema_result(SCHEMA, body)
    if fast is not None:
        assert fast == expected
        assert type(fast["timeoutMs"]) is type(expected["timeoutMs"])  # type: ignore[index]


def _valid() -> dict[str, Any]:
    return {
        "jobId": str(uuid.uuid4()),
        "moduleId": "m",
        "capabilityId": "echo",
        "payload": {"text": "hi"},
        "timeoutMs": 5000,
        "metadata": {"correlationId": str(uuid.uuid4())},
    }


@pytest.mark.parametrize(
    "change",
    [
        {},
        {"timeoutMs": 2.5},
        {"metadata": {}},
        {"metadata": {"userId": "u", "other": 1}},
        {"extra": [1, 2]},
    ],
)
def test_plain_valid_requests_take_the_shortcut(change: dict[str, Any]) -> None:
    body = {**_valid(), **change}
    fast = _load_execution_request_fast(body)
    assert fast is not None
    assert fast == SCHEMA.load(body)


def test_absent_optional_fields_get_the_schema_defaults() -> None:
    body = _valid()
    del body["timeoutMs"], body["metadata"]
    fast = _load_execution_request_fast(body)
    assert fast is not None
    assert fast["timeoutMs"] == 30000
    assert fast["metadata"] == {}
    assert fast == SCHEMA.load(body)


def test_the_loaded_payload_is_a_copy() -> None:
    body = _valid()
    loaded = load_execution_request(body)
    loaded["payload"]["text"] = "changed"
    assert body["payload"]["text"] == "hi"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"jobId": "not-a-uuid"}, "jobId"),
        ({"timeoutMs": True}, "timeoutMs"),
        ({"timeoutMs": 0}, "timeoutMs"),
        ({"timeoutMs": "5000"}, "timeoutMs"),
        ({"payload": [1]}, "payload"),
        ({"metadata": None}, "metadata"),
        ({"metadata": {"correlationId": "x"}}, "metadata"),
    ],
)
def test_invalid_requests_fail_with_the_schemas_error(change: dict[str, Any], field: str) -> None:
    body = {**_valid(), **change}
    assert _load_execution_request_fast(body) is None
    with pytest.raises(ValidationError) as raised:
        load_execution_request(body)
    assert field in raised.value.messages


# ---------------------------------------------------------------- JSON limits from bytes

json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=4)),
    lambda children: st.one_of(
        st.lists(children, max_size=3), st.dictionaries(st.text(max_size=3), children, max_size=3)
    ),
    max_leaves=12,
)


def _verdict(value: Any, depth: int, keys: int, raw: bytes | None) -> str | None:
    try:
        check_json_limits(value, depth, keys, raw)
    except ValidationFailed as error:
        return error.code
    return None


@settings(max_examples=400)
@given(
    json_values,
    st.integers(min_value=1, max_value=6),
    st.integers(min_value=0, max_value=8),
    st.booleans(),
)
def test_the_byte_count_shortcut_never_changes_the_verdict(
    value: Any, depth: int, keys: int, ascii_only: bool
) -> None:
    raw = json.dumps(value, ensure_ascii=ascii_only).encode()
    assert _verdict(value, depth, keys, raw) == _verdict(value, depth, keys, None)


def test_an_escaped_lone_surrogate_is_still_refused_with_the_shortcut() -> None:
    raw = b'{"text": "\\ud800"}'
    value = json.loads(raw)
    assert _verdict(value, 64, 1000, raw) == "INVALID_JSON"
