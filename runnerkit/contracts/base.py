"""The base class of every contract schema, and validators the contracts share."""

from __future__ import annotations

from marshmallow import EXCLUDE, Schema, validate

__all__ = ["NONNEGATIVE", "PERCENT", "POSITIVE", "UNIT_INTERVAL", "ContractSchema", "one_of"]

#: Zod ``.positive()``: strictly greater than zero.
POSITIVE = validate.Range(min=0, min_inclusive=False)
#: Zod ``.nonnegative()``.
NONNEGATIVE = validate.Range(min=0)
#: 0-100 inclusive (cpu/memory usage, priority).
PERCENT = validate.Range(min=0, max=100)
#: 0-1 inclusive (confidence).
UNIT_INTERVAL = validate.Range(min=0, max=1)


def one_of(choices: tuple[str, ...]) -> validate.OneOf:
    """An exact, case-sensitive enum check (Zod ``z.enum``)."""
    return validate.OneOf(choices)


class ContractSchema(Schema):
    """Base for every wire schema.

    Zod's ``z.object`` strips unknown keys rather than failing, so ``unknown = EXCLUDE``
    (marshmallow's default, RAISE, would turn a newer peer's extra field into a 400).
    A top-level value that is not an object fails with a ``_schema`` error.
    """

    class Meta:
        unknown = EXCLUDE
