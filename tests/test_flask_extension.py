"""runnerkit plays by Flask's extension rules.

- Settings and state belong to the app served: two apps in one process (two tests) are
  independent, each with its own state directory, ledger and secret.
- ``init_app`` leaves the host's app its own: its error pages, exception propagation under
  ``TESTING``, ``MAX_CONTENT_LENGTH`` and ``app.json``; runnerkit's routes can be mounted
  under a ``url_prefix``; pytest's ``caplog`` sees a job's ``ctx.logger`` lines.
- Capability code has the app's context on the job thread, in a forked child and in an
  asynchronous job, as it has inline.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from flask import Flask, request

from runnerkit import Runner
from runnerkit.service.signing import sign
from runnerkit.testing import JobForgeStub, RunnerClient
from tests.helpers import JOB_ID, TEST_CAPABILITIES, assert_envelope, assert_failure, request_body
from tests.integration.flask_host_app import CAPABILITIES, GREETING, PREFIX, make_host_app
from tests.support.waiting import wait_until

STANDALONE = {"RUNNERKIT_JOBFORGE_URL": ""}

# --------------------------------------------------------------------------- per-app state


def test_two_apps_of_one_runner_keep_their_own_state_and_settings(tmp_path: Path) -> None:
    runner = Runner("two-apps", version="1.0.0", capabilities=TEST_CAPABILITIES)
    first = runner.create_app({**STANDALONE, "RUNNERKIT_STATE_DIR": str(tmp_path / "a")})
    second = runner.create_app(
        {
            **STANDALONE,
            "RUNNERKIT_STATE_DIR": str(tmp_path / "b"),
            "RUNNERKIT_SIGNING_SECRET": "the-second-apps-secret",
        }
    )
    served_first, served_second = first.extensions["runnerkit"], second.extensions["runnerkit"]
    assert served_first is runner
    assert served_second is not runner
    assert served_second.capabilities is runner.capabilities  # one definition

    raw = json.dumps(request_body("echo", {"message": "hi"}, jobId=JOB_ID)).encode()
    # The first app still answers by its own settings: unsigned is fine there.
    unsigned = first.test_client().post("/execute", data=raw, content_type="application/json")
    assert unsigned.status_code == 200, unsigned.get_json()
    refused = second.test_client().post("/execute", data=raw, content_type="application/json")
    assert_failure(refused, 401, "AUTHENTICATION_ERROR", job_known=False)
    # The same jobId is new to the second app: its ledger is its own, in its own directory.
    signed = second.test_client().post(
        "/execute",
        data=raw,
        content_type="application/json",
        headers=sign(raw, "the-second-apps-secret"),
    )
    assert signed.status_code == 200, signed.get_json()
    assert "Idempotent-Replayed" not in signed.headers
    assert (tmp_path / "a" / "ledger.sqlite3").is_file()
    assert (tmp_path / "b" / "ledger.sqlite3").is_file()
    assert served_first.state.directory != served_second.state.directory
    # Each app's ledger answers a repeat from its own record.
    again = first.test_client().post("/execute", data=raw, content_type="application/json")
    assert again.headers.get("Idempotent-Replayed") == "true"


# --------------------------------------------------------------------------- the host's app


@pytest.fixture
def host(tmp_path: Path) -> Flask:
    return make_host_app(
        {**STANDALONE, "RUNNERKIT_STATE_DIR": str(tmp_path / "state"), "TESTING": True}
    )


def _run(client: Any, capability: str, **headers: str) -> Any:
    body = request_body(capability, {"key": "GREETING"})
    return client.post(f"{PREFIX}/execute", json=body, headers=headers)


def test_a_host_route_keeps_flasks_error_pages_and_exceptions(host: Flask) -> None:
    client = host.test_client()

    forbidden = client.get("/mine")
    assert forbidden.status_code == 403
    assert forbidden.mimetype == "text/html"
    missing = client.get("/execute")  # runnerkit's routes are under the prefix only
    assert missing.status_code == 404
    assert missing.mimetype == "text/html"
    with pytest.raises(LookupError, match="the host's own bug"):
        client.get("/broken")  # under TESTING, the test sees the exception


def test_a_body_the_host_read_first_still_reaches_execute(host: Flask) -> None:
    """A host's ``before_request`` that reads (and caches) the body leaves /execute its body:
    runnerkit reads the server's stream directly only when nothing has touched it."""
    seen: list[int] = []

    @host.before_request
    def _peek() -> None:
        if request.method == "POST":
            seen.append(len(request.get_data()))

    answer = _run(host.test_client(), "config-inline")
    assert answer.status_code == 200, answer.get_json()
    assert answer.get_json()["data"]["value"] == GREETING
    assert seen and seen[0] > 0


