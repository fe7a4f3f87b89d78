"""The conformance suite's sample inputs: each one passes the schema it was made from, and a
schema the generator cannot satisfy is said so, never sent as if valid."""

from __future__ import annotations

from typing import Any

import pytest

from runnerkit.conformance.samples import SampleError, sample_for, schema_problems

DRAFT = "https://json-schema.org/draft/2020-12/schema"


@pytest.mark.parametrize(
    ("schema", "expected"),
    [
        (
            {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]},
            {"text": "sample"},
        ),
        ({"type": "object", "properties": {"text": {"type": "string"}}}, {}),
        ({"type": "integer", "minimum": 3, "maximum": 9}, 3),
        ({"type": "integer", "exclusiveMinimum": 0}, 1),
        ({"type": "number", "maximum": 0.5}, 0.5),
        ({"type": "integer", "minimum": 1, "multipleOf": 5}, 5),
        ({"type": "string", "minLength": 10}, "samplexxxx"),
        ({"type": "string", "maxLength": 3}, "sam"),
        ({"type": "string", "enum": ["b", "a"]}, "b"),
        ({"type": "string", "format": "date-time"}, "2026-01-01T00:00:00.000Z"),
        ({"type": "string", "format": "uuid"}, "00000000-0000-4000-8000-000000000001"),
        ({"type": "string", "format": "email"}, "runner@example.com"),
        ({"type": "array", "items": {"type": "boolean"}, "minItems": 2}, [True, True]),
        ({"type": ["null", "integer"]}, 1),
        ({"anyOf": [{"type": "string"}, {"type": "integer"}]}, "sample"),
        ({"type": "integer", "default": 7, "minimum": 0}, 7),
        (
            {
                "type": "object",
                "$defs": {
                    "Item": {
                        "type": "object",
                        "properties": {"n": {"type": "integer"}},
                        "required": ["n"],
                    }
                },
                "properties": {"item": {"$ref": "#/$defs/Item"}},
                "required": ["item"],
            },
            {"item": {"n": 1}},
        ),
    ],
)
def test_a_sample_is_the_plainest_value_the_schema_accepts(
    schema: dict[str, Any], expected: Any
) -> None:
    schema = {"$schema": DRAFT, **schema}
    assert sample_for(schema) == expected
    assert schema_problems(schema, expected) == []


def test_a_schema_the_generator_cannot_satisfy_is_reported_not_sent() -> None:
    schema = {
        "$schema": DRAFT,
        "type": "object",
        "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}$"}},
        "required": ["code"],
    }
    with pytest.raises(SampleError, match=r"code: .* does not match .*--samples"):
        sample_for(schema)


def test_a_reference_outside_the_schema_is_refused() -> None:
    with pytest.raises(SampleError, match="outside the schema"):
        sample_for({"$ref": "https://example.com/schema.json"})
