"""A quicker ``Schema.load`` for the plainest schemas and values, to exactly the schema's result.

Every job loads its payload through the capability's ``Input`` schema and checks its result by
loading it through ``Output`` again, and marshmallow's generic machinery (hooks, partial loads,
error collection, one field object call per value) costs more than a trivial job's own code.
Most schemas are a handful of scalar fields. :func:`plain_loader` looks at a schema once: when
it has no hooks, no validators, no renamed or nested fields and refuses unknown keys, it
returns a loader that takes a dict whose values all have the field's exact JSON type and
returns what ``schema.load`` would return; anything else (another type, a missing or unknown
key, ``None``) returns None, and the schema itself then loads the value, and alone words any
error. Schemas it does not understand get no loader at all.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from marshmallow import RAISE, Schema, fields
from marshmallow.utils import missing

from runnerkit.contracts import fields as strict

#: Fields whose load of a value of the given exact type returns the value itself.
_PLAIN_TYPES: dict[type[fields.Field], type] = {
    fields.String: str,
    strict.StrictString: str,
    fields.Integer: int,
    strict.StrictInteger: int,
    strict.StrictBoolean: bool,
}
#: Defaults a missing key may take as they are (marshmallow neither copies nor checks them).
_PLAIN_DEFAULTS = (str, int, bool, type(None))

PlainLoader = Callable[[Any], dict[str, Any] | None]


def plain_loader(schema: Schema) -> PlainLoader | None:
    """A loader for ``schema`` (see the module docstring), or None when it is not plain."""
    if (
        schema.many
        or schema.partial
        or schema.unknown != RAISE
        or any(schema._hooks.values())
        or not schema.load_fields
    ):
        return None
    plan: list[tuple[str, type, bool, Any]] = []
    for name, field in schema.load_fields.items():
        kind = _PLAIN_TYPES.get(type(field))
        if (
            kind is None
            or field.validators
            or field.data_key not in (None, name)
            or field.attribute not in (None, name)
            or (
                field.load_default is not missing
                and type(field.load_default) not in _PLAIN_DEFAULTS
            )
        ):
            return None
        plan.append((name, kind, field.required, field.load_default))
    names = frozenset(name for name, _, _, _ in plan)

    def load(data: Any) -> dict[str, Any] | None:
        if type(data) is not dict or not names.issuperset(data):
            return None
        loaded: dict[str, Any] = {}
        for name, kind, required, default in plan:
            if name in data:
                value = data[name]
                if type(value) is not kind:
                    return None
                loaded[name] = value
            elif required:
                return None
            elif default is not missing:
                loaded[name] = default
        return loaded

    return load
