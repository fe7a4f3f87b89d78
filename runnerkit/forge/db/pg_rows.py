"""Many rows in one PostgreSQL statement: a transaction's queued events and assertions, and a
group of new jobs with theirs.

psycopg spends tens of microseconds of Python per statement executed, and the forge writes
about nine rows per job (the job, four JobEvents, four assertions). Sending them as one
JSON array per table, unpacked by the server (``jsonb_array_elements``: parsed once, where
``json`` would parse an element again for each field taken from it), costs one statement
however many rows, and encoding the array is the C JSON encoder's work (psycopg's array
dumpers run element by element in Python, which costs more than the executions saved).
Rows keep their order (``WITH ORDINALITY``), so ``seq`` follows it.

Strings go through :func:`~.pg_text.escape_text` first, as every string psycopg sends
does (PostgreSQL's text cannot hold NUL; the JSON text a ``\\u0000`` would come back as
would be refused).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from psycopg.types.json import Jsonb

from .interface import QueuedWrites
from .pg_text import escape_text

_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode

#: The assertions table's columns, in the order the rows are sent.
ASSERTION_COLUMNS = (
    "id", "subject", "predicate", "object", "confidence", "source", "ts", "expires", "document"
)  # fmt: skip

#: The jobs table's columns a submission sets, in the order the rows are sent.
JOB_COLUMNS = (
    "id", "type", "priority", "status", "request", "submitted", "updated_at", "not_before",
    "expires", "timeout_ms",
)  # fmt: skip

_EVENTS_FROM = (
    "SELECT r->>0, r->>1, r->>2, r->>3 FROM jsonb_array_elements({}::jsonb)"
    " WITH ORDINALITY AS q(r, n)"
)
_ASSERTIONS_FROM = (
    "SELECT r->>0, r->>1, r->>2, r->>3, (r->>4)::float8, r->>5, (r->>6)::float8,"
    " (r->>7)::float8, r->>8 FROM jsonb_array_elements({}::jsonb) WITH ORDINALITY AS q(r, n)"
)
_INTO_EVENTS = "INSERT INTO events (id, job_id, type, document) "
_INTO_ASSERTIONS = f"INSERT INTO assertions ({', '.join(ASSERTION_COLUMNS)}) "

#: The queued events and assertions of a transaction: one statement.
INSERT_QUEUED = (
    f"WITH queued_events AS ({_INTO_EVENTS}{_EVENTS_FROM.format('%s')} ORDER BY n"
    f" ON CONFLICT DO NOTHING) {_INTO_ASSERTIONS}{_ASSERTIONS_FROM.format('%s')} ORDER BY n"
)

#: New jobs, and the events and assertions of those actually inserted (an id already taken
#: inserts nothing), in one statement: it answers the ids inserted. Its last two parameters
#: name a channel to NOTIFY (at commit, once) when a job was inserted, or are NULL.
INSERT_JOBS = (
    "WITH new_jobs AS (INSERT INTO jobs (" + ", ".join(JOB_COLUMNS) + ")"
    " SELECT r->>0, r->>1, (r->>2)::bigint, r->>3, r->>4, (r->>5)::float8, r->>6,"
    " (r->>7)::float8, (r->>8)::float8, (r->>9)::float8"
    " FROM jsonb_array_elements(%s::jsonb) WITH ORDINALITY AS q(r, n) ORDER BY n"
    " ON CONFLICT (id) DO NOTHING RETURNING id),"
    f" new_events AS ({_INTO_EVENTS}{_EVENTS_FROM.format('%s')}"
    ' WHERE (r->>1) COLLATE "C" IN (SELECT id FROM new_jobs) ORDER BY n),'
    f" new_assertions AS ({_INTO_ASSERTIONS}{_ASSERTIONS_FROM.format('%s')}"
    ' WHERE (r->>1) COLLATE "C" IN (SELECT id FROM new_jobs) ORDER BY n)'
    " SELECT new_jobs.id FROM new_jobs LEFT JOIN LATERAL"
    " (SELECT pg_notify(%s, '') WHERE %s::text IS NOT NULL) AS woken ON true"
)


def _as_is(text: str) -> str:
    return text


#: The columns of a claim, in the order its row is sent (:func:`claim_rows`).
CLAIM_COLUMNS = (
    "id", "updated_at", "attempts", "runner_id", "runner_name", "runner_version",
    "capability_id", "first_started_at", "lease_until", "async",
)  # fmt: skip

#: The status guard of a statement that finds its jobs by key: ``status || ''`` is no
#: column an index holds, so the guard is checked on the rows the key finds. Written as
#: ``status IN (...)``, a generic plan made while few jobs waited (the statistics of a quiet
#: moment) walks ``jobs_wait`` over every job in those statuses instead: under a backlog of
#: 3,000 queued jobs, 2.3 ms of the server's CPU per claim where the key takes 0.2.
_GUARD = "jobs.status || '' IN ({})"

#: Claims: every picked job still waiting at the attempt before its claim starts its next
#: one, in one statement; it answers the ids taken. The jobs are found by their ``seq``s
#: (``= ANY``, an index look-up each): joined on the JSON rows alone, the planner, which
#: guesses a hundred of them, would rather read every waiting job.
CLAIM_JOBS = (
    "UPDATE jobs SET status = 'running', updated_at = r->>1, attempts = (r->>2)::bigint,"
    " not_before = NULL, runner_id = r->>3, runner_name = r->>4, runner_version = r->>5,"
    " capability_id = r->>6, first_started_at = r->>7, attempt_started_at = r->>1,"
    " slot_runner = r->>3, slot_capability = r->>6, lease_until = (r->>8)::float8,"
    " async = (r->>9)::bigint FROM jsonb_array_elements(%s::jsonb) AS q(r)"
    ' WHERE jobs.seq = ANY(%s::bigint[]) AND jobs.id = (r->>0) COLLATE "C"'
    " AND "
    + _GUARD.format("'queued', 'retrying'")
    + " AND jobs.attempts = (r->>2)::bigint - 1 RETURNING jobs.id"
)


def json_rows(rows: Iterable[Sequence[Any]]) -> Jsonb:
    """``rows`` as one JSON array of arrays, every string escaped for PostgreSQL's text,
    sent as ``jsonb`` (the text dumper would escape the escapes again)."""
    text = _encode([[escape_text(v) if type(v) is str else v for v in row] for row in rows])
    return Jsonb(text, dumps=_as_is)


def assertion_rows(assertions: Iterable[Mapping[str, Any]]) -> Jsonb:
    return json_rows([[row[name] for name in ASSERTION_COLUMNS] for row in assertions])


def queued_parameters(conn: QueuedWrites) -> tuple[Jsonb, Jsonb] | None:
    """The parameters of :data:`INSERT_QUEUED` for what ``conn`` has queued (and forgets),
    or None when nothing is."""
    events, conn.queued_events = conn.queued_events, []
    assertions, conn.queued_assertions = conn.queued_assertions, []
    if not events and not assertions:
        return None
    return json_rows(events), assertion_rows(assertions)


def jobs_parameters(conn: QueuedWrites, jobs: Sequence[Mapping[str, Any]]) -> tuple[Jsonb, ...]:
    """The parameters of :data:`INSERT_JOBS`: ``jobs`` (JOB_COLUMNS values) and what
    ``conn`` has queued for them (which it forgets)."""
    events, conn.queued_events = conn.queued_events, []
    assertions, conn.queued_assertions = conn.queued_assertions, []
    job_rows = json_rows([[job[name] for name in JOB_COLUMNS] for job in jobs])
    return job_rows, json_rows(events), assertion_rows(assertions)


def claim_parameters(claims: Sequence[Mapping[str, Any]]) -> tuple[Jsonb, list[int]]:
    """The parameters of :data:`CLAIM_JOBS`: each claim's CLAIM_COLUMNS values, and the
    claimed jobs' ``seq``s."""
    rows = json_rows([[claim[name] for name in CLAIM_COLUMNS] for claim in claims])
    return rows, [int(claim["seq"]) for claim in claims]


