"""Sample inputs made from a capability's ``inputSchema``, for the conformance suite.

A small generator for the JSON Schema a capability's input uses (``type``, ``properties``,
``required``, ``enum``/``const``/``default``/``examples``, numeric bounds, string lengths,
``items``, ``format``, local ``$ref``, ``anyOf``/``oneOf``/``allOf``). It makes the plainest
value that should pass: required properties only, the lowest allowed numbers, the shortest
allowed strings. Every sample is then checked against the schema itself, so a schema this
generator does not understand (a ``pattern``, say) is reported as such and never sent as if it
were valid; the runner team can give its own samples with ``--samples``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from jsonschema import SchemaError
from jsonschema.validators import validator_for

#: A fixed value for each ``format`` a capability schema commonly uses.
FORMAT_VALUES: dict[str, str] = {
    "date-time": "2026-01-01T00:00:00.000Z",
    "date": "2026-01-01",
    "time": "00:00:00Z",
    "uuid": "00000000-0000-4000-8000-000000000001",
    "email": "runner@example.com",
    "idn-email": "runner@example.com",
    "uri": "https://example.com/",
    "url": "https://example.com/",
    "iri": "https://example.com/",
    "uri-reference": "https://example.com/",
    "hostname": "example.com",
    "idn-hostname": "example.com",
    "ipv4": "192.0.2.1",
    "ipv6": "2001:db8::1",
    "duration": "PT1S",
}

_MAX_DEPTH = 32


class SampleError(ValueError):
    """No valid sample could be made from a schema; the message says why."""


def sample_for(schema: Mapping[str, Any]) -> Any:
    """A value that ``schema`` accepts; raises :class:`SampleError` when none can be made."""
    value = _value(schema, schema, 0)
    problems = schema_problems(schema, value)
    if problems:
        raise SampleError(
            "the generated sample does not pass the inputSchema ("
            + "; ".join(problems[:3])
            + "): give one with --samples"
        )
    return value


def schema_problems(schema: Mapping[str, Any], value: Any) -> list[str]:
    """Why ``value`` does not pass ``schema`` (``path: message``); empty when it does."""
    try:
        cls = validator_for(schema)
        cls.check_schema(schema)
    except SchemaError as exc:
        return [f"the schema itself is invalid: {exc.message}"]
    validator = cls(schema, format_checker=cls.FORMAT_CHECKER)
    return [
        f"{'.'.join(str(p) for p in error.absolute_path) or '(root)'}: {error.message}"
        for error in sorted(validator.iter_errors(value), key=lambda e: list(e.absolute_path))
    ]


def _resolve(root: Mapping[str, Any], ref: str) -> Mapping[str, Any]:
    if not ref.startswith("#"):
        raise SampleError(f"$ref {ref!r} points outside the schema")
    node: Any = root
    for part in ref[1:].split("/")[1:] if ref != "#" else []:
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, Mapping) or part not in node:
            raise SampleError(f"$ref {ref!r} does not resolve")
        node = node[part]
    if not isinstance(node, Mapping):
        raise SampleError(f"$ref {ref!r} is not a schema")
    return node


def _value(schema: Any, root: Mapping[str, Any], depth: int) -> Any:
    if depth > _MAX_DEPTH:
        raise SampleError("the schema nests too deeply (a recursive $ref?)")
    if schema is True or schema == {}:
        return None
    if schema is False or not isinstance(schema, Mapping):
        raise SampleError("a part of the schema accepts nothing")
    if "$ref" in schema:
        merged = {
            **_resolve(root, schema["$ref"]),
            **{k: v for k, v in schema.items() if k != "$ref"},
        }
        return _value(merged, root, depth + 1)
    for key in ("const",):
        if key in schema:
            return schema[key]
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    if "default" in schema:
        return schema["default"]
    if isinstance(schema.get("examples"), list) and schema["examples"]:
        return schema["examples"][0]
    for key in ("anyOf", "oneOf"):
        if isinstance(schema.get(key), list) and schema[key]:
            return _value(schema[key][0], root, depth + 1)
    if isinstance(schema.get("allOf"), list):
        merged = {k: v for k, v in schema.items() if k != "allOf"}
        for part in schema["allOf"]:
            if isinstance(part, Mapping):
                part = _resolve(root, part["$ref"]) if "$ref" in part else part
                merged.setdefault("properties", {})
                merged["properties"] = {**merged["properties"], **part.get("properties", {})}
                merged["required"] = [*merged.get("required", []), *part.get("required", [])]
                merged.update({k: v for k, v in part.items() if k not in merged})
        return _value(merged, root, depth + 1)
    kind = _type(schema)
    if kind == "object":
        return _object(schema, root, depth)
    if kind == "array":
        return _array(schema, root, depth)
    if kind == "string":
        return _string(schema)
    if kind in ("integer", "number"):
        return _number(schema, integer=kind == "integer")
    if kind == "boolean":
        return True
    return None


def _type(schema: Mapping[str, Any]) -> str:
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if isinstance(kind, str):
        return kind
    if "properties" in schema or "required" in schema:
        return "object"
    if "items" in schema:
        return "array"
    return "null"


def _object(schema: Mapping[str, Any], root: Mapping[str, Any], depth: int) -> dict[str, Any]:
    properties = schema.get("properties") or {}
    result: dict[str, Any] = {}
    for name in schema.get("required") or []:
        result[name] = _value(properties.get(name, {}), root, depth + 1)
    return result


def _array(schema: Mapping[str, Any], root: Mapping[str, Any], depth: int) -> list[Any]:
    count = max(int(schema.get("minItems", 0)), 1)
    if "maxItems" in schema:
        count = min(count, int(schema["maxItems"]))
    prefix = schema.get("prefixItems") or []
    items = schema.get("items", {})
    return [_value(prefix[i] if i < len(prefix) else items, root, depth + 1) for i in range(count)]


def _string(schema: Mapping[str, Any]) -> str:
    text = FORMAT_VALUES.get(str(schema.get("format", "")), "sample")
    low = int(schema.get("minLength", 0))
    high = int(schema["maxLength"]) if "maxLength" in schema else None
    if len(text) < low:
        text = text + "x" * (low - len(text))
    if high is not None and len(text) > high:
        text = text[:high]
    return text


def _number(schema: Mapping[str, Any], *, integer: bool) -> float | int:
    # Draft 4's boolean exclusiveMinimum/Maximum are not bounds of their own.
    low, exclusive_low, high, exclusive_high, step = (
        None if isinstance(v, bool) else v
        for v in (
            schema.get("minimum"),
            schema.get("exclusiveMinimum"),
            schema.get("maximum"),
            schema.get("exclusiveMaximum"),
            schema.get("multipleOf"),
        )
    )
    if isinstance(low, (int, float)):
        value: float = low
    elif isinstance(exclusive_low, (int, float)):
        value = exclusive_low + (step or 1)
    else:
        value = 1
    if isinstance(high, (int, float)) and value > high:
        value = high
    if isinstance(exclusive_high, (int, float)) and value >= exclusive_high:
        value = exclusive_high - (step or 1)
    if isinstance(step, (int, float)) and step > 0:
        value = math.ceil(value / step) * step
    if integer:
        return math.ceil(value)
    return int(value) if float(value).is_integer() else value
