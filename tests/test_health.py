"""``GET /health`` (+ live/ready) and ``GET /capabilities``."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from flask.testing import FlaskClient
from marshmallow import ValidationError

from runnerkit import Runner
from runnerkit.contracts import RunnerRegistrationRequestSchema
from tests.helpers import SECRET, assert_health

# --------------------------------------------------------------------------- /health


def test_health_without_checks_is_healthy(client: FlaskClient) -> None:
    response = client.get("/health")

    assert response.status_code == 200
    body = response.get_json()
    assert_health(body)
    assert body["status"] == "healthy"
    assert body["service"] == "test-runner"
    assert body["version"] == "1.2.3"
    assert body["uptime"] >= 0
    assert body["checks"] == []


def test_registered_checks_are_reported_by_name(client: FlaskClient, runner: Runner) -> None:
    @runner.health_check
    def database() -> bool:
        return True

    @runner.health_check(name="cache")
    def anything() -> None:
        return None

    response = client.get("/health")

    assert response.status_code == 200
    body = response.get_json()
    assert_health(body)
    assert [(c["name"], c["status"]) for c in body["checks"]] == [
        ("database", "healthy"),
        ("cache", "healthy"),
    ]
    assert all(c["responseTimeMs"] >= 0 for c in body["checks"])


def test_a_degraded_check_makes_the_runner_degraded_but_200(
    client: FlaskClient, runner: Runner
) -> None:
    runner.health_check(lambda: "healthy", name="fine")
    runner.health_check(lambda: ("degraded", "replica lagging"), name="replica")

    response = client.get("/health")

    assert response.status_code == 200
    body = response.get_json()
    assert_health(body)
    assert body["status"] == "degraded"
    replica = next(c for c in body["checks"] if c["name"] == "replica")
    assert replica == {**replica, "status": "degraded", "message": "replica lagging"}


def test_a_raising_check_is_unhealthy_and_503(client: FlaskClient, runner: Runner) -> None:
    @runner.health_check
    def database() -> bool:
        raise ConnectionError(f"password={SECRET}")

    runner.health_check(lambda: "degraded", name="other")

    response = client.get("/health")

    assert response.status_code == 503
    body = response.get_json()
    assert_health(body)
    assert body["status"] == "unhealthy"
    check = body["checks"][0]
    assert check["status"] == "unhealthy"
    assert "ConnectionError" in check["message"]
    assert SECRET not in response.get_data(as_text=True)


@pytest.mark.parametrize("value", [False, "broken", 42, ("degraded", 5)])
def test_a_check_returning_false_or_nonsense_is_unhealthy(
    client: FlaskClient, runner: Runner, value: Any
) -> None:
    runner.health_check(lambda: value, name="odd")

    response = client.get("/health")

    assert response.status_code == 503
    assert_health(response.get_json())
    assert response.get_json()["checks"][0]["status"] == "unhealthy"


@pytest.fixture
def hang() -> Iterator[threading.Event]:
    """Released at the end of the test so the check's pool thread can finish."""
    event = threading.Event()
    yield event
    event.set()


def test_a_hanging_check_is_unhealthy_within_about_the_timeout(
    client: FlaskClient, runner: Runner, hang: threading.Event
) -> None:
    timeout_s = runner.settings.health_check_timeout_ms / 1000.0
    assert timeout_s == 0.3  # set by the app_config fixture

    @runner.health_check
    def stuck() -> bool:
        hang.wait(30)
        return True

    runner.health_check(lambda: True, name="quick")

    started = time.monotonic()
    response = client.get("/health")
    elapsed = time.monotonic() - started

    assert response.status_code == 503
    body = response.get_json()
    assert_health(body)
    assert body["status"] == "unhealthy"
    stuck_item = body["checks"][0]
    assert stuck_item["name"] == "stuck"
    assert stuck_item["status"] == "unhealthy"
    assert "timed out" in stuck_item["message"]
    assert body["checks"][1]["status"] == "healthy"
    assert timeout_s * 0.9 <= elapsed < timeout_s + 1.0


def test_a_still_hanging_check_is_not_started_again(
    client: FlaskClient, runner: Runner, hang: threading.Event
) -> None:
    calls = []

    @runner.health_check
    def stuck() -> bool:
        calls.append(1)
        hang.wait(30)
        return True

    client.get("/health")
    started = time.monotonic()
    second = client.get("/health")

    assert second.status_code == 503
    assert time.monotonic() - started < 0.3  # no second wait for the same hung call
    assert len(calls) == 1


@pytest.mark.parametrize("app_config", [{"RUNNERKIT_HEALTH_CHECK_TIMEOUT_MS": 100}])
def test_the_check_timeout_is_configurable(
    client: FlaskClient, runner: Runner, hang: threading.Event
) -> None:
    runner.health_check(lambda: hang.wait(30), name="stuck")

    started = time.monotonic()
    response = client.get("/health")

    assert response.status_code == 503
    assert time.monotonic() - started < 0.3


def test_duplicate_check_names_are_refused(runner: Runner) -> None:
    runner.health_check(lambda: True, name="db")

    with pytest.raises(ValueError, match="db"):
        runner.health_check(lambda: True, name="db")


