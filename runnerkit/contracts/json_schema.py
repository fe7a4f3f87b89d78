"""JSON Schema from marshmallow schemas, through apispec's marshmallow converter.

Capabilities describe their input and output once, as marshmallow schemas; the registration
document and the OpenAPI document need them as JSON Schema. apispec does the conversion; this
module only turns its component references into self-contained ``$defs`` so that each
capability's schema stands alone.
"""

from __future__ import annotations

import copy
from typing import Any

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin, OpenAPIConverter
from apispec.ext.marshmallow.common import resolve_schema_instance
from marshmallow import EXCLUDE, INCLUDE, Schema, fields

JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
_COMPONENT_PREFIX = "#/components/schemas/"


def new_spec(title: str = "runnerkit", version: str = "1.0.0") -> tuple[APISpec, MarshmallowPlugin]:
    """An OpenAPI 3.1 spec (whose schema dialect is JSON Schema 2020-12) with marshmallow."""
    plugin = MarshmallowPlugin()
    spec = APISpec(title=title, version=version, openapi_version="3.1.0", plugins=[plugin])
    return spec, plugin


class _TruthfulConverter(OpenAPIConverter):
    """apispec's converter, saying what a capability's schema really accepts and emits.

    Two places where apispec's document and marshmallow's behaviour part (and the output
    check of :mod:`runnerkit.outputs` follows marshmallow): a schema whose ``Meta`` has a
    ``description`` gets no ``additionalProperties`` from apispec whatever its ``unknown``
    says, and a number field with ``as_string=True`` is documented as a number although it
    is emitted as a string.
    """

    def schema2jsonschema(self, schema: Any) -> dict[str, Any]:
        document: dict[str, Any] = super().schema2jsonschema(schema)
        unknown = resolve_schema_instance(schema).unknown
        if unknown != EXCLUDE:
            document["additionalProperties"] = unknown == INCLUDE
        return document


def _number_as_string(self: Any, field: fields.Field, **kwargs: Any) -> dict[str, Any]:
    if isinstance(field, fields.Number) and field.as_string:
        return {"type": "string"}
    return {}


class _TruthfulPlugin(MarshmallowPlugin):
    Converter = _TruthfulConverter


def json_schema(schema: type[Schema] | Schema) -> dict[str, Any]:
    """A standalone JSON Schema document for one marshmallow schema."""
    plugin = _TruthfulPlugin()
    spec = APISpec(title="runnerkit", version="1.0.0", openapi_version="3.1.0", plugins=[plugin])
    assert plugin.converter is not None
    plugin.converter.add_attribute_function(_number_as_string)
    root = plugin.converter.schema2jsonschema(schema)
    components = spec.to_dict().get("components", {}).get("schemas", {})
    document: dict[str, Any] = {"$schema": JSON_SCHEMA_DIALECT, **_rewrite_refs(root)}
    if components:
        document["$defs"] = {name: _rewrite_refs(sub) for name, sub in components.items()}
    return document


def _rewrite_refs(node: Any) -> Any:
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str) and value.startswith(_COMPONENT_PREFIX):
                out[key] = "#/$defs/" + value[len(_COMPONENT_PREFIX) :]
            else:
                out[key] = _rewrite_refs(value)
        return out
    if isinstance(node, list):
        return [_rewrite_refs(v) for v in node]
    return copy.copy(node)
