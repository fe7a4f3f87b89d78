"""The PostgreSQL server the forge's tests run on: a database of their own, a schema per test.

Every machine of the project, CI's included, has PostgreSQL on 127.0.0.1:5432 with trust
authentication (``RUNNERKIT_TEST_PG_URL`` names another server). A test session creates one
database with a unique name on first use and drops it at the end (``WITH (FORCE)``: a forge
process a failed test left behind cannot keep it); each test gets a schema of its own in it,
named in its URL's ``search_path``, so tests never see each other's rows, nor do two sessions
running at the same time.

When the server does not answer, the PostgreSQL half of the suite is skipped with the reason;
under CI (the ``CI`` variable set) it fails instead: CI must not pass without it.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import uuid
from urllib.parse import quote, urlsplit, urlunsplit

import psycopg
import pytest

#: The server's admin URL: a database that exists, a user that may create databases.
ADMIN_URL = os.environ.get("RUNNERKIT_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def unreachable_reason(url: str = ADMIN_URL) -> str | None:
    """None when the server answers a query, else why not."""
    try:
        with psycopg.connect(url, connect_timeout=5, autocommit=True) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        return f"PostgreSQL at {url} does not answer: {str(exc).strip() or type(exc).__name__}"
    return None


def with_database(url: str, database: str, *, schema: str | None = None) -> str:
    """``url`` pointed at ``database`` (and at ``schema`` through libpq's options)."""
    parts = urlsplit(url)
    query = f"options={quote(f'-csearch_path={schema}')}" if schema else ""
    return urlunsplit(parts._replace(path=f"/{database}", query=query))


class TestDatabase:
    """One database for the session; :meth:`new_schema` gives each test its own schema."""

    def __init__(self, admin_url: str = ADMIN_URL) -> None:
        self.admin_url = admin_url
        self.name = f"runnerkit_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
        self.url = with_database(admin_url, self.name)
        self._counter = itertools.count(1)
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.name}"')

    def new_schema(self) -> str:
        """A fresh empty schema; the URL a forge uses to keep its tables there."""
        schema = f"t{next(self._counter)}_{uuid.uuid4().hex[:6]}"
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f'CREATE SCHEMA "{schema}"')
        return with_database(self.admin_url, self.name, schema=schema)

    def drop(self) -> None:
        with (
            contextlib.suppress(psycopg.Error),
            psycopg.connect(self.admin_url, autocommit=True) as conn,
        ):
            conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


def require_server() -> None:
    """Skip the calling test when PostgreSQL does not answer; fail instead under CI."""
    reason = unreachable_reason()
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI needs it: the PostgreSQL tests must not be skipped)")
    pytest.skip(reason)
