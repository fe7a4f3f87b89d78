"""Several JobForge URLs: the list is parsed and checked at startup, and the client moves to
the next URL when one is unreachable, not when a forge answers with an error."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import requests

from runnerkit import Runner
from runnerkit.runner.config import Settings
from runnerkit.runner.jobforge import JobForgeClient
from runnerkit.service.settings import ConfigError, split_base_urls
from tests.support import JobForgeStub, free_port
from tests.support.waiting import wait_until


def test_a_comma_separated_list_loads_as_several_base_urls() -> None:
    settings = Settings.load(
        {}, {"RUNNERKIT_JOBFORGE_URL": " http://a:3002/ , https://b:3003/base/,, "}
    )
    assert settings.jobforge_url == "http://a:3002,https://b:3003/base"
    assert split_base_urls(settings.jobforge_url) == ["http://a:3002", "https://b:3003/base"]
    client = JobForgeClient(settings.jobforge_url)
    assert client.base_urls == ["http://a:3002", "https://b:3003/base"]
    assert client.base_url == "http://a:3002"


def test_one_url_loads_as_before() -> None:
    settings = Settings.load({}, {"RUNNERKIT_JOBFORGE_URL": "http://127.0.0.1:3002/"})
    assert settings.jobforge_url == "http://127.0.0.1:3002"
    assert JobForgeClient(settings.jobforge_url).base_urls == ["http://127.0.0.1:3002"]
    assert Settings.load({}, {"RUNNERKIT_JOBFORGE_URL": ""}).jobforge_url == ""


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("http://a:3002,127.0.0.1:3003", "write it as http://127.0.0.1:3003"),
        ("ftp://a:21,http://b:3002", "not an http(s) base URL"),
        ("http://a:3002, http://b:0", "port 0"),
    ],
)
def test_each_url_of_the_list_is_checked(value: str, says: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.load({}, {"RUNNERKIT_JOBFORGE_URL": value})
    assert "RUNNERKIT_JOBFORGE_URL" in str(info.value)
    assert says in str(info.value)


def test_the_client_moves_on_when_a_forge_is_unreachable_and_sticks_there(
    caplog: pytest.LogCaptureFixture,
) -> None:
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens: connection refused
    with JobForgeStub() as up:
        client = JobForgeClient(f"{down},{up.url}", connect_timeout_s=5, read_timeout_s=5)
        with caplog.at_level(logging.WARNING, logger="runnerkit.jobforge"):
            first = client.register({"name": "r"})
            assert first.status_code == 201
            assert client.base_url == up.url
            # Sticks to the URL that answered: the next calls go there first.
            runner_id = first.json()["runnerId"]
            assert client.heartbeat({"runnerId": runner_id}).status_code == 200
        moves = [r for r in caplog.records if "now using" in r.getMessage()]
        assert len(moves) == 1 and up.url in moves[0].getMessage()
        assert [c.path for c in up.calls()] == ["/runners/register", "/runners/heartbeat"]

        # An answer, even an error, is the forge speaking: no move.
        up.fail_heartbeat_with = 400
        assert client.heartbeat({"runnerId": runner_id}).status_code == 400
        assert client.base_url == up.url

        # The outbox's full URLs under any base URL go to the current one.
        answer = client.post(f"{down}/jobs/j1/result", json={"jobId": "j1"})
        assert answer.status_code == 200
        assert up.results()[-1].path == "/jobs/j1/result"


def test_with_no_forge_reachable_the_last_error_is_raised() -> None:
    client = JobForgeClient(
        [f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"],
        connect_timeout_s=5,
    )
    with pytest.raises(requests.ConnectionError):
        client.register({"name": "r"})
    assert client.unreachable


def test_health_says_degraded_while_no_forge_of_the_list_answers(
    runner: Runner, tmp_path: Path
) -> None:
    first = JobForgeStub(heartbeat_interval_ms=200).start()
    second = JobForgeStub(heartbeat_interval_ms=200).share_database(first).start()
    try:
        app = runner.create_app(
            {
                "RUNNERKIT_JOBFORGE_URL": f"{first.url},{second.url}",
                "RUNNERKIT_STATE_DIR": str(tmp_path / "state"),
            }
        )
        client = app.test_client()
        lifecycle = runner.lifecycle
        assert lifecycle is not None
        wait_until(lambda: lifecycle.current_identity() is not None, 15, "registration")
        assert client.get("/health").get_json()["status"] == "healthy"

        first.stop()
        wait_until(lambda: second.heartbeats(), 15, "a heartbeat to the second forge")
        assert client.get("/health").get_json()["status"] == "healthy"

        def names_the_second() -> bool:
            # The stub records the heartbeat before the runner has read its answer and
            # moved to that URL: the readiness check names it a moment later.
            ready = client.get("/health/ready").get_json()["checks"]
            return f"JobForge at {second.url} (of 2 URLs)" in [c.get("message") for c in ready]

        wait_until(names_the_second, 15, "/health/ready to name the second forge")

        second.stop()

        def degraded() -> dict[str, Any] | None:
            answer = client.get("/health")
            checks = [c for c in answer.get_json()["checks"] if c["name"] == "registration"]
            return checks[0] if answer.status_code == 200 and checks else None

        check = wait_until(degraded, 15, "/health to report JobForge unreachable")
        assert check["status"] == "degraded"
        assert first.url in check["message"] and second.url in check["message"]
    finally:
        runner.close()
        first.stop()
        second.stop()
