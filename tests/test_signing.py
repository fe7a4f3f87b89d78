"""Signed execution requests: verified before anything else, never able to block a real job."""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient

from runnerkit import Runner
from runnerkit.service.settings import ConfigError
from runnerkit.service.signing import SignatureError, sign, verify
from tests.helpers import TEST_CAPABILITIES, assert_failure, request_body
from tests.support.waiting import wait_until

SECRET = "s3cret-for-tests"
OLD_SECRET = "the-previous-secret"


@pytest.fixture
def app_config() -> dict[str, Any]:
    return {"RUNNERKIT_SIGNING_SECRET": SECRET}


def post_signed(
    client: FlaskClient, body: dict[str, Any] | bytes, secret: str = SECRET, **sign_args: Any
) -> Any:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = sign(raw, secret, **sign_args)
    return client.post("/execute", data=raw, headers=headers, content_type="application/json")


def echo_count(client: FlaskClient) -> int:
    """How many echo jobs really ran (the echo capability counts its calls)."""
    from tests.helpers import Echo

    return Echo.calls


# --------------------------------------------------------------------------- the functions


def test_sign_then_verify_round_trips_and_returns_the_event_id() -> None:
    headers = sign(b'{"a":1}', SECRET, event_id="evt-1")
    assert headers["x-webhook-signature"].startswith("v1=")
    assert verify(headers, b'{"a":1}', [SECRET]) == "evt-1"


@pytest.mark.parametrize(
    ("mutate", "code"),
    [
        (lambda h, b: ({**h, "x-webhook-signature": "v1=" + "0" * 64}, b), "SIGNATURE_INVALID"),
        (lambda h, b: (h, b + b" "), "SIGNATURE_INVALID"),
        (
            lambda h, b: ({k: v for k, v in h.items() if k != "x-webhook-timestamp"}, b),
            "TIMESTAMP_MISSING",
        ),
        (
            lambda h, b: ({k: v for k, v in h.items() if k != "x-webhook-signature"}, b),
            "SIGNATURE_MISSING",
        ),
        (lambda h, b: ({**h, "x-webhook-timestamp": "12abc"}, b), "TIMESTAMP_INVALID"),
        (
            lambda h, b: ({**h, "x-webhook-signature": h["x-webhook-signature"][3:]}, b),
            "SIGNATURE_INVALID",
        ),
    ],
)
def test_verify_refuses_every_kind_of_bad_request(mutate: Any, code: str) -> None:
    headers, body = mutate(sign(b"{}", SECRET), b"{}")
    with pytest.raises(SignatureError) as info:
        verify(headers, body, [SECRET])
    assert info.value.code == code


def test_verify_enforces_the_time_window() -> None:
    now = int(time.time() * 1000)
    stale = sign(b"{}", SECRET, timestamp_ms=now - 301_000)
    future = sign(b"{}", SECRET, timestamp_ms=now + 61_000)
    edge = sign(b"{}", SECRET, timestamp_ms=now - 299_000)
    with pytest.raises(SignatureError, match=r"stale: signed 301 s ago.* more than 300 s") as old:
        verify(stale, b"{}", [SECRET], now_ms=now)
    assert old.value.code == "TIMESTAMP_EXPIRED"
    with pytest.raises(SignatureError, match=r"future: signed 61 s ahead.* at most 60 s") as ahead:
        verify(future, b"{}", [SECRET], now_ms=now)
    assert ahead.value.code == "TIMESTAMP_IN_FUTURE"
    verify(edge, b"{}", [SECRET], now_ms=now)


def test_either_of_two_secrets_verifies_during_a_rotation() -> None:
    old = sign(b"{}", OLD_SECRET)
    new = sign(b"{}", SECRET)
    assert verify(old, b"{}", [SECRET, OLD_SECRET]) is not None
    assert verify(new, b"{}", [SECRET, OLD_SECRET]) is not None
    with pytest.raises(SignatureError):
        verify(old, b"{}", [SECRET])


