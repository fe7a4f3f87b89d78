"""What only the PostgreSQL store does: claims that skip rows another transaction holds, the
statement translation, NUL-safe text, and clear refusals of bad or unreachable URLs."""

from __future__ import annotations

import time
from pathlib import Path

import psycopg
import pytest
from flask.testing import FlaskClient

from runnerkit.config import ConfigError
from runnerkit.forge import Forge, ForgeSettings, create_app
from runnerkit.forge import db as forge_db
from runnerkit.forge.postgres import (
    PostgresDB,
    escape_text,
    redact_url,
    translate,
    unescape_text,
)
from tests.forge.helpers import job_request


@pytest.fixture
def pg_forge(forge: Forge) -> Forge:
    assert forge.db.postgres
    return forge


@pytest.mark.parametrize("forge_backend", ["postgres"])
def test_a_claim_skips_the_jobs_another_transaction_holds(
    pg_forge: Forge, client: FlaskClient, store_config: dict[str, str]
) -> None:
    first, second = job_request("t.skip"), job_request("t.skip")
    for job in (first, second):
        assert client.post("/jobs", json=job).status_code == 202
    with psycopg.connect(store_config["DB_URL"]) as other:  # a transaction of its own
        other.execute("SELECT 1 FROM jobs WHERE id = %s FOR UPDATE", (first["id"],))
        with pg_forge.db.tx() as conn:
            claimable = forge_db.eligible_jobs(conn, now=time.time(), limit=10, types=["t.skip"])
        with pg_forge.db.snapshot() as conn:  # a read takes no row locks and waits for none
            waiting = forge_db.eligible_jobs(conn, now=time.time(), limit=10, types=["t.skip"])
        other.rollback()
    assert [r["id"] for r in claimable] == [second["id"]]
    assert [r["id"] for r in waiting] == [first["id"], second["id"]]


def test_statements_are_translated_once_and_literals_left_alone() -> None:
    sql = (
        "SELECT * FROM runners INDEXED BY x WHERE a = ? AND b = :name AND c = '?:x'"
        " AND d::jsonb #>> '{a}' = :other ORDER BY rowid"
    )
    assert translate(sql) == (
        "SELECT * FROM runners WHERE a = %s AND b = %(name)s AND c = '?:x'"
        " AND d::jsonb #>> '{a}' = %(other)s ORDER BY seq"
    )
    assert translate(sql) is translate(sql)
    assert translate("INSERT OR IGNORE INTO t (a) VALUES (?)") == (
        "INSERT INTO t (a) VALUES (%s) ON CONFLICT DO NOTHING"
    )


@pytest.mark.parametrize("text", ["", "plain", "\x00", "\ue000", "\ue0000", "a\ue000\x00\ue000b"])
def test_text_escaping_round_trips(text: str) -> None:
    stored = escape_text(text)
    assert "\x00" not in stored
    assert unescape_text(stored) == text


def test_a_url_that_is_not_postgresql_is_refused() -> None:
    with pytest.raises(ConfigError, match="DB_URL must be a postgresql:// URL"):
        ForgeSettings.load({"DB_URL": "mysql://u@h/db"}, environ={})


def test_an_unreachable_server_stops_the_start_and_the_password_is_not_shown(
    tmp_path: Path,
) -> None:
    url = "postgresql://forge:hunter2@127.0.0.1:9/forge"
    assert redact_url(url) == "postgresql://forge:***@127.0.0.1:9/forge"
    assert PostgresDB(url).describe() == "postgresql://forge:***@127.0.0.1:9/forge"
    config = {"DB_PATH": str(tmp_path / "f.sqlite3"), "DB_URL": url, "DISPATCHER": False}
    with pytest.raises(psycopg.OperationalError) as failed:
        create_app(config)
    message = str(failed.value)
    assert message.startswith(
        "the forge cannot reach its PostgreSQL database postgresql://forge:***@127.0.0.1:9/forge"
    ), message
    assert "hunter2" not in message
