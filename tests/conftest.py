"""Shared fixtures: a Runner with the test capabilities, its Flask test client, log capture."""

from __future__ import annotations

import importlib
import logging
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

# The example runner (app.py) and the ``tests`` package live at the repository root.
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from runnerkit import Runner  # noqa: E402
from runnerkit.service.logs import JsonFormatter  # noqa: E402
from tests.helpers import RELEASE, TEST_CAPABILITIES, JobLog, flask_dispatches  # noqa: E402
from tests.support.postgres import TestDatabase, require_server  # noqa: E402

# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def release() -> Iterator[threading.Event]:
    """The sleeper's event, cleared for the test and set afterwards so no thread lingers."""
    RELEASE.clear()
    yield RELEASE
    RELEASE.set()


@pytest.fixture
def runner(release: threading.Event) -> Runner:
    return Runner("test-runner", version="1.2.3", capabilities=TEST_CAPABILITIES, tags=["test"])


@pytest.fixture
def app_config() -> dict[str, Any]:
    """Extra app config; tests override it with ``pytest.mark.parametrize("app_config", ...)``."""
    return {}


@pytest.fixture
def base_config(tmp_path: Path) -> dict[str, Any]:
    """Standalone (no JobForge), a private state dir (so the idempotency ledger starts empty)."""
    return {
        "RUNNERKIT_JOBFORGE_URL": "",
        "RUNNERKIT_STATE_DIR": str(tmp_path / "state"),
        "RUNNERKIT_HEALTH_CHECK_TIMEOUT_MS": 300,
    }


@pytest.fixture
def app(runner: Runner, base_config: dict[str, Any], app_config: dict[str, Any]) -> Flask:
    return runner.create_app({**base_config, **app_config})


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def through_flask(app: Flask) -> list[str]:
    """The paths of the requests Flask dispatched (a WSGI lane's are not among them)."""
    return flask_dispatches(app)


@pytest.fixture(scope="session")
def example_app(tmp_path_factory: pytest.TempPathFactory) -> Flask:
    """The example runner of app.py, standalone, with its state in a private directory.

    app.py builds its app at import, so the settings go in through the environment; the
    default state dir under the system temp dir outlives test runs (and its ledger would
    replay old answers or carry an old table layout).
    """
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RUNNERKIT_STATE_DIR", str(tmp_path_factory.mktemp("example-state")))
        mp.setenv("RUNNERKIT_JOBFORGE_URL", "")
        if "app" in sys.modules:
            module = importlib.reload(sys.modules["app"])
        else:
            module = importlib.import_module("app")
    example: Flask = module.app
    return example


@pytest.fixture
def example_client(example_app: Flask) -> FlaskClient:
    return example_app.test_client()


@pytest.fixture
def runnerkit_caplog(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """caplog for runnerkit's loggers at DEBUG, each record captured once (not again at root)."""
    logger = logging.getLogger("runnerkit")
    propagate = logger.propagate
    logger.propagate = False  # as after configure_logging; also avoids capturing twice
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.DEBUG, logger="runnerkit")
    try:
        yield caplog
    finally:
        logger.removeHandler(caplog.handler)
        logger.propagate = propagate


@pytest.fixture
def job_log() -> Iterator[JobLog]:
    capture = JobLog()
    handler = logging.StreamHandler(capture.stream)
    handler.setFormatter(JsonFormatter("test-runner", "1.2.3"))
    logger = logging.getLogger("runnerkit.job")
    logger.addHandler(handler)
    try:
        yield capture
    finally:
        logger.removeHandler(handler)


# --------------------------------------------------------------------------- forge backends


@pytest.fixture(scope="session")
def pg_database() -> Iterator[TestDatabase]:
    """The session's own PostgreSQL database (skipped, or failed under CI, without a server)."""
    require_server()
    database = TestDatabase()
    yield database
    database.drop()


@pytest.fixture(params=["sqlite", "postgres"])
def forge_backend(request: pytest.FixtureRequest) -> str:
    """The forge's store for this test: its SQLite file, or PostgreSQL on the real server."""
    backend: str = request.param
    return backend


@pytest.fixture
def forge_db_url(forge_backend: str, request: pytest.FixtureRequest) -> str:
    """RUNNERKIT_FORGE_DB_URL for the test's forge: empty on SQLite, a fresh schema on PG."""
    if forge_backend != "postgres":
        return ""
    database: TestDatabase = request.getfixturevalue("pg_database")
    return database.new_schema()