@pytest.mark.parametrize("path", ["/health/live", "/health/ready"])
def test_live_and_ready_answer_200(client: FlaskClient, path: str) -> None:
    response = client.get(path)

    assert response.status_code == 200
    body = response.get_json()
    assert_health(body)
    assert body["status"] == "healthy"


def test_liveness_ignores_failing_dependency_checks(client: FlaskClient, runner: Runner) -> None:
    runner.health_check(lambda: False, name="db")

    assert client.get("/health").status_code == 503
    assert client.get("/health/live").status_code == 200


def test_example_app_is_healthy(example_client: FlaskClient) -> None:
    response = example_client.get("/health")

    assert response.status_code == 200
    assert assert_health(response.get_json())["service"] == "example-runner"


# --------------------------------------------------------------------------- /capabilities


def _load_registration(client: FlaskClient) -> dict[str, Any]:
    response = client.get("/capabilities")
    assert response.status_code == 200
    body = response.get_json()
    try:
        RunnerRegistrationRequestSchema().load(body)
    except ValidationError as exc:  # pragma: no cover
        pytest.fail(f"not a valid RunnerRegistrationRequest: {exc.messages}")
    return body  # the raw document, to look at what was actually sent


def _resolve(document: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    """Follow a local ``$ref`` inside ``document`` (only ``#/$defs/...`` is expected)."""
    ref = node.get("$ref")
    if ref is None:
        return node
    assert ref.startswith("#/$defs/"), ref
    target: dict[str, Any] = document["$defs"][ref[len("#/$defs/") :]]
    return target


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def test_capabilities_is_a_valid_registration_document(client: FlaskClient) -> None:
    body = _load_registration(client)

    assert body["name"] == "test-runner"
    assert body["version"] == "1.2.3"
    assert body["contractVersion"] == {"major": 1, "minor": 0, "patch": 0}
    assert body["tags"] == ["test"]
    assert [c["id"] for c in body["capabilities"]] == [
        "echo",
        "raiser",
        "sleeper",
        "bad-output",
        "order",
    ]


def test_capability_manifest_fields(client: FlaskClient) -> None:
    echo = _load_registration(client)["capabilities"][0]

    assert echo["name"] == "echo"  # defaults to the id
    assert echo["description"] == "Echoes its message back, optionally after a pause."
    assert echo["version"] == "1.0.0"
    assert echo["supportedJobTypes"] == ["test.echo"]
    assert echo["maxConcurrency"] == 4
    assert echo["timeoutMs"] == 5000
    assert echo["resourceRequirements"] == {"gpu": False}


def test_input_schema_has_types_required_and_defaults(client: FlaskClient) -> None:
    schema = _load_registration(client)["capabilities"][0]["inputSchema"]

    assert schema["type"] == "object"
    assert schema["required"] == ["message"]
    assert schema["properties"]["message"]["type"] == "string"
    assert schema["properties"]["repeat"]["type"] == "integer"
    assert schema["properties"]["repeat"]["default"] == 1
    assert schema["properties"]["repeat"]["minimum"] == 1
    assert schema["properties"]["repeat"]["maximum"] == 10


def test_nested_lists_enums_and_objects_become_defs_and_refs(client: FlaskClient) -> None:
    order = next(c for c in _load_registration(client)["capabilities"] if c["id"] == "order")
    schema = order["inputSchema"]

    assert schema["required"] == ["items"]
    items = schema["properties"]["items"]
    assert items["type"] == "array"
    assert items["minItems"] == 1
    item = _resolve(schema, items["items"])
    assert item["type"] == "object"
    assert sorted(item["required"]) == ["name", "quantity"]
    assert item["properties"]["quantity"]["type"] == "integer"
    assert item["properties"]["kind"]["enum"] == ["a", "b"]

    customer = schema["properties"]["customer"]
    customer = _resolve(schema, customer.get("allOf", [customer])[0])
    assert customer["required"] == ["email"]

    assert schema["properties"]["tags"] == {**schema["properties"]["tags"], "type": "array"}
    assert schema["properties"]["tags"]["items"]["type"] == "string"

    for ref in _refs(schema):
        assert ref.startswith("#/$defs/")
        assert ref[len("#/$defs/") :] in schema["$defs"], ref


def test_output_schema_is_published_too(client: FlaskClient) -> None:
    order = next(c for c in _load_registration(client)["capabilities"] if c["id"] == "order")
    schema = order["outputSchema"]

    assert sorted(schema["required"]) == ["names", "total"]
    assert schema["properties"]["total"]["type"] == "integer"
    assert schema["properties"]["names"]["type"] == "array"


def test_example_app_capabilities(example_client: FlaskClient) -> None:
    body = _load_registration(example_client)

    by_id = {c["id"]: c for c in body["capabilities"]}
    assert set(by_id) == {"text-stats", "checksum", "slow-count"}
    checksum_input = by_id["checksum"]["inputSchema"]
    assert checksum_input["properties"]["encoding"]["enum"] == ["utf-8", "base64"]
    stats_output = by_id["text-stats"]["outputSchema"]
    word = _resolve(stats_output, stats_output["properties"]["top_words"]["items"])
    assert sorted(word["required"]) == ["count", "word"]
    assert body["healthCheckEndpoint"].endswith("/health")
