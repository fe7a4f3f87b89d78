"""What only the PostgreSQL store does: claims that skip rows another transaction holds, the
statement translation, NUL-safe text, and clear refusals of bad or unreachable URLs."""

from __future__ import annotations

import contextlib
import re
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import psycopg.sql
import pytest
from flask.testing import FlaskClient

from runnerkit.contracts import load_job_request
from runnerkit.forge import Forge, ForgeSettings, create_app
from runnerkit.forge import db as forge_db
from runnerkit.forge.db import leadership as leadership_module
from runnerkit.forge.db import pg_rows
from runnerkit.forge.db.leadership import PgLeadership
from runnerkit.forge.db.pg_text import escape_text, unescape_text
from runnerkit.forge.db.postgres import PgConn, PostgresDB, redact_url, translate
from runnerkit.service.settings import ConfigError
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


@pytest.mark.parametrize("forge_backend", ["postgres"])
def test_queued_rows_are_written_in_order_with_odd_text_and_mixed_numbers(
    pg_forge: Forge,
) -> None:
    """A transaction's queued events and assertions go in as one array insert per table:
    NUL and private-use characters survive, ints and floats mix, NULLs stay NULL, and
    ``seq`` follows the order they were queued in."""
    odd = ["a\x00b", "\ue000", "x\ue000\x00y", "plain"]
    job_id = "job-" + "\x00"
    with pg_forge.db.tx() as conn:
        for index, text in enumerate(odd):
            forge_db.queue_event(conn, f"ev-{index}", job_id, text, f'{{"n":{index}}}')
            forge_db.queue_assertion(
                conn,
                {
                    "id": f"as-{index}",
                    "subject": text,
                    "predicate": "status",
                    "object": text,
                    "confidence": 1 if index % 2 else 0.5,
                    "source": text,
                    "ts": 1700000000000 + index,
                    "expires": None if index % 2 else 1800000000.5,
                    "document": "{}",
                },
            )
    with pg_forge.db.snapshot() as conn:
        events = conn.execute("SELECT id, job_id, type FROM events ORDER BY seq").fetchall()
        facts = conn.execute(
            "SELECT id, subject, object, confidence, source, ts, expires FROM assertions"
            " WHERE predicate = 'status' AND id LIKE 'as-%' ORDER BY seq"
        ).fetchall()
    assert [tuple(r) for r in events] == [(f"ev-{i}", job_id, text) for i, text in enumerate(odd)]
    assert [tuple(r) for r in facts] == [
        (
            f"as-{i}",
            text,
            text,
            1.0 if i % 2 else 0.5,
            text,
            1700000000000.0 + i,
            None if i % 2 else 1800000000.5,
        )
        for i, text in enumerate(odd)
    ]


def _job_row(job_id: str) -> dict[str, object]:
    return {
        "id": job_id, "type": "t.later", "priority": 50, "status": "running", "request": "{}",
        "submitted": 1.0, "updated_at": "2026-01-01T00:00:00.000Z", "not_before": None,
        "expires": None, "timeout_ms": 1000.0,
    }  # fmt: skip


