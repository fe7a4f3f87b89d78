"""The schema's versions, on both backends: an older database is upgraded when the forge
starts, a newer one is refused with a message that says what to do, and left as it was."""

from __future__ import annotations

import contextlib
import sqlite3
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import psycopg
import pytest

from runnerkit.contracts import utc_now
from runnerkit.forge import create_app, get_forge
from runnerkit.forge import db as forge_db
from runnerkit.forge.db.schema import MIGRATIONS, SCHEMA_VERSION, SchemaTooNew, statements
from tests.forge.helpers import capability, registration, store
from tests.support import GunicornProcess
from tests.support.waiting import wait_until


@contextlib.contextmanager
def raw(config: dict[str, str]) -> Iterator[Any]:
    """A plain connection to the test's database (no forge, no migrations), committing."""
    if config["DB_URL"]:
        with psycopg.connect(config["DB_URL"], autocommit=True) as conn:
            yield conn
    else:
        Path(config["DB_PATH"]).parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(config["DB_PATH"], isolation_level=None)
        try:
            yield conn
        finally:
            conn.close()


def run(config: dict[str, str], sql: str, args: Sequence[Any] = ()) -> list[Any]:
    if config["DB_URL"]:
        sql = sql.replace("?", "%s")
    with raw(config) as conn:
        cursor = conn.execute(sql, args)
        return list(cursor.fetchall()) if cursor.description else []


def stored_version(config: dict[str, str]) -> int:
    rows = run(config, "SELECT value FROM meta WHERE key = 'schema_version'")
    return int(rows[0][0])


def make_version_1(config: dict[str, str]) -> None:
    """A database as the first release of the schema left it, with one runner in it."""
    first = MIGRATIONS[0]
    for statement in statements(first.postgres if config["DB_URL"] else first.sqlite):
        run(config, statement)
    run(config, "INSERT INTO meta (key, value) VALUES ('schema_version', '1')")
    old = forge_db.dumps(registration("old", "http://127.0.0.1:9/health", [capability("c", ["t"])]))
    run(
        config,
        "INSERT INTO runners (id, name, version, document, health_url, base_url, registered_at,"
        " last_heartbeat_at, last_seen, status, heartbeat_interval_ms)"
        " VALUES (?, 'old', '1.0.0', ?, 'http://127.0.0.1:9/health', 'http://127.0.0.1:9',"
        " ?, ?, 0, 'offline', 30000)",
        ("00000000-0000-4000-8000-000000000001", old, utc_now(), utc_now()),
    )


def test_the_history_is_numbered_in_order() -> None:
    assert [m.version for m in MIGRATIONS] == list(range(1, len(MIGRATIONS) + 1))
    assert MIGRATIONS[-1].version == SCHEMA_VERSION


def test_a_new_database_gets_every_step(store_config: dict[str, str]) -> None:
    app = create_app({**store_config, "DISPATCHER": False})
    get_forge(app).close()
    assert stored_version(store_config) == SCHEMA_VERSION


def test_an_older_database_is_upgraded_and_keeps_its_rows(store_config: dict[str, str]) -> None:
    make_version_1(store_config)

    app = create_app({**store_config, "DISPATCHER": False})
    try:
        assert stored_version(store_config) == SCHEMA_VERSION
        client = app.test_client()
        listed = client.get("/runners").get_json()
        assert [r["name"] for r in listed["items"]] == ["old"]
        # Step 2's column is there: a registration keeps its runner's token hash.
        body = registration("r", "http://127.0.0.1:9/health", [capability("c", ["t"])])
        answer = client.post("/runners/register", json=body)
        assert answer.status_code == 201, answer.get_json()
        beat = {"runnerId": answer.get_json()["runnerId"], "timestamp": utc_now()}
        beat["status"] = "healthy"
        headers = {"Authorization": f"Bearer {answer.get_json()['runnerToken']}"}
        assert client.post("/runners/heartbeat", json=beat, headers=headers).status_code == 200
    finally:
        get_forge(app).close()
    # A second start finds nothing to do.
    again = create_app({**store_config, "DISPATCHER": False})
    get_forge(again).close()
    assert stored_version(store_config) == SCHEMA_VERSION


def test_a_newer_database_is_refused_and_left_alone(store_config: dict[str, str]) -> None:
    app = create_app({**store_config, "DISPATCHER": False})
    get_forge(app).close()
    newer = SCHEMA_VERSION + 1
    run(store_config, "UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(newer),))

    with pytest.raises(SchemaTooNew) as refused:
        create_app({**store_config, "DISPATCHER": False})

    message = str(refused.value)
    assert f"schema version {newer}" in message
    assert f"(version {SCHEMA_VERSION})" in message
    assert "newer runnerkit" in message
    assert stored_version(store_config) == newer


def test_gunicorn_says_why_it_will_not_serve_a_newer_database(
    store_config: dict[str, str], tmp_path: Path
) -> None:
    """What an operator sees: the forge's processes exit, the log names the versions."""
    make = store(store_config)
    make.ping()  # creates the schema
    make.close()
    newer = SCHEMA_VERSION + 5
    run(store_config, "UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(newer),))
    env: dict[str, str | None] = {f"RUNNERKIT_FORGE_{k}": v for k, v in store_config.items()}
    env["RUNNERKIT_FORGE_DISPATCHER"] = "false"
    proc = GunicornProcess(
        "runnerkit.forge:app", log_dir=tmp_path, workers=2, env=env, name="forge"
    ).start()
    try:
        # gunicorn's master gives up when its workers cannot boot (exit code 3).
        wait_until(lambda: proc.returncode is not None, 60, proc.log_text)
    finally:
        proc.stop()
    assert proc.returncode != 0
    log = proc.log_text()
    assert f"schema version {newer}" in log, log[-3000:]
    assert "newer runnerkit" in log, log[-3000:]
    assert stored_version(store_config) == newer


def test_the_store_reports_its_backend(store_config: dict[str, str]) -> None:
    database = store(store_config)
    try:
        assert database.postgres is bool(store_config["DB_URL"])
        assert "***" not in database.describe() or ":***@" in database.describe()
        with database.tx() as conn:
            forge_db.set_meta(conn, "probe", {"python": sys.version_info[0]})
        with database.snapshot() as conn:
            assert forge_db.get_meta(conn, "probe") == {"python": 3}
    finally:
        database.close()
