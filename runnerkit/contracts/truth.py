"""TruthCore assertion and query contracts (``types/truth.ts``)."""

from __future__ import annotations

from marshmallow import fields

from .base import NONNEGATIVE, POSITIVE, UNIT_INTERVAL, ContractSchema
from .fields import (
    AnyJSON,
    Object,
    Record,
    StrictBoolean,
    StrictInteger,
    StrictNumber,
    StrictString,
    StringList,
    UUIDString,
    ZDateTime,
)

__all__ = [
    "TruthAssertionSchema",
    "TruthFiltersSchema",
    "TruthPatternSchema",
    "TruthQueryResultSchema",
    "TruthQuerySchema",
]


class TruthAssertionSchema(ContractSchema):
    """A (subject, predicate, object) fact with a source and a confidence.

    ``object`` is any JSON value including null, but the key must be present: Zod's union
    of string/number/boolean/null/array/object does not accept ``undefined``.
    """

    id = UUIDString(required=True)
    subject = StrictString(required=True)
    predicate = StrictString(required=True)
    object = AnyJSON(required=True)
    confidence = StrictNumber(load_default=1, validate=UNIT_INTERVAL)
    source = StrictString(required=True)
    timestamp = ZDateTime(required=True)
    expiresAt = ZDateTime()
    metadata = Record(load_default=dict)


class TruthPatternSchema(ContractSchema):
    """What to match: any of subject, predicate, object (object may be null)."""

    subject = StrictString()
    predicate = StrictString()
    object = AnyJSON()


class TruthFiltersSchema(ContractSchema):
    """Query filters: minimum confidence, sources, time window."""

    minConfidence = StrictNumber(load_default=0, validate=UNIT_INTERVAL)
    sources = StringList()
    before = ZDateTime()
    after = ZDateTime()


class TruthQuerySchema(ContractSchema):
    """``POST /query``: a pattern, filters and a page window."""

    id = UUIDString(required=True)
    pattern = Object(TruthPatternSchema, required=True)
    filters = Object(TruthFiltersSchema, default_empty=True)
    limit = StrictInteger(load_default=100, validate=POSITIVE)
    offset = StrictInteger(load_default=0, validate=NONNEGATIVE)


class TruthQueryResultSchema(ContractSchema):
    """The answer to a TruthQuery."""

    queryId = UUIDString(required=True)
    assertions = fields.List(Object(TruthAssertionSchema), required=True)
    totalCount = StrictInteger(required=True, validate=NONNEGATIVE)
    hasMore = StrictBoolean(load_default=False)
    queryTimeMs = StrictNumber(required=True, validate=NONNEGATIVE)