@pytest.mark.parametrize("forge_backend", ["postgres"])
def test_a_pipelined_transactions_updates_go_together_in_order_and_a_rollback_drops_them(
    pg_forge: Forge,
) -> None:
    """In ``tx(pipeline=True)`` a job's guarded update waits for the next statement and
    updates of one shape next to each other are one statement: each still only while its
    job is in the statuses and attempt named, a job updated twice in a row ends with the
    second, text with NUL survives, a read sees what came before it, and what a savepoint
    or the transaction rolls back is never written."""
    ids = [f"later-{index}" for index in range(4)]
    with pg_forge.db.connection() as conn:
        for job_id in ids:
            forge_db.insert_job(conn, _job_row(job_id))
    done = {"status": "completed", "lease_until": 2.5, "result": "a\x00b", "error": None}
    with pg_forge.db.tx(pipeline=True) as conn:
        for job_id in ids[:3]:
            forge_db.update_job(conn, job_id, done, statuses=("running",), attempts=0)
        failed = {**done, "status": "failed", "lease_until": None, "result": "second"}
        forge_db.update_job(conn, ids[0], failed, statuses=("completed",), attempts=0)
        forge_db.update_job(conn, ids[3], done, statuses=("running",), attempts=7)  # not met
        row = forge_db.get_job(conn, ids[1])
        assert row is not None and (row["status"], row["result"]) == ("completed", "a\x00b")
        forge_db.update_job(conn, ids[1], {"async": 1}, attempts=0)
        forge_db.update_job(conn, ids[2], {"async": 1}, attempts=0)
        with contextlib.suppress(ValueError), conn.savepoint():
            forge_db.update_job(conn, ids[3], {"status": "cancelled"}, attempts=0)
            forge_db.update_job(conn, ids[2], {"status": "cancelled"}, attempts=0)
            raise ValueError("undone")
    with contextlib.suppress(RuntimeError), pg_forge.db.tx(pipeline=True) as conn:
        forge_db.update_job(conn, ids[3], {"status": "cancelled"}, attempts=0)
        raise RuntimeError("rolled back")
    with pg_forge.db.connection() as conn:
        rows = forge_db.get_jobs(conn, ids)
    seen = [
        (rows[i]["status"], rows[i]["result"], rows[i]["lease_until"], rows[i]["async"])
        for i in ids
    ]
    assert seen == [
        ("failed", "second", None, 0),
        ("completed", "a\x00b", 2.5, 1),
        ("completed", "a\x00b", 2.5, 1),
        ("running", None, None, 0),
    ]


@pytest.mark.parametrize("forge_backend", ["postgres"])
def test_queuing_jobs_notifies_the_channel_given_once_and_only_for_new_jobs(
    pg_forge: Forge, client: FlaskClient, store_config: dict[str, str]
) -> None:
    """The statement that queues a group of jobs NOTIFYs the dispatcher's channel itself (at
    its commit, once) when asked to and a job was new; a group of known ids wakes nobody."""
    channel = "runnerkit_forge_test_channel"
    listener = psycopg.connect(store_config["DB_URL"], autocommit=True)
    try:
        listener.execute(f"LISTEN {channel}")

        def heard() -> int:
            return sum(1 for _ in listener.notifies(timeout=0.5, stop_after=10))

        first, second = (load_job_request(job_request("t.notify")) for _ in range(2))
        assert pg_forge.jobs.submit(first, notify=channel)[0] == 202
        assert heard() == 1
        assert pg_forge.jobs.submit(second, notify=None)[0] == 202
        assert heard() == 0
        assert pg_forge.jobs.submit(first, notify=channel)[0] == 200  # already queued
        assert heard() == 0
        with pg_forge.db.connection() as conn:
            queued = [job_request("t.notify"), job_request("t.notify")]
            assert isinstance(conn, PgConn)
            values = [
                {**dict.fromkeys(pg_rows.JOB_COLUMNS), "id": job["id"], "type": job["type"],
                 "priority": 0, "status": "queued", "request": "{}", "submitted": 0.0,
                 "updated_at": "x", "timeout_ms": 1000.0}
                for job in queued
            ]  # fmt: skip
            assert conn.insert_jobs(values, channel) == {job["id"] for job in queued}
        assert heard() == 1, "two jobs in one statement: one notification"
    finally:
        listener.close()


