"""Runner endpoints: register, heartbeat, deregister, list; bearer token; offline status."""

from __future__ import annotations

import time

import pytest
from flask.testing import FlaskClient

from runnerkit.forge import Forge, create_app, get_forge
from runnerkit.forge.jobs import Clock
from runnerkit.forge.runners import base_url
from tests.forge.helpers import (
    capability,
    error_of,
    forge_app,
    heartbeat,
    new_id,
    registration,
    valid,
    valid_page,
)

HEALTH = "http://127.0.0.1:3000/health"


def register(client: FlaskClient, name: str = "r1", health: str = HEALTH, **kwargs) -> str:
    body = registration(name, health, [capability("cap", ["t.a"], 2)], **kwargs)
    response = client.post("/runners/register", json=body)
    assert response.status_code == 201, response.get_json()
    answer = valid("RunnerRegistrationResponse", response.get_json())
    assert answer["heartbeatIntervalMs"] == 60_000
    return str(answer["runnerId"])


def test_register_then_list_and_get(client: FlaskClient) -> None:
    runner_id = register(client)
    page = valid_page("RunnerMetadata", client.get("/runners").get_json())
    assert page["total"] == 1
    (item,) = page["items"]
    assert item["id"] == runner_id
    assert item["status"] == "healthy"
    assert item["supportedContracts"] == ["1.0.0"]
    assert item["capabilities"][0]["supportedJobTypes"] == ["t.a"]
    one = client.get(f"/runners/{runner_id}")
    assert one.status_code == 200
    assert valid("RunnerMetadata", one.get_json()) == item


def test_heartbeat_known_and_unknown(client: FlaskClient) -> None:
    runner_id = register(client)
    response = client.post("/runners/heartbeat", json=heartbeat(runner_id, "degraded"))
    assert response.status_code == 200
    assert response.get_json()["runnerId"] == runner_id
    assert client.get(f"/runners/{runner_id}").get_json()["status"] == "degraded"

    # Naming another runner is refused, with a credential or without.
    own = {"Authorization": f"Bearer {client.tokens[runner_id]}"}  # type: ignore[attr-defined]
    other = client.post("/runners/heartbeat", json=heartbeat(new_id()), headers=own)
    assert error_of(other, 403, "AUTHORIZATION_ERROR")["code"] == "NOT_YOUR_RUNNER"
    error_of(
        client.post("/runners/heartbeat", json=heartbeat(new_id())), 401, "AUTHENTICATION_ERROR"
    )


def test_heartbeat_of_an_unknown_runner_trusted_by_id_is_404(store_config: dict[str, str]) -> None:
    """TRUST_RUNNER_IDS (no per-runner credential): the contract's 404 for an unknown id."""
    app = forge_app(
        {
            **store_config,
            "DISPATCHER": False,
            "TRUST_RUNNER_IDS": True,
            "HEARTBEAT_INTERVAL_MS": 60_000,
        }
    )
    try:
        client = app.test_client()
        runner_id = register(client)
        beat = client.post("/runners/heartbeat", json=heartbeat(runner_id), headers={"X": "1"})
        assert beat.status_code == 200
        error = error_of(
            client.post("/runners/heartbeat", json=heartbeat(new_id())), 404, "RESOURCE_NOT_FOUND"
        )
        assert error["code"] == "RUNNER_NOT_FOUND"
    finally:
        get_forge(app).close()


def test_heartbeat_invalid_body(client: FlaskClient) -> None:
    own = {"Authorization": f"Bearer {client.tokens[register(client)]}"}  # type: ignore[attr-defined]
    body = {"runnerId": "nope", "timestamp": "2026-01-01T00:00:00+00:00", "status": "fine"}
    response = client.post("/runners/heartbeat", json=body, headers=own)
    error = error_of(response, 400, "VALIDATION_ERROR")
    assert {tuple(d["path"]) for d in error["details"]} == {
        ("runnerId",),
        ("timestamp",),
        ("status",),
    }


def test_deregister(client: FlaskClient) -> None:
    runner_id = register(client)
    response = client.delete(f"/runners/{runner_id}")
    assert response.status_code == 204
    assert response.data == b""
    # Its credential went with it.
    error_of(client.delete(f"/runners/{runner_id}"), 401, "AUTHENTICATION_ERROR")
    error_of(
        client.post("/runners/heartbeat", json=heartbeat(runner_id)), 401, "AUTHENTICATION_ERROR"
    )
    assert client.get("/runners").get_json()["total"] == 0


def test_incompatible_contract_version_names_both(client: FlaskClient) -> None:
    body = registration("r", HEALTH, [], contract_version={"major": 2, "minor": 1, "patch": 0})
    error = error_of(client.post("/runners/register", json=body), 400, "VALIDATION_ERROR")
    assert error["code"] == "INCOMPATIBLE_CONTRACT_VERSION"
    assert "2.1.0" in error["message"] and "1.0.0" in error["message"]
    assert error["details"][0]["path"] == ["contractVersion"]
    # A newer minor of the same major is fine.
    register(client, contract_version={"major": 1, "minor": 7, "patch": 2})


def test_invalid_registration_names_every_problem(client: FlaskClient) -> None:
    body = registration("r", "/health", [capability("c", ["t"])])
    del body["name"]
    body["capabilities"][0]["maxConcurrency"] = 0
    error = error_of(client.post("/runners/register", json=body), 400, "VALIDATION_ERROR")
    paths = {tuple(d["path"]) for d in error["details"]}
    assert paths == {("name",), ("healthCheckEndpoint",), ("capabilities", "0", "maxConcurrency")}