# --------------------------------------------------------------------------- the runner


def test_a_validly_signed_request_runs(client: FlaskClient) -> None:
    response = post_signed(client, request_body(payload={"message": "hi"}))
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["data"]["message"] == "hi"


@pytest.mark.parametrize(
    ("send", "code", "says"),
    [
        pytest.param(
            lambda c, b: post_signed(c, b, secret="wrong"),
            "SIGNATURE_INVALID",
            "does not match",
            id="wrong-secret",
        ),
        pytest.param(
            lambda c, b: c.post(
                "/execute",
                data=json.dumps(b).replace("hi", "ho").encode(),
                headers=sign(json.dumps(b).encode(), SECRET),
                content_type="application/json",
            ),
            "SIGNATURE_INVALID",
            "does not match",
            id="tampered-body",
        ),
        pytest.param(
            lambda c, b: c.post("/execute", json=b),
            "SIGNATURE_MISSING",
            "not signed",
            id="unsigned",
        ),
        pytest.param(
            lambda c, b: c.post(
                "/execute",
                data=json.dumps(b).encode(),
                headers={**sign(json.dumps(b).encode(), SECRET), "x-webhook-signature": "v1=é"},
                content_type="application/json",
            ),
            "SIGNATURE_INVALID",
            "not of the form v1=",
            id="non-ascii-signature",
        ),
        pytest.param(
            lambda c, b: post_signed(c, b, timestamp_ms=int(time.time() * 1000) - 400_000),
            "TIMESTAMP_EXPIRED",
            "stale",
            id="stale",
        ),
        pytest.param(
            lambda c, b: post_signed(c, b, timestamp_ms=int(time.time() * 1000) + 120_000),
            "TIMESTAMP_IN_FUTURE",
            "future",
            id="future",
        ),
    ],
)
def test_a_bad_signature_is_401_says_why_and_nothing_runs(
    client: FlaskClient, send: Any, code: str, says: str
) -> None:
    body = request_body(payload={"message": "hi"})
    before = echo_count(client)
    response = send(client, body)
    envelope = assert_failure(response, 401, "AUTHENTICATION_ERROR", job_known=False)
    assert envelope["code"] == code
    assert says in envelope["message"]
    assert SECRET not in response.get_data(as_text=True)
    assert echo_count(client) == before


def test_a_missing_timestamp_is_refused_unlike_controlplanes_verifier(
    client: FlaskClient,
) -> None:
    raw = json.dumps(request_body()).encode()
    headers = sign(raw, SECRET)
    del headers["x-webhook-timestamp"]
    response = client.post("/execute", data=raw, headers=headers, content_type="application/json")
    envelope = assert_failure(response, 401, "AUTHENTICATION_ERROR", job_known=False)
    assert envelope["code"] == "TIMESTAMP_MISSING"


def test_a_replayed_valid_request_is_answered_from_the_ledger_not_run_again(
    client: FlaskClient,
) -> None:
    raw = json.dumps(request_body(payload={"message": "once"})).encode()
    headers = sign(raw, SECRET)
    first = client.post("/execute", data=raw, headers=headers, content_type="application/json")
    runs = echo_count(client)
    replay = client.post("/execute", data=raw, headers=headers, content_type="application/json")
    assert first.status_code == replay.status_code == 200
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert replay.get_json() == first.get_json()
    assert echo_count(client) == runs


def test_a_forged_request_with_a_real_job_id_does_not_block_the_genuine_one(
    client: FlaskClient,
) -> None:
    genuine = request_body(payload={"message": "genuine"})
    forged = {**genuine, "payload": {"message": "forged"}}
    refused = post_signed(client, forged, secret="attacker-guess")
    assert refused.status_code == 401
    accepted = post_signed(client, genuine)
    assert accepted.status_code == 200
    assert accepted.get_json()["data"]["message"] == "genuine"
    assert "Idempotent-Replayed" not in accepted.headers


