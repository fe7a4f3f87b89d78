"""The runner's OpenAPI 3.1 document, from the same marshmallow schemas that validate.

Each capability's ``Input`` becomes a component, and ``/execute``'s request body says that
``payload`` is one of them (matched by ``capabilityId``), so a client generator or a fuzzer
sees exactly what the runner accepts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from runnerkit.contracts import (
    ErrorEnvelopeSchema,
    HealthCheckSchema,
    RunnerExecutionRequestSchema,
    RunnerExecutionResponseSchema,
    RunnerRegistrationRequestSchema,
)
from runnerkit.contracts.json_schema import json_schema, new_spec
from runnerkit.runner.capability import Capability


class Described(Protocol):
    """What the document is made from (a :class:`~runnerkit.runner.app.Runner` is one)."""

    @property
    def name(self) -> str: ...
    @property
    def version(self) -> str: ...
    @property
    def capabilities(self) -> Mapping[str, Capability]: ...
    @property
    def url_prefix(self) -> str: ...


def _error(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {
            "application/json": {
                "schema": {
                    "oneOf": [
                        {"$ref": "#/components/schemas/RunnerExecutionResponse"},
                        {
                            "type": "object",
                            "required": ["success", "error"],
                            "properties": {
                                "success": {"const": False},
                                "error": {"$ref": "#/components/schemas/ErrorEnvelope"},
                            },
                        },
                    ]
                }
            }
        },
    }


def openapi_document(runner: Described) -> dict[str, Any]:
    """The OpenAPI document of ``runner``'s routes."""
    spec, _ = new_spec(title=runner.name, version=runner.version)
    for name, schema in (
        ("ErrorEnvelope", ErrorEnvelopeSchema),
        ("HealthCheck", HealthCheckSchema),
        ("RunnerExecutionRequest", RunnerExecutionRequestSchema),
        ("RunnerExecutionResponse", RunnerExecutionResponseSchema),
        ("RunnerRegistrationRequest", RunnerRegistrationRequestSchema),
    ):
        # apispec registers nested schemas by themselves; register each name once.
        if name not in spec.components.schemas:
            spec.components.schema(name, schema=schema)
    variants = []
    for capability in runner.capabilities.values():
        input_schema = json_schema(capability.Input)
        input_schema.pop("$schema", None)
        component = f"{capability.id}.input"
        spec.components.schema(component, component=input_schema)
        variants.append(
            {
                "allOf": [
                    {"$ref": "#/components/schemas/RunnerExecutionRequest"},
                    {
                        "type": "object",
                        "properties": {
                            "capabilityId": {"const": capability.id},
                            "payload": {"$ref": f"#/components/schemas/{component}"},
                        },
                    },
                ]
            }
        )
    json_body = {"application/json": {"schema": {"oneOf": variants}}}
    health = {
        "description": "HealthCheck (503 when unhealthy)",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/HealthCheck"}}},
    }
    spec.path(
        "/execute",
        operations={
            "post": {
                "summary": "Run one job",
                "requestBody": {"required": True, "content": json_body},
                "responses": {
                    "200": {
                        "description": "The job ran",
                        "content": {
                            "application/json": {
                                "schema": {"$ref": "#/components/schemas/RunnerExecutionResponse"}
                            }
                        },
                    },
                    "202": {"description": "Accepted (Prefer: respond-async)"},
                    **{
                        code: _error(text)
                        for code, text in (
                            ("400", "Invalid request or payload"),
                            ("401", "Bad signature"),
                            ("404", "Unknown capability"),
                            ("409", "The job is already running"),
                            ("413", "Body too large"),
                            ("415", "Not JSON"),
                            ("429", "At maxConcurrency"),
                            ("500", "The capability failed"),
                            ("503", "Shutting down or busy"),
                            ("504", "Deadline passed"),
                        )
                    },
                },
            }
        },
    )
    for path, summary in (
        ("/health", "Health with dependency checks"),
        ("/health/live", "The process serves"),
        ("/health/ready", "Can take work"),
    ):
        spec.path(path, operations={"get": {"summary": summary, "responses": {"200": health}}})
    spec.path(
        "/capabilities",
        operations={
            "get": {
                "summary": "The registration document",
                "responses": {
                    "200": {
                        "description": "RunnerRegistrationRequest",
                        "content": {
                            "application/json": {
                                "schema": {"$ref": "#/components/schemas/RunnerRegistrationRequest"}
                            }
                        },
                    }
                },
            }
        },
    )
    spec.path(
        "/metrics",
        operations={
            "get": {
                "summary": "Prometheus metrics",
                "responses": {"200": {"description": "text exposition format"}},
            }
        },
    )
    document: dict[str, Any] = spec.to_dict()
    if runner.url_prefix:
        # Mounted under a prefix (init_app(app, url_prefix=...)): the paths are relative to it.
        document["servers"] = [{"url": runner.url_prefix}]
    return _rewrite_defs(document)


def _rewrite_defs(node: Any) -> Any:
    """Capability schemas carry ``#/$defs/..`` refs; lift those defs into components."""
    if isinstance(node, dict):
        components = node.get("components", {}).get("schemas", {})
        for name in list(components):
            schema = components[name]
            defs = schema.pop("$defs", None) if isinstance(schema, dict) else None
            if defs:
                for def_name, def_schema in defs.items():
                    components.setdefault(f"{name}.{def_name}", def_schema)
                components[name] = _retarget(schema, name)
                for def_name in defs:
                    key = f"{name}.{def_name}"
                    components[key] = _retarget(components[key], name)
    return node


def _retarget(node: Any, owner: str) -> Any:
    if isinstance(node, dict):
        return {
            k: (
                f"#/components/schemas/{owner}.{v[len('#/$defs/') :]}"
                if k == "$ref" and isinstance(v, str) and v.startswith("#/$defs/")
                else _retarget(v, owner)
            )
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_retarget(v, owner) for v in node]
    return node
