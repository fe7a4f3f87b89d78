"""The forge's storage: SQLite (one WAL file) or PostgreSQL, one schema, every query it runs.

The forge's modules import this package as ``db`` and call the query functions through it
(``db.get_job(conn, …)``), whichever backend holds the data; this ``__init__`` gathers them
into that one namespace and holds no code of its own. Each concern has its own module:

- :mod:`.interface`: what a connection, a row and a database look like on both backends,
  the errors either raises, and the writes a transaction queues until its commit;
- :mod:`.codec`: canonical JSON text and time-ordered (version 7) ids;
- :mod:`.schema`: the tables, their migrations, and the ``meta`` table;
- :mod:`.runners`, :mod:`.jobs`, :mod:`.events`, :mod:`.assertions`: the queries, by table;
- :mod:`.sqlite` and :mod:`.postgres`: the two stores (pools, transactions, the writers'
  turn), :mod:`.factory` picking one from the settings, and :mod:`.leadership`: the
  dispatcher's lock and wake-up channel on PostgreSQL.

The backends and the factory are imported from their own modules, not gathered here: the
forge opens its store once, and the SQLite store never loads psycopg's pool.
"""

from __future__ import annotations

from .assertions import (
    get_assertion,
    insert_assertion,
    prune_assertions,
    query_assertions,
    queue_assertion,
)
from .codec import dumps, loads, time_ordered_id
from .events import attempt_at, insert_event, list_events, queue_event, runner_was_sent
from .interface import MAX_INTEGER, UNAVAILABLE, Conn, Database, DatabaseError, Row
from .jobs import (
    claim_jobs,
    count_jobs_by_status,
    eligible_jobs,
    expired_jobs,
    get_job,
    get_jobs,
    insert_job,
    jobs_holding_slots,
    list_jobs,
    prune_finished_jobs,
    queued_since,
    queued_types,
    record_delivery,
    retries_due_after,
    shift_waits,
    taken_types,
    update_job,
    waiting_jobs,
)
from .runners import (
    delete_runner,
    disable_runner_dispatch,
    get_runner,
    insert_runner,
    list_runners,
    mark_runner_unreachable,
    mark_runners_offline,
    move_slots,
    record_heartbeat,
    runner_by_token_hash,
    runner_ids_with_health_url,
    runners_and_slots,
    slot_counts,
    watched_runners,
)
from .schema import get_meta, set_meta

__all__ = [
    "MAX_INTEGER",
    "UNAVAILABLE",
    "Conn",
    "Database",
    "DatabaseError",
    "Row",
    "attempt_at",
    "claim_jobs",
    "count_jobs_by_status",
    "delete_runner",
    "disable_runner_dispatch",
    "dumps",
    "eligible_jobs",
    "expired_jobs",
    "get_assertion",
    "get_job",
    "get_jobs",
    "get_meta",
    "get_runner",
    "insert_assertion",
    "insert_event",
    "insert_job",
    "insert_runner",
    "jobs_holding_slots",
    "list_events",
    "list_jobs",
    "list_runners",
    "loads",
    "mark_runner_unreachable",
    "mark_runners_offline",
    "move_slots",
    "prune_assertions",
    "prune_finished_jobs",
    "query_assertions",
    "queue_assertion",
    "queue_event",
    "queued_since",
    "queued_types",
    "record_delivery",
    "record_heartbeat",
    "retries_due_after",
    "runner_by_token_hash",
    "runner_ids_with_health_url",
    "runner_was_sent",
    "runners_and_slots",
    "set_meta",
    "shift_waits",
    "slot_counts",
    "taken_types",
    "time_ordered_id",
    "update_job",
    "waiting_jobs",
    "watched_runners",
]
