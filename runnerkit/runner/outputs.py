"""A capability's result checked as its advertised ``outputSchema`` reads it.

The ``outputSchema`` a runner registers is its ``Output`` marshmallow schema through apispec
(:mod:`runnerkit.schema_export`): a stock ``Integer`` says ``"type": "integer"``, a
``Boolean`` ``"type": "boolean"``, a ``String`` ``"type": "string"``, and a schema whose
``Meta.unknown`` is ``RAISE`` (marshmallow's default) says ``additionalProperties: false``.
Dumping a result through marshmallow says something else: ``Integer`` turns ``"640"`` into
640 and truncates 5.5, ``String`` turns 5 into ``"5"``, ``Boolean`` passes ``"true"`` through,
and a key the schema does not declare is dropped without a word. A peer that validates the
answer against the advertised schema, and the capability's author, deserve the same rules.

So before the dump, :class:`OutputCheck` looks at the result itself:

- a key no field declares is refused (``Unknown field.``) where the schema is ``RAISE``;
  ``INCLUDE`` (advertised ``additionalProperties: true``) carries it into the answer as it
  is; ``EXCLUDE`` (advertised without ``additionalProperties``, so anything goes) drops it;
- a value of the wrong JSON type for a field whose serialisation is a stock conversion
  (``String``, ``Email``, ``URL``, ``Integer``, ``Float``, ``Number``, ``Decimal``,
  ``Boolean`` and runnerkit's strict fields) is refused ("Not a valid integer.") instead of
  being coerced;
- nested schemas, lists and dict values are checked the same way, at any depth.

Fields whose serialisation is their own (``DateTime``, ``Date``, ``UUID``, ``Enum``,
``Decimal`` values for numbers, ``Nested`` objects with attributes, custom fields, ``Raw``)
are left to marshmallow: a ``datetime`` for a ``DateTime`` is what such a field is for.
The table of checks is built once per schema (nested ones on first use), so a result costs a
dictionary lookup and a type test per field.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Any

from marshmallow import INCLUDE, RAISE, Schema, fields

from runnerkit.contracts.fields import StrictBoolean, StrictInteger, StrictNumber

#: The problems found in one value: marshmallow's shape (a list of messages, or a dict of
#: them by key or index), None when there are none.
Problems = list[str] | dict[Any, Any] | None
ValueCheck = Callable[[Any], Problems]

UNKNOWN_FIELD = "Unknown field."
_ATTRIBUTE = "_runnerkit_output_check"
_MISSING = object()


def _is_string(value: Any) -> bool:
    return isinstance(value, str)


def _is_integer(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, numbers.Integral):
        return True
    if isinstance(value, float):
        return value.is_integer()  # 5.0 is the JSON integer 5; NaN and infinities are not
    if isinstance(value, Decimal):
        return value.is_finite() and value == value.to_integral_value()
    return False


def _is_number(value: Any) -> bool:
    # NaN passes here and is refused by the field's own load ("special"), as before.
    return not isinstance(value, bool) and isinstance(value, numbers.Real | Decimal)


def _is_boolean(value: Any) -> bool:
    return isinstance(value, bool)


#: Serialisers that convert whatever they are given (or pass it through unchanged): the
#: fields using them get a type test. A field class with a serialiser of its own is trusted.
_STRING_SERIALISERS = (fields.String._serialize,)
_NUMBER_SERIALISERS = (
    fields.Number._serialize,
    StrictNumber._serialize,
    StrictInteger._serialize,
)
_BOOLEAN_SERIALISERS = (fields.Field._serialize, StrictBoolean._serialize)


#: What a value of another JSON type is told, whatever the field's own ``invalid`` message
#: (an ``Email``'s says "Not a valid email address.", which 5 is not the problem with).
_STRING = ["Not a valid string."]
_INTEGER = ["Not a valid integer."]
_NUMBER = ["Not a valid number."]
_BOOLEAN = ["Not a valid boolean."]


def _scalar(test: Callable[[Any], bool], common: type, message: list[str]) -> ValueCheck:
    """A check of one JSON type: ``common`` (``str``, ``int``, ``bool``) passes at the cost
    of one ``type()`` test, anything else asks ``test``."""

    def check(value: Any) -> Problems:
        # None is left to the field's allow_none, which the load after the dump applies.
        if type(value) is common or value is None or test(value):
            return None
        return message

    return check


def _items(inner: ValueCheck) -> ValueCheck:
    def check(value: Any) -> Problems:
        if not isinstance(value, list | tuple):
            return None  # the field's own serialisation says what is wrong
        problems = {}
        for index, item in enumerate(value):
            found = inner(item)
            if found:
                problems[index] = found
        return problems or None

    return check


def _values(inner: ValueCheck) -> ValueCheck:
    def check(value: Any) -> Problems:
        if not isinstance(value, Mapping):
            return None
        problems = {}
        for key, item in value.items():
            found = inner(item)
            if found:
                problems[key] = found
        return problems or None

    return check


def _nested(field: fields.Nested) -> ValueCheck:
    resolved: list[OutputCheck] = []  # on first use: the nested schema may name its parent

    def check(value: Any) -> Problems:
        if value is None:
            return None
        if not resolved:
            resolved.append(OutputCheck.of(field.schema))
        plan = resolved[0]
        if field.many:
            if not isinstance(value, list | tuple):
                return None
            problems = {}
            for index, item in enumerate(value):
                found = plan.problems(item) if isinstance(item, Mapping) else None
                if found:
                    problems[index] = found
            return problems or None
        if not isinstance(value, Mapping):
            return None  # an object with attributes is what Nested serialises too
        return plan.problems(value) or None

    return check


def value_check(field: fields.Field) -> ValueCheck | None:
    """The check of one field's raw value, or None when the field's own serialiser decides."""
    serialise = type(field)._serialize
    if serialise in _STRING_SERIALISERS:
        return _scalar(_is_string, str, _STRING)
    if serialise in _NUMBER_SERIALISERS:
        if isinstance(field, fields.Integer):
            return _scalar(_is_integer, int, _INTEGER)
        return _scalar(_is_number, float, _NUMBER)
    if isinstance(field, fields.Boolean) and serialise in _BOOLEAN_SERIALISERS:
        return _scalar(_is_boolean, bool, _BOOLEAN)
    if isinstance(field, fields.Nested) and serialise is fields.Nested._serialize:
        return _nested(field)
    if isinstance(field, fields.List) and serialise is fields.List._serialize:
        inner = value_check(field.inner)
        return _items(inner) if inner is not None else None
    if isinstance(field, fields.Mapping) and serialise is fields.Mapping._serialize:
        value_field = field.value_field
        inner = value_check(value_field) if value_field is not None else None
        return _values(inner) if inner is not None else None
    return None


class OutputCheck:
    """The advertised schema's rules for one marshmallow schema instance, built once."""

    def __init__(self, schema: Schema) -> None:
        self.unknown = schema.unknown or RAISE
        declared: set[Any] = set()
        checks: list[tuple[str, str, ValueCheck]] = []
        self.nested: list[tuple[str, str, fields.Nested]] = []
        for name, field in schema.fields.items():
            attribute = field.attribute or name
            declared.add(attribute.split(".", 1)[0])
            if "." in attribute:
                continue  # a dotted path into the result: left to marshmallow
            key = field.data_key or name
            check = value_check(field)
            if check is not None:
                checks.append((attribute, key, check))
            if isinstance(field, fields.Nested) and type(field)._serialize is (
                fields.Nested._serialize
            ):
                self.nested.append((attribute, key, field))
        self.declared = frozenset(declared)
        self.checks = tuple(checks)
        self._carries: bool | None = None

    @classmethod
    def of(cls, schema: Schema) -> OutputCheck:
        """The check of ``schema``, kept on the instance (a nested field makes its schema
        once, so this is built once per schema in use)."""
        check: OutputCheck | None = schema.__dict__.get(_ATTRIBUTE)
        if check is None:
            check = cls(schema)
            setattr(schema, _ATTRIBUTE, check)
        return check

    def problems(self, result: Mapping[str, Any]) -> dict[Any, Any]:
        """What the advertised schema refuses in ``result``, keyed as marshmallow keys errors."""
        found: dict[Any, Any] = {}
        for attribute, key, check in self.checks:
            value = result.get(attribute, _MISSING)
            if value is not _MISSING:
                problem = check(value)
                if problem:
                    found[key] = problem
        if self.unknown == RAISE and not self.declared.issuperset(result):
            for name in result:
                if name not in self.declared:
                    found[name] = [UNKNOWN_FIELD]
        return found

    @property
    def carries(self) -> bool:
        """Whether this schema, or one nested in it, keeps undeclared keys (``INCLUDE``)."""
        if self._carries is None:
            self._carries = False  # a schema nested in itself is not asked twice
            self._carries = self.unknown == INCLUDE or any(
                OutputCheck.of(field.schema).carries for _, _, field in self.nested
            )
        return self._carries

    def carry(self, result: Mapping[str, Any], data: dict[str, Any]) -> None:
        """Copy the undeclared keys an ``INCLUDE`` schema accepts from ``result`` into the
        dumped ``data`` (the dump drops them; the advertised schema allows them)."""
        if self.unknown == INCLUDE:
            for name, value in result.items():
                if name not in self.declared:
                    data[name] = value
        for attribute, key, field in self.nested:
            plan = OutputCheck.of(field.schema)
            if not plan.carries:
                continue
            raw, dumped = result.get(attribute), data.get(key)
            pairs = zip(raw, dumped, strict=False) if field.many and raw and dumped else []
            if not field.many:
                pairs = [(raw, dumped)]
            for raw_item, dumped_item in pairs:
                if isinstance(raw_item, Mapping) and isinstance(dumped_item, dict):
                    plan.carry(raw_item, dumped_item)
