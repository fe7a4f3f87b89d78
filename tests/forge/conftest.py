"""Fixtures for the forge tests: a forge on a fresh store, over a test client or HTTP.

Every test that takes ``store_config`` (directly, or through ``forge_config``/``make_forge``) runs
twice: on a SQLite file and on PostgreSQL (``forge_backend``, see ``tests/conftest.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from runnerkit.forge import Forge, get_forge
from tests.forge.helpers import FakeRunner, ForgeServer, forge_app


@pytest.fixture
def db_path(tmp_path: Path) -> str:
    return str(tmp_path / "var" / "forge.sqlite3")


@pytest.fixture
def store_config(db_path: str, forge_db_url: str) -> dict[str, str]:
    """The store settings of the test's forge (DB_URL empty: the SQLite file at DB_PATH)."""
    return {"DB_PATH": db_path, "DB_URL": forge_db_url}


@pytest.fixture
def forge_config(store_config: dict[str, str]) -> dict[str, Any]:
    """An API-only forge (no dispatcher thread): endpoint semantics without timing."""
    return {**store_config, "DISPATCHER": False, "HEARTBEAT_INTERVAL_MS": 60_000}


@pytest.fixture
def app(forge_config: dict[str, Any]) -> Iterator[Flask]:
    app = forge_app(forge_config)
    yield app
    get_forge(app).close()


@pytest.fixture
def forge(app: Flask) -> Forge:
    return get_forge(app)


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


#: A forge whose dispatcher looks for work every 20 ms.
FAST = {
    "POLL_INTERVAL_MS": 20,
    "HEARTBEAT_INTERVAL_MS": 60_000,
    "DISPATCH_MARGIN_MS": 2_000,
    "CONNECT_TIMEOUT_MS": 1_000,
    "DISPATCH_THREADS": 8,
}


@pytest.fixture
def make_forge(store_config: dict[str, str]) -> Iterator[Callable[..., ForgeServer]]:
    servers: list[ForgeServer] = []

    def make(**config: Any) -> ForgeServer:
        server = ForgeServer({**store_config, **FAST, **config})
        servers.append(server)
        return server

    yield make
    for server in reversed(servers):
        server.stop()


@pytest.fixture
def make_runner() -> Iterator[Callable[..., FakeRunner]]:
    runners: list[FakeRunner] = []

    def make(*args: Any, **kwargs: Any) -> FakeRunner:
        runner = FakeRunner(*args, **kwargs)
        runners.append(runner)
        return runner

    yield make
    for runner in runners:
        runner.stop()
