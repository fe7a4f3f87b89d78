"""Property tests for the strict contract fields."""

from __future__ import annotations

import math
import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from marshmallow import Schema, ValidationError

from runnerkit.contracts import (
    ContractSchema,
    StrictInteger,
    StrictNumber,
    UUIDString,
    ZDateTime,
    format_timestamp,
    parse_timestamp,
)


def _schema(field: Any) -> Schema:
    return ContractSchema.from_dict({"v": field})()


UUID_SCHEMA = _schema(UUIDString())
ZDT_SCHEMA = _schema(ZDateTime())
INT_SCHEMA = _schema(StrictInteger())
NUM_SCHEMA = _schema(StrictNumber())


def load(schema: Schema, value: Any) -> Any:
    return schema.load({"v": value})["v"]


def rejects(schema: Schema, value: Any) -> bool:
    try:
        schema.load({"v": value})
    except ValidationError as error:
        return "v" in error.messages
    return False


def _is_canonical_uuid(text: str) -> bool:
    """Independent oracle: the stdlib parses it and prints it back the same (modulo case)."""
    if len(text) != 36 or not text.isascii():
        return False
    try:
        return str(uuid.UUID(text)) == text.lower()
    except ValueError:
        return False


# ---------------------------------------------------------------- uuid

any_uuid = st.one_of(
    st.uuids(),
    st.builds(uuid.uuid1),
    st.builds(uuid.uuid4),
    st.uuids(version=1),
    st.uuids(version=4),
)


@given(any_uuid, st.sampled_from([str.lower, str.upper]))
def test_any_uuid_string_loads_unchanged(value: uuid.UUID, case: Any) -> None:
    text = case(str(value))
    loaded = load(UUID_SCHEMA, text)
    assert loaded == text and isinstance(loaded, str)


@given(st.text(max_size=60))
def test_random_text_is_not_a_uuid(text: str) -> None:
    assume(not _is_canonical_uuid(text))
    assert rejects(UUID_SCHEMA, text)


@given(st.uuids(), st.integers(min_value=0, max_value=35), st.characters())
def test_one_wrong_character_breaks_a_uuid(value: uuid.UUID, index: int, char: str) -> None:
    text = str(value)
    mutated = text[:index] + char + text[index + 1 :]
    assume(not _is_canonical_uuid(mutated))
    assert rejects(UUID_SCHEMA, mutated)
    assert rejects(UUID_SCHEMA, text[:index] + text[index + 1 :])
    assert rejects(UUID_SCHEMA, text + "0")


# ---------------------------------------------------------------- datetime

aware_datetimes = st.datetimes(
    min_value=datetime(1, 1, 2),
    max_value=datetime(9999, 12, 30),
    timezones=st.sampled_from(
        [UTC, timezone(timedelta(hours=5, minutes=30)), timezone(timedelta(hours=-8))]
    ),
)


def _truncated_to_ms(dt: datetime) -> datetime:
    return dt.replace(microsecond=dt.microsecond // 1000 * 1000)


@given(aware_datetimes)
def test_formatted_timestamps_load_and_round_trip(dt: datetime) -> None:
    text = format_timestamp(dt)
    assert text.endswith("Z") and len(text) == 24
    assert load(ZDT_SCHEMA, text) == text
    assert parse_timestamp(text) == _truncated_to_ms(dt)
    assert ZDT_SCHEMA.dump({"v": dt}) == {"v": text}


@given(st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30)))
def test_naive_datetimes_are_taken_as_utc(dt: datetime) -> None:
    assert parse_timestamp(format_timestamp(dt)) == _truncated_to_ms(dt).replace(tzinfo=UTC)


@given(
    aware_datetimes,
    st.sampled_from(["+00:00", "-00:00", "+01:00", "-08:00", "+0000", "z", "", " Z", "Z "]),
)
def test_offsets_other_than_z_rejected(dt: datetime, suffix: str) -> None:
    text = format_timestamp(dt)[:-1] + suffix
    assert rejects(ZDT_SCHEMA, text)
    assert rejects(ZDT_SCHEMA, dt.isoformat())


@given(st.dates(min_value=datetime(1, 1, 1).date()), st.integers(0, 23), st.integers(0, 59))
def test_every_real_date_and_time_is_accepted(day: Any, hour: int, minute: int) -> None:
    text = f"{day.isoformat()}T{hour:02d}:{minute:02d}Z"
    assert load(ZDT_SCHEMA, text) == text


@given(st.integers(1, 9999), st.integers(1, 12), st.integers(1, 31))
def test_calendar_check_matches_the_stdlib(year: int, month: int, day: int) -> None:
    text = f"{year:04d}-{month:02d}-{day:02d}T00:00:00Z"
    try:
        datetime(year, month, day)
    except ValueError:
        assert rejects(ZDT_SCHEMA, text)
    else:
        assert load(ZDT_SCHEMA, text) == text


# ---------------------------------------------------------------- integers and numbers


@given(st.integers())
def test_int_accepts_any_int(value: int) -> None:
    loaded = load(INT_SCHEMA, value)
    assert loaded == value and type(loaded) is int


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_int_accepts_integral_floats_only(value: float) -> None:
    if value.is_integer():
        loaded = load(INT_SCHEMA, value)
        assert loaded == int(value) and type(loaded) is int
    else:
        assert rejects(INT_SCHEMA, value)


@given(st.floats(allow_nan=False, allow_infinity=False) | st.integers())
def test_number_accepts_finite_numbers_unchanged(value: float) -> None:
    loaded = load(NUM_SCHEMA, value)
    assert loaded == value and type(loaded) is type(value)


@given(st.booleans() | st.text() | st.none() | st.lists(st.integers(), max_size=2))
def test_number_never_accepts_bool_str_or_null(value: Any) -> None:
    assert rejects(NUM_SCHEMA, value)
    assert rejects(INT_SCHEMA, value)


@given(st.sampled_from([math.nan, -math.nan, math.inf, -math.inf]))
def test_non_finite_floats_rejected(value: float) -> None:
    assert rejects(NUM_SCHEMA, value)
    assert rejects(INT_SCHEMA, value)


@given(st.integers(min_value=2**53, max_value=2**200) | st.integers(max_value=-(2**53)))
def test_large_ints_keep_exact_value(value: int) -> None:
    assert load(NUM_SCHEMA, value) == value
    assert load(INT_SCHEMA, value) == value
    assert NUM_SCHEMA.dump({"v": value}) == {"v": value}


@pytest.mark.parametrize("text", ["5", "5.0", "1e3", "NaN", "Infinity", "0x10"])
def test_numeric_strings_never_coerced(text: str) -> None:
    assert rejects(NUM_SCHEMA, text)
    assert rejects(INT_SCHEMA, text)