@pytest.mark.parametrize(
    "app_config",
    [{"RUNNERKIT_SIGNING_SECRET": SECRET, "RUNNERKIT_SIGNING_SECRET_PREVIOUS": OLD_SECRET}],
)
def test_the_runner_accepts_both_secrets_while_rotating(client: FlaskClient) -> None:
    assert post_signed(client, request_body(), secret=OLD_SECRET).status_code == 200
    assert post_signed(client, request_body(), secret=SECRET).status_code == 200
    assert post_signed(client, request_body(), secret="neither").status_code == 401


# --------------------------------------------------------------------------- startup


def test_production_without_a_secret_refuses_to_start(tmp_path: Path) -> None:
    runner = Runner("prod", capabilities=TEST_CAPABILITIES)
    with pytest.raises(ConfigError, match="RUNNERKIT_SIGNING_SECRET"):
        runner.create_app(
            {"RUNNERKIT_ENVIRONMENT": "production", "RUNNERKIT_STATE_DIR": str(tmp_path)}
        )


def _signing_warnings(caplog: pytest.LogCaptureFixture) -> int:
    return len([r for r in caplog.records if "SIGNING IS OFF" in r.getMessage()])


def test_production_without_a_secret_starts_when_insecure_mode_is_explicit(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    runner = Runner("prod", capabilities=TEST_CAPABILITIES)
    with caplog.at_level(logging.WARNING, logger="runnerkit.signing"):
        app = runner.create_app(
            {
                "RUNNERKIT_ENVIRONMENT": "production",
                "RUNNERKIT_ALLOW_UNSIGNED": "true",
                "RUNNERKIT_STATE_DIR": str(tmp_path),
            }
        )
        app.test_client().post("/execute", json=request_body())
    assert _signing_warnings(caplog) == 1


def test_without_a_secret_the_warning_waits_until_the_app_serves_then_comes_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SERVER_SOFTWARE", raising=False)
    runner = Runner("dev", capabilities=TEST_CAPABILITIES)
    with caplog.at_level(logging.WARNING, logger="runnerkit.signing"):
        app = runner.create_app({"RUNNERKIT_STATE_DIR": str(tmp_path)})
        # Imported and built (runnerkit validate, manifest, a test's import): not served.
        assert _signing_warnings(caplog) == 0
        client = app.test_client()
        for _ in range(3):
            assert client.post("/execute", json=request_body()).status_code == 200
    assert _signing_warnings(caplog) == 1


def test_under_gunicorn_the_warning_comes_when_the_worker_loads_the_app(
    tmp_path: Path,
    runnerkit_caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # What gunicorn's arbiter sets for its workers. The SIGTERM drain handler a worker gets
    # is left out: it would stay installed in the test process. A worker's runnerkit logger
    # does not propagate, so the capture sits on it (runnerkit_caplog).
    monkeypatch.setenv("SERVER_SOFTWARE", "gunicorn/23.0.0")
    monkeypatch.setattr("runnerkit.runner.app.install_drain_handler", lambda runner: None)
    runner = Runner("served", capabilities=TEST_CAPABILITIES)
    app = runner.create_app({"RUNNERKIT_STATE_DIR": str(tmp_path)})
    assert _signing_warnings(runnerkit_caplog) == 1
    app.test_client().post("/execute", json=request_body())
    assert _signing_warnings(runnerkit_caplog) == 1


def test_with_a_secret_nothing_is_said_about_signing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    runner = Runner("signed", capabilities=TEST_CAPABILITIES)
    with caplog.at_level(logging.WARNING, logger="runnerkit.signing"):
        app = runner.create_app(
            {"RUNNERKIT_STATE_DIR": str(tmp_path), "RUNNERKIT_SIGNING_SECRET": SECRET}
        )
        app.test_client().post("/execute", json=request_body())
    assert _signing_warnings(caplog) == 0


@pytest.mark.parametrize("environment", ["development", "production"])
def test_a_previous_secret_without_a_current_one_refuses_to_start(
    tmp_path: Path, environment: str
) -> None:
    runner = Runner("rotating", capabilities=TEST_CAPABILITIES)
    with pytest.raises(ConfigError, match="RUNNERKIT_SIGNING_SECRET_PREVIOUS") as caught:
        runner.create_app(
            {
                "RUNNERKIT_ENVIRONMENT": environment,
                "RUNNERKIT_ALLOW_UNSIGNED": "true",
                "RUNNERKIT_SIGNING_SECRET_PREVIOUS": OLD_SECRET,
                "RUNNERKIT_STATE_DIR": str(tmp_path),
            }
        )
    message = str(caught.value)
    assert "\n" not in message and "RUNNERKIT_SIGNING_SECRET is empty" in message
    assert OLD_SECRET not in message


# --------------------------------------------------------------------------- replays


def _send_same(client: FlaskClient, raw: bytes, headers: dict[str, str]) -> Any:
    return client.post("/execute", data=raw, headers=headers, content_type="application/json")


def test_a_captured_request_replayed_after_a_retryable_failure_does_not_run_again(
    client: FlaskClient,
) -> None:
    body = request_body("raiser", {"kind": "unavailable"})
    raw = json.dumps(body).encode()
    headers = sign(raw, SECRET)
    first = _send_same(client, raw, headers)
    assert_failure(first, 503, "SERVICE_UNAVAILABLE")
    # A retryable failure is forgotten by the ledger (a new attempt runs again), so only the
    # event id tells a replay of these very bytes from JobForge's next, newly signed attempt.
    replayed = _send_same(client, raw, headers)
    error = assert_failure(replayed, 401, "AUTHENTICATION_ERROR")
    assert error["code"] == "EVENT_REPLAYED"
    retried = post_signed(client, body)
    assert_failure(retried, 503, "SERVICE_UNAVAILABLE")  # a new signature runs again


@pytest.mark.parametrize(
    "event_id",
    [
        lambda h: {**h, "x-webhook-event-id": "a-new-one"},
        lambda h: {**h, "x-webhook-event-id": ""},
        lambda h: {k: v for k, v in h.items() if k != "x-webhook-event-id"},
    ],
    ids=["new-event-id", "empty-event-id", "no-event-id"],
)
def test_a_captured_request_with_another_event_id_is_still_a_replay(
    client: FlaskClient, event_id: Any
) -> None:
    # The event id is not signed: a copy that changes or drops it is the same request.
    body = request_body("raiser", {"kind": "unavailable"})
    raw = json.dumps(body).encode()
    headers = sign(raw, SECRET)
    assert_failure(_send_same(client, raw, headers), 503, "SERVICE_UNAVAILABLE")
    error = assert_failure(_send_same(client, raw, event_id(headers)), 401, "AUTHENTICATION_ERROR")
    assert error["code"] == "EVENT_REPLAYED"


@pytest.mark.parametrize(
    "app_config",
    [{"RUNNERKIT_SIGNING_SECRET": SECRET, "RUNNERKIT_SIGNING_SECRET_PREVIOUS": OLD_SECRET}],
)
def test_the_same_content_signed_with_the_previous_secret_is_the_same_request(
    client: FlaskClient,
) -> None:
    body = request_body("raiser", {"kind": "unavailable"})
    raw = json.dumps(body).encode()
    stamp = int(time.time() * 1000)
    first = _send_same(client, raw, sign(raw, SECRET, timestamp_ms=stamp))
    assert_failure(first, 503, "SERVICE_UNAVAILABLE")
    again = _send_same(client, raw, sign(raw, OLD_SECRET, timestamp_ms=stamp))
    error = assert_failure(again, 401, "AUTHENTICATION_ERROR")
    assert error["code"] == "EVENT_REPLAYED"


def test_a_redelivered_finished_job_is_still_answered_from_the_ledger(
    client: FlaskClient,
) -> None:
    body = request_body(payload={"message": "once"})
    raw = json.dumps(body).encode()
    headers = sign(raw, SECRET)
    before = echo_count(client)
    first = _send_same(client, raw, headers)
    again = _send_same(client, raw, headers)
    assert first.status_code == again.status_code == 200
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.get_json() == first.get_json()
    assert echo_count(client) == before + 1


def test_a_forged_request_cannot_spend_a_real_requests_event_id(client: FlaskClient) -> None:
    body = request_body(payload={"message": "real"})
    raw = json.dumps(body).encode()
    real = sign(raw, SECRET, event_id="evt-shared")
    forged = sign(raw, "not-the-secret", event_id="evt-shared")
    assert _send_same(client, raw, forged).status_code == 401
    assert _send_same(client, raw, real).status_code == 200


def test_a_request_refused_at_capacity_may_be_sent_again_as_it_was(
    client: FlaskClient, runner: Runner, release: threading.Event
) -> None:
    # The sleeper (maxConcurrency 1) is busy: the request is refused with 429 before it runs,
    # so its event id is not spent and the very same bytes run once there is room.
    raw_busy = json.dumps(request_body("sleeper", {"seconds": 5})).encode()
    holder = threading.Thread(target=_send_same, args=(client, raw_busy, sign(raw_busy, SECRET)))
    holder.start()
    try:
        wait_until(lambda: runner.state.slots.in_use("sleeper") == 1, 5, "the sleeper busy")
        raw = json.dumps(request_body("sleeper", {"seconds": 0})).encode()
        headers = sign(raw, SECRET)
        assert _send_same(client, raw, headers).status_code == 429
        release.set()
        holder.join(10)
        # Its job thread gives the slot back just after the answer: room, as a forge's retry
        # after Retry-After finds it.
        wait_until(lambda: runner.state.slots.in_use("sleeper") == 0, 5, "the sleeper free")
        again = _send_same(client, raw, headers)
        assert again.status_code == 200, again.get_json()
    finally:
        release.set()
        holder.join(10)


def test_the_replay_key_leads_with_the_signed_timestamp() -> None:
    from runnerkit.service.signing import TIMESTAMP_HEADER, replay_key, request_digest

    body = b'{"jobId": "x"}'
    first = sign(body, "s", timestamp_ms=1_800_000_000_000)
    later = sign(body, "s", timestamp_ms=1_800_000_000_001)
    key = replay_key(first, body)
    assert key == (1_800_000_000_000).to_bytes(8, "big") + request_digest(first, body)
    assert int(first[TIMESTAMP_HEADER]) == int.from_bytes(key[:8], "big")
    # Keys of later requests sort after: the ledger's index grows at its end.
    assert replay_key(later, body) > key


def test_a_ledger_with_an_older_runnerkits_digests_still_refuses_their_replays(
    tmp_path: Path,
) -> None:
    import sqlite3

    from runnerkit.runner.ledger import Ledger
    from runnerkit.service.signing import replay_key, request_digest

    path = str(tmp_path / "ledger.sqlite3")
    Ledger(path, retention_s=3600).probe()  # the tables, as a worker makes them
    body = b'{"jobId": "y"}'
    headers = sign(body, "s")
    with sqlite3.connect(path) as conn:  # what an older runnerkit recorded: the bare digest
        conn.execute(
            "INSERT INTO signed_requests (digest, seen) VALUES (?, ?)",
            (request_digest(headers, body), time.time()),
        )
    ledger = Ledger(path, retention_s=3600)
    assert ledger.first_sight(replay_key(headers, body), "y") is False
    fresh = sign(b'{"jobId": "z"}', "s")
    assert ledger.first_sight(replay_key(fresh, b'{"jobId": "z"}'), "z") is True
    ledger.journal.flush()
    # Once the old digests are past their memory, the second look is not made any more.
    ledger.event_memory_s = -1.0
    ledger.prune()
    assert ledger._legacy_digests is False
