"""ContractValidator: check any document against a wire contract, with readable results.

The runner guide's ``contract:validate`` for Python: one call tells whether a document is
valid, and if not, every problem with its path, message, code and the offending value.
Deterministic: nothing is cached between calls, so two schemas' answers cannot mix.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from marshmallow import Schema, ValidationError

from runnerkit.contracts import SCHEMAS
from runnerkit.errors import details_from_validation_error


@dataclass(frozen=True)
class Problem:
    """One reason a document is invalid, or one warning about it."""

    path: list[str]
    message: str
    code: str = "invalid"
    value: Any = None


@dataclass(frozen=True)
class ValidationResult:
    """The verdict on one document."""

    valid: bool
    errors: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)
    data: Any = None

    def __bool__(self) -> bool:
        return self.valid


def _schema(schema: str | Schema | type[Schema]) -> Schema:
    if isinstance(schema, str):
        try:
            return SCHEMAS[schema]()
        except KeyError:
            known = ", ".join(sorted(SCHEMAS))
            raise KeyError(f"unknown contract {schema!r}; known: {known}") from None
    if isinstance(schema, type) and issubclass(schema, Schema):
        return schema()
    if isinstance(schema, Schema):
        return schema
    raise TypeError(f"expected a contract name or a marshmallow schema, got {schema!r}")


def _unknown_keys(schema: Schema, data: Any, path: list[str]) -> list[Problem]:
    """Keys a Zod peer would drop silently: worth a warning, usually a typo."""
    if not isinstance(data, Mapping):
        return []
    known = {f.data_key or name for name, f in schema.fields.items()}
    problems = [
        Problem([*path, str(k)], "unknown key, dropped when parsed", "unknown_key")
        for k in data
        if k not in known
    ]
    for name, fld in schema.fields.items():
        nested = getattr(fld, "schema", None)
        key = fld.data_key or name
        if isinstance(nested, Schema) and key in data:
            value = data[key]
            items = value if isinstance(value, list) else [value]
            for index, item in enumerate(items):
                sub = [*path, key, str(index)] if isinstance(value, list) else [*path, key]
                problems.extend(_unknown_keys(nested, item, sub))
    return problems


class ContractValidator:
    """Validates documents against the contracts (by name) or any marshmallow schema."""

    def validate(self, schema: str | Schema | type[Schema], data: Any) -> ValidationResult:
        target = _schema(schema)
        warnings = _unknown_keys(target, data, [])
        try:
            loaded = target.load(data)
        except ValidationError as exc:
            details = details_from_validation_error(exc, data=data)
            errors = [
                Problem(d.get("path", []), d["message"], d.get("code", "invalid"), d.get("value"))
                for d in details
            ]
            return ValidationResult(False, errors, warnings)
        return ValidationResult(True, [], warnings, loaded)

    def run_suite(
        self, cases: Iterable[tuple[str | Schema | type[Schema], Any, bool]]
    ) -> list[tuple[int, ValidationResult, bool]]:
        """Table-driven checks: each case is ``(schema, data, expected_valid)``.

        Returns the cases whose verdict differed from the expectation (index, result,
        expected); an empty list means the whole table passed.
        """
        failures = []
        for index, (schema, data, expected) in enumerate(cases):
            result = self.validate(schema, data)
            if result.valid != expected:
                failures.append((index, result, expected))
        return failures
