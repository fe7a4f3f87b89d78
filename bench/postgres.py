"""PostgreSQL for part 2: databases of the benchmark's own, and the CPU the server spends.

The forge's PostgreSQL stacks each get a fresh database on the local server
(``RUNNERKIT_BENCH_PG_URL``, else ``postgresql://postgres@127.0.0.1:5432/postgres``: an admin
URL, a user that may create databases), named for this run and dropped at the end with
``WITH (FORCE)`` so a forge process left behind cannot keep it. A database per stack, not a
schema, so the server's backends can be told apart by ``pg_stat_activity.datname``.

The server's CPU per job is read with psutil from the server's processes (they run as the
``postgres`` user; reading their CPU times needs the same user or root): every backend
connected to the stack's database, plus the server's shared background processes (WAL
writer, checkpointer, background writer, autovacuum), which work for every database on the
server. The machine's PostgreSQL also serves whatever else runs beside the benchmark, so
only those backends are counted, not every child of the postmaster; the whole server's
figure is kept beside it for comparison. A backend that exits inside the load window takes
its CPU with it: the figure is a lower bound (the forge's pools keep their connections for
minutes, so in practice none do).
"""

from __future__ import annotations

import contextlib
import os
import uuid
from dataclasses import dataclass, field

import psutil
import psycopg

from runnerkit.forge.db.postgres import redact_url
from tests.support.postgres import unreachable_reason, with_database

#: The server's admin URL: a database that exists, a user that may create databases.
ADMIN_URL = os.environ.get(
    "RUNNERKIT_BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)

#: Background processes that serve every database; counted with each stack's backends.
SHARED_BACKENDS = (
    "walwriter",
    "checkpointer",
    "background writer",
    "autovacuum launcher",
)


def _cpu(pid: int) -> float | None:
    try:
        times = psutil.Process(pid).cpu_times()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
    return times.user + times.system


@dataclass
class CpuSnapshot:
    """CPU seconds so far of the processes that serve one database, by pid, and of the whole
    server (the postmaster's live children plus those it has reaped)."""

    by_pid: dict[int, float] = field(default_factory=dict)
    whole_server: float = float("nan")

    def since(self, earlier: CpuSnapshot) -> tuple[float, float]:
        """(CPU seconds of this database's processes, of the whole server) since ``earlier``.

        A process absent from ``earlier`` started inside the window: all of its CPU counts.
        """
        used = sum(cpu - earlier.by_pid.get(pid, 0.0) for pid, cpu in self.by_pid.items())
        return used, self.whole_server - earlier.whole_server


class BenchPostgres:
    """Databases for the benchmark on one server, and readings of that server's CPU."""

    def __init__(self, admin_url: str = ADMIN_URL) -> None:
        self.admin_url = admin_url
        self.prefix = f"runnerkit_bench_{os.getpid()}_{uuid.uuid4().hex[:6]}"
        self.databases: list[str] = []
        self._postmaster: int | None = None

    def unreachable(self) -> str | None:
        """None when the server answers a query, else why not (the URL without its password:
        the reason goes into the report)."""
        reason = unreachable_reason(self.admin_url)
        return (
            None if reason is None else reason.replace(self.admin_url, redact_url(self.admin_url))
        )

    def create_database(self, slug: str) -> tuple[str, str]:
        """A fresh empty database; (its name, the URL a forge uses to reach it)."""
        name = f"{self.prefix}_{slug}"
        with psycopg.connect(self.admin_url, autocommit=True, connect_timeout=10) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
            if self._postmaster is None:
                backend = conn.execute("SELECT pg_backend_pid()").fetchone()
                self._postmaster = self._parent(int(backend[0]) if backend else 0)
        self.databases.append(name)
        return name, with_database(self.admin_url, name)

    def analyze(self, name: str) -> None:
        """Statistics for every table of database ``name``, as autovacuum gathers them within
        its first minute: a fresh database's first plans assume empty tables (a sequential
        scan of ``jobs`` per dispatch round), and psycopg keeps them prepared until then."""
        with psycopg.connect(
            with_database(self.admin_url, name), autocommit=True, connect_timeout=10
        ) as conn:
            conn.execute("ANALYZE")

    def drop_all(self) -> None:
        """Drop every database this run created, whoever is still connected to it."""
        for name in self.databases:
            with (
                contextlib.suppress(psycopg.Error),
                psycopg.connect(self.admin_url, autocommit=True, connect_timeout=10) as conn,
            ):
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self.databases.clear()

    @staticmethod
    def _parent(pid: int) -> int | None:
        """The postmaster: the parent of a backend, when the server runs on this machine."""
        try:
            return psutil.Process(pid).ppid()
        except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
            return None

    def cpu(self, database: str) -> CpuSnapshot | None:
        """CPU so far of ``database``'s backends and of the shared background processes;
        None when the server's processes cannot be read (another machine, another user)."""
        if self._postmaster is None:
            return None
        with psycopg.connect(self.admin_url, autocommit=True, connect_timeout=10) as conn:
            rows = conn.execute(
                "SELECT pid, datname, backend_type FROM pg_stat_activity "
                "WHERE pid <> pg_backend_pid()"
            ).fetchall()
        snapshot = CpuSnapshot()
        for pid, datname, backend_type in rows:
            if datname == database or backend_type in SHARED_BACKENDS:
                cpu = _cpu(int(pid))
                if cpu is not None:
                    snapshot.by_pid[int(pid)] = cpu
        snapshot.whole_server = self._whole_server()
        return snapshot

    def _whole_server(self) -> float:
        """CPU of every process the postmaster started, those it has reaped included."""
        assert self._postmaster is not None
        try:
            postmaster = psutil.Process(self._postmaster)
            times = postmaster.cpu_times()
            children = postmaster.children()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return float("nan")
        total = times.children_user + times.children_system
        return total + sum(cpu for child in children if (cpu := _cpu(child.pid)) is not None)
