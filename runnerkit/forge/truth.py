"""TruthCore: the assertion store (``POST /assert``, ``POST /query``).

Assertions are kept as the loaded contract document; ``object`` is also kept as canonical JSON
so a pattern's ``object`` matches by value (``1`` matches ``1.0``, key order does not matter).
A query returns unexpired assertions matching the pattern and filters, newest first. An empty
``sources`` list is treated like an absent one (no source filter).
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from runnerkit.contracts import TruthAssertionSchema, new_uuid, parse_timestamp, utc_now
from runnerkit.errors import Conflict
from runnerkit.errors.redaction import redact_job

from . import db

_ASSERTION_SCHEMA = TruthAssertionSchema()

#: Epoch seconds of 0000-01-01T00:00:00Z, which Zod accepts and Python's datetime cannot hold.
_YEAR_ZERO = -62_167_219_200.0


#: The form the forge writes (``format_timestamp``): read without the general parser.
_MILLIS_Z = re.compile(r"(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)\.(\d{3})Z")


def epoch(timestamp: str) -> float:
    """Epoch seconds of a contract timestamp (year 0000 maps to its real instant)."""
    match = _MILLIS_Z.fullmatch(timestamp)
    if match is not None:
        year, month, day, hour, minute, second, millis = map(int, match.groups())
        with contextlib.suppress(ValueError):  # out of range: the general path says why
            moment = datetime(year, month, day, hour, minute, second, millis * 1000, tzinfo=UTC)
            return moment.timestamp()
    try:
        return parse_timestamp(timestamp).timestamp()
    except ValueError:
        if timestamp.startswith("0000-"):
            return _YEAR_ZERO + (
                parse_timestamp("2000" + timestamp[4:]).timestamp()
                - parse_timestamp("2000-01-01T00:00:00Z").timestamp()
            )
        raise


def _row_values(assertion: Mapping[str, Any]) -> dict[str, Any]:
    expires = assertion.get("expiresAt")
    return {
        "id": assertion["id"],
        "subject": assertion["subject"],
        "predicate": assertion["predicate"],
        "object": db.dumps(assertion["object"]),
        "confidence": float(assertion["confidence"]),
        "source": assertion["source"],
        "ts": epoch(assertion["timestamp"]),
        "expires": None if expires is None else epoch(expires),
        "document": db.dumps(assertion),
    }


def record(
    conn: db.Conn,
    *,
    subject: str,
    predicate: str,
    obj: Any,
    source: str,
    metadata: Mapping[str, Any] | None = None,
    confidence: float = 1,
) -> dict[str, Any]:
    """Store an assertion the forge makes itself (inside the caller's transaction)."""
    assertion: dict[str, Any] = {
        "id": new_uuid(),
        "subject": subject,
        "predicate": predicate,
        "object": obj,
        "confidence": confidence,
        "source": source,
        "timestamp": utc_now(),
        "metadata": dict(metadata or {}),
    }
    db.insert_assertion(conn, _row_values(assertion))
    return assertion


def forge_assertion(
    *,
    subject: str,
    predicate: str,
    obj: Any,
    source: str,
    timestamp: str,
    ts: float,
    metadata: Mapping[str, Any] | None = None,
    object_json: str | None = None,
) -> dict[str, Any]:
    """The row of an assertion the forge makes itself at ``timestamp`` (epoch ``ts``).

    The caller gives both forms of the instant, so nothing is parsed back, and may give
    ``object_json`` (``db.dumps(obj)``) when it has it already; ``db.queue_assertion`` writes
    the row with its transaction. The document is what ``db.dumps`` makes of the
    TruthAssertion, assembled around the canonical object instead of encoding it again.
    """
    assertion_id = db.time_ordered_id()
    if object_json is None:
        object_json = db.dumps(obj)
    document = (
        f'{{"confidence":1,"id":"{assertion_id}","metadata":{db.dumps(metadata or {})},'
        f'"object":{object_json},"predicate":{_string(predicate)},"source":{_string(source)},'
        f'"subject":{_string(subject)},"timestamp":{_string(timestamp)}}}'
    )
    return {
        "id": assertion_id,
        "subject": subject,
        "predicate": predicate,
        "object": object_json,
        "confidence": 1.0,
        "source": source,
        "ts": ts,
        "expires": None,
        "document": document,
    }


_string = json.JSONEncoder().encode  # a str as db.dumps writes it


class TruthStore:
    """``POST /assert`` and ``POST /query`` over the forge database."""

    def __init__(self, database: db.Database, max_limit: int = 500) -> None:
        self.db = database
        #: A query's ``limit`` above this is cut to it (``hasMore`` says there is more).
        self.max_limit = max_limit

    def add(self, assertion: Mapping[str, Any]) -> tuple[int, dict[str, Any]]:
        """Store a loaded TruthAssertion: 201 when new, 200 when the same one was stored.

        The same id with a different document is a 409 RESOURCE_CONFLICT.
        """
        document = db.dumps(assertion)
        with self.db.tx() as conn:
            existing = db.get_assertion(conn, assertion["id"])
            if existing is not None:
                if existing["document"] != document:
                    raise Conflict(
                        f"Assertion {assertion['id']} exists with different content",
                        code="ASSERTION_CONFLICT",
                    )
                return 200, db.loads(existing["document"])
            db.insert_assertion(conn, _row_values(assertion))
        return 201, db.loads(document)

    def query(self, query: Mapping[str, Any]) -> dict[str, Any]:
        """Answer a loaded TruthQuery with a TruthQueryResult."""
        started = time.perf_counter()
        pattern = query["pattern"]
        filters = query["filters"]
        with self.db.snapshot() as conn:
            rows, total = db.query_assertions(
                conn,
                now=time.time(),
                subject=pattern.get("subject"),
                predicate=pattern.get("predicate"),
                object_json=db.dumps(pattern["object"]) if "object" in pattern else None,
                min_confidence=float(filters["minConfidence"]),
                sources=filters.get("sources") or None,
                before=epoch(filters["before"]) if "before" in filters else None,
                after=epoch(filters["after"]) if "after" in filters else None,
                limit=min(int(query["limit"]), self.max_limit),
                offset=min(int(query["offset"]), db.MAX_INTEGER),
            )
        # Redacted as the dashboard shows them: JSON and HTML give away the same values.
        assertions = [redact_job(db.loads(r["document"]), r["document"]) for r in rows]
        return {
            "queryId": query["id"],
            "assertions": assertions,
            "totalCount": total,
            "hasMore": query["offset"] + len(assertions) < total,
            "queryTimeMs": round((time.perf_counter() - started) * 1000.0, 3),
        }