#: How a job column's value is read from a JSON row: text unless cast here.
_JOB_COLUMN_CASTS = {
    "not_before": "::float8",
    "lease_until": "::float8",
    "attempts": "::bigint",
    "async": "::bigint",
}

#: An UPDATE of jobs' ``columns``, guarded by ``statuses`` (or not) and by each job's attempt
#: (or not): (columns, statuses, by attempt) → one job's statement, or many jobs'.
UpdateShape = tuple[tuple[str, ...], tuple[str, ...] | None, bool]

_update_statements: dict[tuple[UpdateShape, bool], str] = {}


def update_statement(shape: UpdateShape, many: bool) -> str:
    """The statement that updates one job (parameters: its values, its id, ``statuses``, its
    attempt: what :func:`.jobs.update_job` sends) or many (:func:`update_parameters`) of
    ``shape``, each only while in ``statuses`` and at its attempt.

    Many jobs are one statement: their values as JSON rows, found by id (``= ANY``, an index
    look-up each, as :data:`CLAIM_JOBS` finds its jobs by ``seq``).
    """
    found = _update_statements.get((shape, many))
    if found is not None:
        return found
    columns, statuses, by_attempt = shape
    marks = "" if statuses is None else ", ".join(["%s"] * len(statuses))
    if not many:  # what update_job sends, translated (``id`` is unique: no plan walks more)
        assignments = ", ".join(f'"{column}" = %s' for column in columns)
        sql = f"UPDATE jobs SET {assignments} WHERE id = %s"
        sql += "" if statuses is None else f" AND status IN ({marks})"
        sql += " AND attempts = %s" if by_attempt else ""
    else:
        assignments = ", ".join(
            f'"{column}" = (r->>{index}){_JOB_COLUMN_CASTS.get(column, "")}'
            for index, column in enumerate(columns, start=1)
        )
        sql = (
            f"UPDATE jobs SET {assignments} FROM jsonb_array_elements(%s::jsonb) AS q(r)"
            f' WHERE jobs.id = ANY(%s::text[]) AND jobs.id = (r->>0) COLLATE "C"'
            + ("" if statuses is None else f" AND {_GUARD.format(marks)}")
        )
        if by_attempt:
            sql += f" AND jobs.attempts = (r->>{len(columns) + 1})::bigint"
    if len(_update_statements) < 256:  # shapes are few; a bound all the same
        _update_statements[(shape, many)] = sql
    return sql


def update_parameters(
    shape: UpdateShape, updates: Sequence[tuple[str, Sequence[Any], int | None]]
) -> tuple[Any, ...]:
    """The parameters of :func:`update_statement` for ``updates`` (job id, the values of the
    shape's columns, attempt) of one shape, the ids distinct."""
    _columns, statuses, _by_attempt = shape
    if len(updates) == 1:
        job_id, values, attempt = updates[0]
        single = [*values, job_id, *(statuses or ())]
        return (*single, attempt) if attempt is not None else tuple(single)
    rows = json_rows(
        [job_id, *values, *((attempt,) if attempt is not None else ())]
        for job_id, values, attempt in updates
    )
    return (rows, [job_id for job_id, _values, _attempt in updates], *(statuses or ()))