def _jobs_rows_read(raw: psycopg.Connection[Any], sql: str, *parameters: str) -> tuple[int, int]:
    """(rows of ``jobs`` the generic plan of ``sql`` reads, rows it changes) when run with
    the literal ``parameters`` (rolled back)."""
    raw.execute("BEGIN")
    try:
        raw.execute("SET LOCAL plan_cache_mode = force_generic_plan")
        marks = iter(range(1, 100))
        numbered = re.sub(r"%s", lambda _match: f"${next(marks)}", sql)
        raw.execute(psycopg.sql.SQL("PREPARE keyed AS {}").format(psycopg.sql.SQL(numbered)))
        literals = psycopg.sql.SQL(", ").join(psycopg.sql.Literal(p) for p in parameters)
        explain = psycopg.sql.SQL("EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE keyed({})")
        row = raw.execute(explain.format(literals)).fetchone()
        assert row is not None
        plan = row[0][0]["Plan"]
    finally:
        raw.execute("ROLLBACK")
        raw.execute("DEALLOCATE ALL")

    def read(node: dict[str, Any]) -> int:
        own = 0
        if node.get("Relation Name") == "jobs" and "Scan" in node["Node Type"]:
            own = int(node["Actual Rows"]) + int(node.get("Rows Removed by Filter", 0))
        return own + sum(read(child) for child in node.get("Plans", ()))

    return read(plan), int(plan["Plans"][0]["Actual Rows"])


@pytest.mark.parametrize("forge_backend", ["postgres"])
def test_keyed_updates_read_the_rows_they_change_whatever_the_statistics_say(
    pg_forge: Forge, store_config: dict[str, str]
) -> None:
    """The claim and the batched update find their jobs by key. With statistics taken while
    no job waited or ran, and then a backlog of 3,000 in those statuses, a status guard the
    planner could look up would walk the whole backlog per statement; checked on the rows
    the key finds, it reads the one row it changes."""
    backlog = 3000
    with psycopg.connect(store_config["DB_URL"], autocommit=True) as raw:
        raw.execute(
            "INSERT INTO jobs (id, type, priority, status, request, submitted, updated_at,"
            " timeout_ms, attempts) SELECT 'backlog-' || g, 't.backlog', 50, 'completed', '{}',"
            " 1.0, '2026-01-01T00:00:00.000Z', 1000, 0 FROM generate_series(1, %s) AS g",
            (backlog,),
        )
        raw.execute("ANALYZE jobs")  # a quiet moment: nothing waits, nothing runs
        first = raw.execute("SELECT seq FROM jobs WHERE id = 'backlog-1'").fetchone()
        assert first is not None
        for status, sql, parameters in [
            (
                "queued",
                translate(pg_rows.CLAIM_JOBS),
                (
                    '[["backlog-1", "2026", 1, "r", "n", "v", "c", "2026", 1.0, 0]]',
                    f"{{{first[0]}}}",
                ),
            ),
            (
                "running",
                pg_rows.update_statement((("status",), ("running",), True), True),
                ('[["backlog-1", "completed", 0]]', "{backlog-1}", "running"),
            ),
        ]:
            raw.execute("UPDATE jobs SET status = %s", (status,))  # the backlog, unanalysed
            read, changed = _jobs_rows_read(raw, sql, *parameters)
            assert (read, changed) == (1, 1), f"{read} {status} jobs read to update one"


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


