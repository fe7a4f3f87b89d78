"""pytest fixtures for runner authors (loaded automatically once runnerkit is installed).

- ``runner_client``: a :class:`RunnerClient` for the app of your ``runner_app`` fixture;
- ``contract_validator``: a :class:`ContractValidator`;
- ``jobforge_stub``: a JobForge stand-in on a free loopback port that records every call;
- ``forge_server``: the reference control plane on a free loopback port (its URL, once
  ``/health`` answers 200), with its SQLite file in the test's temporary directory.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask import Flask

from runnerkit.contracts.validator import ContractValidator
from runnerkit.testing.client import RunnerClient
from runnerkit.testing.jobforge_stub import JobForgeStub


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def runner_app() -> Flask:
    """Override this fixture to return your runner's Flask app."""
    raise pytest.UsageError(
        "define a `runner_app` fixture returning your runner's Flask app, e.g. "
        "`return runner.create_app({'RUNNERKIT_STATE_DIR': str(tmp_path)})`"
    )


@pytest.fixture
def runner_client(runner_app: Flask) -> RunnerClient:
    return RunnerClient(runner_app)


@pytest.fixture
def contract_validator() -> ContractValidator:
    return ContractValidator()


@pytest.fixture
def jobforge_stub() -> Iterator[JobForgeStub]:
    stub = JobForgeStub().start()
    try:
        yield stub
    finally:
        stub.stop()


@pytest.fixture
def forge_server(tmp_path: Path) -> Iterator[str]:
    from werkzeug.serving import make_server

    from runnerkit.forge import create_app

    app = create_app({"RUNNERKIT_FORGE_DB_PATH": str(tmp_path / "forge.sqlite3")})
    server = make_server("127.0.0.1", _free_port(), app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_port}"
    try:
        _wait_healthy(url)
        yield url
    finally:
        server.shutdown()
        thread.join(10)
        forge = app.extensions.get("forge")
        close = getattr(forge, "close", None)
        if callable(close):
            close()


def _wait_healthy(url: str, timeout_s: float = 15.0) -> None:
    """Return once ``GET /health`` answers 200: the forge's dispatcher reports healthy only
    after its first tick has recorded a heartbeat, a moment after the server starts."""
    import requests

    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        try:
            answer = requests.get(f"{url}/health", timeout=2)
        except requests.RequestException as exc:
            last = repr(exc)
        else:
            if answer.status_code == 200:
                return
            last = f"{answer.status_code} {answer.text[:500]}"
        time.sleep(0.02)
    raise RuntimeError(f"the forge at {url} did not become healthy in {timeout_s:g} s: {last}")
