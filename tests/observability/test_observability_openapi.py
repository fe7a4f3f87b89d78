"""``GET /openapi.json`` is a valid OpenAPI 3.1 document carrying every capability's input schema.

Validated with openapi-spec-validator (its 3.1 validator, which also checks every schema
against the OpenAPI 3.1 JSON Schema dialect), for the example runner and for a runner with
unusual schemas (an open ``INCLUDE`` object, nested objects, secret-named fields).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from runnerkit import Runner
from runnerkit.contracts.json_schema import json_schema
from tests.security.echo_app import make_runner


def document(app: Flask) -> dict[str, Any]:
    response = app.test_client().get("/openapi.json")
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    body: dict[str, Any] = response.get_json()
    return body


def inline(node: Any, prefix: str, table: dict[str, Any]) -> Any:
    """``node`` with every ``$ref`` under ``prefix`` replaced by its target (and no
    ``$defs``/``$schema``)."""
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith(prefix):
            return inline(table[ref.removeprefix(prefix)], prefix, table)
        return {
            k: inline(v, prefix, table) for k, v in node.items() if k not in ("$defs", "$schema")
        }
    if isinstance(node, list):
        return [inline(v, prefix, table) for v in node]
    return node


@pytest.fixture
def echo_app(tmp_path: Path) -> tuple[Runner, Flask]:
    runner = make_runner()
    app = runner.create_app(
        {"RUNNERKIT_STATE_DIR": str(tmp_path / "state"), "RUNNERKIT_JOBFORGE_URL": ""}
    )
    return runner, app


def runners(example_app: Flask, echo_app: tuple[Runner, Flask]) -> list[tuple[Runner, Flask]]:
    return [(example_app.extensions["runnerkit"], example_app), echo_app]


def test_the_documents_are_valid_openapi_3_1(
    example_app: Flask, echo_app: tuple[Runner, Flask]
) -> None:
    from openapi_spec_validator import OpenAPIV31SpecValidator, validate

    for runner, app in runners(example_app, echo_app):
        doc = document(app)
        assert doc["openapi"].startswith("3.1"), doc["openapi"]
        assert doc["info"]["title"] == runner.name
        assert doc["info"]["version"] == runner.version
        validate(doc, cls=OpenAPIV31SpecValidator)


def test_every_capabilitys_input_schema_is_in_the_document(
    example_app: Flask, echo_app: tuple[Runner, Flask]
) -> None:
    for runner, app in runners(example_app, echo_app):
        doc = document(app)
        schemas = doc["components"]["schemas"]
        body = doc["paths"]["/execute"]["post"]["requestBody"]["content"]["application/json"]
        variants = body["schema"]["oneOf"]
        by_capability = {
            v["allOf"][1]["properties"]["capabilityId"]["const"]: v["allOf"][1]["properties"][
                "payload"
            ]["$ref"]
            for v in variants
        }
        assert set(by_capability) == set(runner.capabilities)
        for capability in runner.capabilities.values():
            ref = by_capability[capability.id]
            name = ref.removeprefix("#/components/schemas/")
            assert name in schemas, (capability.id, sorted(schemas))
            # Nested schemas move from the capability's $defs into components: compare both
            # with every $ref inlined.
            published = inline(schemas[name], "#/components/schemas/", schemas)
            expected = json_schema(capability.Input)
            assert published == inline(expected, "#/$defs/", expected.get("$defs", {}))
            # The same schema the registration document advertises.
            manifest = capability.manifest()["inputSchema"]
            assert inline(manifest, "#/$defs/", manifest.get("$defs", {})) == published


def test_the_example_runners_fields_are_described(example_app: Flask) -> None:
    schemas = document(example_app)["components"]["schemas"]
    text_stats = schemas["text-stats.input"]
    assert text_stats["required"] == ["text"]
    assert text_stats["properties"]["text"]["type"] == "string"
    assert text_stats["properties"]["top"]["type"] == "integer"
    checksum = schemas["checksum.input"]
    assert set(checksum["properties"]["algorithm"]["enum"]) >= {"sha256", "md5"}


def test_the_documented_routes_are_the_runners_routes(example_app: Flask) -> None:
    paths = document(example_app)["paths"]
    for route in ("/execute", "/health", "/health/live", "/health/ready", "/metrics"):
        assert route in paths, sorted(paths)
    error = paths["/execute"]["post"]["responses"]["400"]
    assert "ErrorEnvelope" in str(error)


def test_the_forge_publishes_a_valid_openapi_document(tmp_path: Path) -> None:
    from runnerkit.forge import create_app

    forge = create_app(
        {"RUNNERKIT_FORGE_DB_PATH": str(tmp_path / "forge.sqlite3"), "DISPATCHER": "false"}
    )
    try:
        spec = document(forge)
    finally:
        forge.extensions["forge"].close()
    from openapi_spec_validator import OpenAPIV31SpecValidator, validate

    validate(spec, cls=OpenAPIV31SpecValidator)
    assert spec["openapi"].startswith("3.1")
    for path in ("/jobs", "/jobs/{job_id}", "/runners/register", "/assert", "/query"):
        assert path in spec["paths"], path
    body = spec["paths"]["/jobs"]["post"]["requestBody"]["content"]["application/json"]
    assert body["schema"] == {"$ref": "#/components/schemas/JobRequest"}
    assert "metadata" in spec["components"]["schemas"]["JobRequest"]["required"]