def test_bodies_are_parsed_strictly(client: FlaskClient) -> None:
    error = error_of(
        client.post("/runners/register", data="name=x", content_type="text/plain"),
        415,
        "VALIDATION_ERROR",
    )
    assert error["code"] == "UNSUPPORTED_MEDIA_TYPE"
    bad_json = client.post("/runners/register", data="{", content_type="application/json")
    assert error_of(bad_json, 400, "VALIDATION_ERROR")["code"] == "INVALID_JSON"
    array = client.post("/runners/register", json=[1])
    assert error_of(array, 400, "VALIDATION_ERROR")["code"] == "INVALID_BODY"
    own = {"Authorization": f"Bearer {client.tokens[register(client)]}"}  # type: ignore[attr-defined]
    nan = client.post(
        "/runners/heartbeat", data='{"x": NaN}', content_type="application/json", headers=own
    )
    assert error_of(nan, 400, "VALIDATION_ERROR")["code"] == "INVALID_JSON"


def test_unknown_route_and_method_are_envelopes(client: FlaskClient) -> None:
    error_of(client.get("/nope"), 404, "RESOURCE_NOT_FOUND")
    error_of(client.put("/runners/register", json={}), 405, "VALIDATION_ERROR")


def test_reregistration_with_same_endpoint_replaces(client: FlaskClient) -> None:
    first = register(client)
    second = register(client)
    assert first != second
    ids = [r["id"] for r in client.get("/runners").get_json()["items"]]
    assert ids == [second]


def test_list_pagination_and_status_filter(client: FlaskClient) -> None:
    ids = [register(client, f"r{i}", f"http://127.0.0.1:{4000 + i}/health") for i in range(5)]
    page = valid_page("RunnerMetadata", client.get("/runners?limit=2&offset=1").get_json())
    assert [r["id"] for r in page["items"]] == ids[1:3]
    assert page["total"] == 5 and page["hasMore"] is True
    assert client.get("/runners?status=offline").get_json()["total"] == 0
    error_of(client.get("/runners?status=asleep"), 400, "VALIDATION_ERROR")
    error_of(client.get("/runners?limit=0"), 400, "VALIDATION_ERROR")


def test_missed_heartbeats_make_a_runner_offline_until_it_beats(
    client: FlaskClient, forge: Forge
) -> None:
    runner_id = register(client)
    assert forge.jobs.sweep(in_flight={}, grace_from=0)["offline"] == 0  # its beat is seen
    later = Clock(time.time() + 3 * 60 + 1)  # OFFLINE_AFTER_MISSED (3) x 60 s have passed
    summary = forge.jobs.sweep(in_flight={}, grace_from=0, now=later)
    assert summary["offline"] == 1
    page = valid_page("RunnerMetadata", client.get("/runners?status=offline").get_json())
    assert [r["id"] for r in page["items"]] == [runner_id]
    assert client.post("/runners/heartbeat", json=heartbeat(runner_id)).status_code == 200
    assert client.get(f"/runners/{runner_id}").get_json()["status"] == "healthy"


def test_a_new_dispatcher_gives_runners_a_full_window(client: FlaskClient, forge: Forge) -> None:
    register(client)
    forge.jobs.sweep(in_flight={}, grace_from=0)  # its heartbeat is seen
    later = Clock(time.time() + 3 * 60 + 1)
    # The dispatcher took over just now: silence before that does not count.
    grace = later.mono - 1
    assert forge.jobs.sweep(in_flight={}, grace_from=grace, now=later)["offline"] == 0


def test_token_protects_runner_endpoints(store_config: dict[str, str]) -> None:
    app = create_app({**store_config, "DISPATCHER": False, "TOKEN": "s3cret"})
    try:
        client = app.test_client()
        body = registration("r", HEALTH, [])
        response = client.post("/runners/register", json=body)
        error = error_of(response, 401, "AUTHENTICATION_ERROR")
        assert error["code"] == "MISSING_TOKEN"
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        wrong = client.post("/runners/register", json=body, headers={"Authorization": "Bearer x"})
        assert error_of(wrong, 401, "AUTHENTICATION_ERROR")["code"] == "INVALID_TOKEN"
        error_of(client.get("/runners"), 401, "AUTHENTICATION_ERROR")
        good = {"Authorization": "Bearer s3cret"}
        assert client.post("/runners/register", json=body, headers=good).status_code == 201
        assert client.get("/runners", headers=good).status_code == 200
        # Clients need it too: every route but /health.
        error_of(client.get("/jobs"), 401, "AUTHENTICATION_ERROR")
        assert client.get("/jobs", headers=good).status_code == 200
        assert "s3cret" not in response.get_data(as_text=True)
    finally:
        get_forge(app).close()


@pytest.mark.parametrize(
    ("health", "base"),
    [
        ("http://127.0.0.1:3000/health", "http://127.0.0.1:3000"),
        ("http://127.0.0.1:3000/health/ready", "http://127.0.0.1:3000"),
        ("https://runner.example:8443/prefix/health/", "https://runner.example:8443/prefix"),
        ("http://localhost:3000/status", "http://localhost:3000"),
        ("HTTP://localhost:3000", "http://localhost:3000"),
        ("localhost:3000", ""),
        ("mailto:x", ""),
    ],
)
def test_base_url(health: str, base: str) -> None:
    assert base_url(health) == base