@pytest.mark.parametrize("forge_backend", ["postgres"])
def test_pooled_connections_the_server_ended_are_replaced_on_checkout(
    pg_forge: Forge, client: FlaskClient, store_config: dict[str, str]
) -> None:
    """After a server restart or ``pg_terminate_backend``, the pool's idle connections are
    dead; each is found on checkout and replaced, so no request gets an error for it."""
    job = job_request("t.stale")
    assert client.post("/jobs", json=job).status_code == 202
    with pg_forge.db.connection() as conn:
        pooled = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
    with psycopg.connect(store_config["DB_URL"], autocommit=True) as admin:
        ended = admin.execute(
            "SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchall()
        assert pooled in {row[0] for row in ended}
        # Every one ended, not only the one looked at: a connection whose server is still
        # on its way out passes the checkout's check and fails the query after it.
        pids = [row[0] for row in ended]
        while admin.execute(
            "SELECT 1 FROM pg_stat_activity WHERE pid = ANY(%s)", (pids,)
        ).fetchone():
            time.sleep(0.01)
    for _ in range(pg_forge.db.pool_size + 2):
        response = client.get(f"/jobs/{job['id']}")
        assert response.status_code == 200, response.get_data(as_text=True)
    with pg_forge.db.connection() as conn:
        assert conn.execute("SELECT pg_backend_pid()").fetchone()[0] != pooled


@pytest.mark.parametrize(
    ("forge_backend", "failure"),
    [
        ("sqlite", sqlite3.OperationalError("disk I/O error")),
        ("postgres", psycopg.OperationalError("server closed the connection unexpectedly")),
    ],
)
def test_an_unavailable_database_is_a_retryable_503_envelope(
    forge: Forge, client: FlaskClient, monkeypatch: pytest.MonkeyPatch, failure: Exception
) -> None:
    """The database down (a restart, a cut, a failing disk) is the forge's outage, not its bug:
    503 SERVICE_UNAVAILABLE with Retry-After, never a 500 or a traceback."""

    def unavailable(*args: object, **kwargs: object) -> None:
        raise failure

    monkeypatch.setattr(forge.db, "connection", unavailable)
    monkeypatch.setattr(forge.db, "snapshot", unavailable)
    monkeypatch.setattr(forge.db, "tx", unavailable)
    for response in (client.get("/jobs"), client.post("/jobs", json=job_request("t.down"))):
        assert response.status_code == 503, response.get_data(as_text=True)
        assert response.headers["Retry-After"] == "1"
        error = response.get_json()["error"]
        assert error["category"] == "SERVICE_UNAVAILABLE" and error["retryable"] is True
        assert error["code"] == "STORE_UNAVAILABLE"


def test_a_process_whose_lock_connection_was_cut_leaves_the_lock_to_the_others(
    pg_database: Any,
) -> None:
    """It learns of the cut first and would take the lock straight back, every time, though
    its own connection may be what failed: it waits while another process takes it."""
    url = pg_database.new_schema()
    first, second = PgLeadership(PostgresDB(url)), PgLeadership(PostgresDB(url))
    try:
        assert first.acquire() and not second.acquire()
        assert first._conn is not None
        backend = first._conn.info.backend_pid
        with psycopg.connect(url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (backend,))
        deadline = time.monotonic() + 5
        while first.held and time.monotonic() < deadline:
            first.consume()
            time.sleep(0.01)
        assert not first.held, "the cut was never seen"
        assert not first.acquire(), "the lock was taken straight back by the cut process"
        assert second.acquire(), "the lock was not free for another process"
        second.release()
        time.sleep(leadership_module.LOST_PAUSE_S)
        assert first.acquire(), "the cut process never took the lock again"
    finally:
        first.release()
        second.release()


def test_notifications_asked_for_together_share_one_notify_and_none_is_lost() -> None:
    """notify() never waits for PostgreSQL: the process's notifier thread sends one NOTIFY for
    every request made before it starts sending, and always one more after the last request."""
    leadership = PgLeadership(PostgresDB("postgresql://nobody@127.0.0.1:9/none"))
    sends: list[float] = []
    asked: list[float] = []
    lock = threading.Lock()

    def slow_send() -> None:
        with lock:
            sends.append(time.monotonic())
        time.sleep(0.02)  # a round trip to the server

    leadership.notify_now = slow_send  # type: ignore[method-assign]

    def ask() -> None:
        for _ in range(25):
            with lock:
                asked.append(time.monotonic())
            leadership.notify()

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (not sends or sends[-1] < asked[-1]):
        time.sleep(0.01)
    assert sends and sends[-1] >= max(asked), "the last request was never served"
    assert len(sends) < len(asked), f"{len(sends)} NOTIFYs for {len(asked)} requests"
