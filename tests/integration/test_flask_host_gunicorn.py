"""A runner mounted in a host's Flask app, under gunicorn: the host's rules hold.

Real ``gunicorn 'tests.integration.flask_host_app:make_host_app()'`` with the product's
settings and two workers: capability code reads ``current_app.config`` on the job thread, in a
forked child and inline; runnerkit's routes live under ``/runner`` with their envelopes, and
the host's routes answer as Flask does.
"""

from __future__ import annotations

from typing import Any

import pytest
import requests

from tests.helpers import assert_envelope, new_uuid
from tests.integration.flask_host_app import GREETING, PREFIX
from tests.support import GunicornProcess

APP = "tests.integration.flask_host_app:make_host_app()"


@pytest.fixture
def host(start_gunicorn: Any) -> GunicornProcess:
    proc: GunicornProcess = start_gunicorn(app_spec=APP, ready_path=f"{PREFIX}/health/live")
    proc.wait_workers_serving(path=f"{PREFIX}/health/live")
    return proc


def _execute(proc: GunicornProcess, capability: str) -> requests.Response:
    body = {
        "jobId": new_uuid(),
        "moduleId": "flask-host",
        "capabilityId": capability,
        "payload": {"key": "GREETING"},
    }
    return requests.post(f"{proc.url}{PREFIX}/execute", json=body, timeout=30)


@pytest.mark.parametrize("capability", ["config-thread", "config-process", "config-inline"])
def test_capability_code_has_the_apps_context_in_every_isolation_mode(
    host: GunicornProcess, capability: str
) -> None:
    workers = set(host.worker_pids())

    answers = [_execute(host, capability) for _ in range(4)]

    for answer in answers:
        assert answer.status_code == 200, (answer.text, host.log_text()[-3000:])
        data = answer.json()["data"]
        assert data["value"] == GREETING
        if capability == "config-process":
            assert data["pid"] not in workers  # it ran in a child
        else:
            assert data["pid"] in workers


def test_runnerkit_routes_live_under_the_prefix_with_their_envelopes(
    host: GunicornProcess,
) -> None:
    document = requests.get(f"{host.url}{PREFIX}/capabilities", timeout=10).json()
    assert document["healthCheckEndpoint"].endswith(f"{PREFIX}/health")

    unknown = requests.get(f"{host.url}{PREFIX}/nope", timeout=10)
    assert unknown.status_code == 404
    assert_envelope(unknown.json()["error"])

    wrong_method = requests.get(f"{host.url}{PREFIX}/execute", timeout=10)
    assert wrong_method.status_code == 405
    assert_envelope(wrong_method.json()["error"])
    assert "POST" in wrong_method.headers["Allow"]


def test_the_hosts_routes_answer_as_flask_does(host: GunicornProcess) -> None:
    forbidden = requests.get(f"{host.url}/mine", timeout=10)
    assert forbidden.status_code == 403
    assert forbidden.headers["Content-Type"].startswith("text/html")

    missing = requests.get(f"{host.url}/nope", timeout=10)
    assert missing.status_code == 404
    assert missing.headers["Content-Type"].startswith("text/html")

    settings = requests.get(f"{host.url}/settings", timeout=10).json()
    assert settings == {"maxContentLength": None, "sortKeys": True}

    # runnerkit's 1 MiB body limit is its routes' own: the host takes a larger upload.
    upload = requests.post(f"{host.url}/upload", data=b"x" * 2_000_000, timeout=30)
    assert upload.status_code == 200, upload.text
    assert upload.json() == {"size": 2_000_000}