def test_runnerkit_routes_under_the_prefix_answer_with_envelopes(host: Flask) -> None:
    client = host.test_client()

    for response, status in (
        (client.get(f"{PREFIX}/nope"), 404),
        (client.get(f"{PREFIX}/execute"), 405),
        (client.post(f"{PREFIX}/health"), 405),
        (client.post(f"{PREFIX}/execute", data=b"[", content_type="application/json"), 400),
    ):
        assert response.status_code == status
        assert_envelope(response.get_json()["error"])
    assert client.get(f"{PREFIX}/health").status_code == 200
    document = client.get(f"{PREFIX}/capabilities").get_json()
    assert document["healthCheckEndpoint"].endswith(f"{PREFIX}/health")
    openapi = client.get(f"{PREFIX}/openapi.json").get_json()
    assert openapi["servers"] == [{"url": PREFIX}] and "/execute" in openapi["paths"]
    # The test kit's client finds the prefix by itself.
    answer = RunnerClient(host).execute("config-inline", {"key": "GREETING"})
    assert answer.status_code == 200, answer.get_json()


def test_the_hosts_config_and_json_settings_stay_its_own(tmp_path: Path) -> None:
    host = make_host_app(
        {
            **STANDALONE,
            "RUNNERKIT_STATE_DIR": str(tmp_path / "state"),
            "RUNNERKIT_MAX_BODY_BYTES": 200,
        }
    )
    client = host.test_client()

    assert host.config["MAX_CONTENT_LENGTH"] is None
    assert host.json.sort_keys is True  # type: ignore[attr-defined]
    assert client.post("/upload", data=b"x" * 5_000).get_json() == {"size": 5_000}
    body = request_body("config-thread", {"key": "x" * 300})
    too_large = client.post(f"{PREFIX}/execute", json=body)
    envelope = assert_failure(too_large, 413, "VALIDATION_ERROR", job_known=False)
    assert "200 bytes" in envelope["message"]


def test_a_stricter_app_limit_still_applies_to_runnerkit_routes(tmp_path: Path) -> None:
    host = make_host_app(
        {**STANDALONE, "RUNNERKIT_STATE_DIR": str(tmp_path / "state"), "MAX_CONTENT_LENGTH": 100}
    )
    body = request_body("config-thread", {"key": "x" * 300})

    too_large = host.test_client().post(f"{PREFIX}/execute", json=body)

    envelope = assert_failure(too_large, 413, "VALIDATION_ERROR", job_known=False)
    assert "100 bytes" in envelope["message"]


@pytest.mark.parametrize("prefix", ["runner", "/runner/", "/"])
def test_a_malformed_url_prefix_is_refused(prefix: str, tmp_path: Path) -> None:
    from runnerkit.service.settings import ConfigError

    with pytest.raises(ConfigError, match="url_prefix"):
        make_host_app({**STANDALONE, "RUNNERKIT_STATE_DIR": str(tmp_path)}, url_prefix=prefix)


@pytest.mark.parametrize("capability", ["config-thread", "config-inline"])
def test_caplog_sees_a_jobs_ctx_logger_lines(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capability: str
) -> None:
    caplog.set_level(logging.INFO)
    # Made inside the test, as a test that builds its app does: pytest only attaches its
    # capture to loggers already cut off from the root logger when the test starts.
    host = make_host_app({**STANDALONE, "RUNNERKIT_STATE_DIR": str(tmp_path)})

    answer = _run(host.test_client(), capability)

    assert answer.status_code == 200, answer.get_json()
    lines = [r for r in caplog.records if r.name == f"runnerkit.capability.{capability}"]
    assert [r.getMessage() for r in lines] == ["reading the app's GREETING"]


# --------------------------------------------------------------------------- app context


@pytest.mark.parametrize("capability", [c.id for c in CAPABILITIES])
def test_capability_code_reads_the_apps_config(host: Flask, capability: str) -> None:
    answer = _run(host.test_client(), capability)

    assert answer.status_code == 200, answer.get_json()
    assert answer.get_json()["data"]["value"] == GREETING


@pytest.mark.parametrize("capability", ["config-thread", "config-process"])
def test_an_asynchronous_job_reads_the_apps_config(
    tmp_path: Path, jobforge_stub: JobForgeStub, capability: str
) -> None:
    host = make_host_app(
        {"RUNNERKIT_JOBFORGE_URL": jobforge_stub.url, "RUNNERKIT_STATE_DIR": str(tmp_path)}
    )
    try:
        accepted = _run(host.test_client(), capability, Prefer="respond-async")
        assert accepted.status_code == 202, accepted.get_json()
        job_id = accepted.get_json()["jobId"]
        (result,) = wait_until(
            lambda: [r for r in jobforge_stub.results() if r.body["jobId"] == job_id],
            15,
            "the job's result",
        )
    finally:
        host.extensions["runnerkit"].close()

    assert result.body["success"] is True, result.body
    assert result.body["data"]["value"] == GREETING
