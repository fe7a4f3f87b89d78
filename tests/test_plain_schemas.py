"""``plain_loader``: a plain schema's quick load returns exactly what ``schema.load`` returns,
or None to let the schema decide; a schema it does not understand gets no loader."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from marshmallow import EXCLUDE, Schema, fields, post_load, pre_load, validate, validates_schema

from runnerkit.contracts import fields as strict
from runnerkit.runner.plain_schemas import plain_loader
from tests.json_strategies import anything, json_scalars, schema_result


class Scalars(Schema):
    text = strict.StrictString(required=True)
    loose = fields.String()
    count = strict.StrictInteger(load_default=3)
    number = fields.Integer(allow_none=True)
    strict_number = fields.Integer(strict=True)
    flag = strict.StrictBoolean(load_default=None)
    shown = fields.String(dump_only=True)


class OneField(Schema):
    text = fields.String(required=True)


PLAIN = [Scalars(), OneField()]
KEYS = ["text", "loose", "count", "number", "strict_number", "flag", "shown", "other"]

bodies = st.one_of(
    st.dictionaries(st.sampled_from(KEYS), st.one_of(json_scalars, anything), max_size=7),
    anything,
)


@pytest.mark.parametrize("schema", PLAIN, ids=lambda s: type(s).__name__)
@settings(max_examples=400, deadline=None)
@given(body=bodies)
def test_the_quick_load_is_the_schemas_load_or_defers_to_it(schema: Schema, body: Any) -> None:
    load = plain_loader(schema)
    assert load is not None
    quick = load(body)
    if quick is not None:
        expected = schema_result(schema, body)
        assert quick == expected
        assert list(quick) == list(expected or {})  # the same keys, in the same order


def test_plainly_valid_bodies_take_the_quick_load() -> None:
    load = plain_loader(Scalars())
    assert load is not None
    assert load({"text": "a", "number": 5, "flag": True}) == {
        "text": "a",
        "count": 3,
        "number": 5,
        "flag": True,
    }
    assert load({"text": "a", "number": 5.0}) is None  # the schema turns it into 5
    assert load({"text": "a", "shown": "x"}) is None  # dump-only: unknown to a load
    assert load({"count": 1}) is None  # a required field missing


class WithHook(Schema):
    text = fields.String()

    @pre_load
    def strip(self, data: Any, **kwargs: Any) -> Any:
        return data


class WithPostLoad(Schema):
    text = fields.String()

    @post_load
    def wrap(self, data: Any, **kwargs: Any) -> Any:
        return data


class WithSchemaCheck(Schema):
    text = fields.String()

    @validates_schema
    def check(self, data: Any, **kwargs: Any) -> None:
        pass


class WithValidator(Schema):
    text = fields.String(validate=validate.Length(max=3))


class Renamed(Schema):
    text = fields.String(data_key="Text")


class Nested(Schema):
    inner = fields.Nested(OneField)


class Excluding(Schema):
    class Meta:
        unknown = EXCLUDE

    text = fields.String()


class LooseBoolean(Schema):
    flag = fields.Boolean(truthy={"yes"})


class MutableDefault(Schema):
    tags = strict.StrictString(load_default=lambda: "made")


@pytest.mark.parametrize(
    "schema",
    [
        WithHook(),
        WithPostLoad(),
        WithSchemaCheck(),
        WithValidator(),
        Renamed(),
        Nested(),
        Excluding(),
        LooseBoolean(),
        MutableDefault(),
        OneField(many=True),
        OneField(partial=True),
    ],
    ids=lambda s: type(s).__name__,
)
def test_schemas_it_does_not_understand_get_no_quick_load(schema: Schema) -> None:
    assert plain_loader(schema) is None
