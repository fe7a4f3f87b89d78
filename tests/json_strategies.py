"""hypothesis strategies for JSON bodies, shared by the tests that hold a hand-written loader
(``load_execution_request``, ``load_job_request``) to its marshmallow schema."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st
from marshmallow import Schema, ValidationError

#: Any JSON scalar, NaN and Infinity included (a loader must defer those to the schema).
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
)
#: uuids as the contract's pattern takes them, and spellings it does not (upper case, hex).
uuids = st.one_of(
    st.uuids().map(str),
    st.uuids().map(lambda u: str(u).upper()),
    st.uuids().map(lambda u: u.hex),
    st.just("00000000-0000-0000-0000-000000000000"),
)
#: A value of any kind, to put where the contract expects a particular one.
anything = st.one_of(json_scalars, uuids, st.lists(json_scalars, max_size=2))


def schema_result(schema: Schema, body: Any) -> dict[str, Any] | None:
    """What ``schema.load(body)`` returns, or None when it raises ValidationError."""
    try:
        loaded: dict[str, Any] = schema.load(body)
    except ValidationError:
        return None
    return loaded
