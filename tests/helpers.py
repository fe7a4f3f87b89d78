"""Test-only capabilities and contract assertions shared by the unit tests.

Every test that looks at an answer checks it with the helpers at the bottom, so it also proves
the answer is something a Zod peer would accept.
"""

from __future__ import annotations

import io
import json
import sys
import threading
import uuid
from collections.abc import Callable
from typing import Any, ClassVar

import pytest
from flask import Flask
from flask.testing import FlaskClient
from marshmallow import Schema, ValidationError, fields, validate
from werkzeug.test import TestResponse

from runnerkit import (
    Capability,
    Conflict,
    Context,
    NotFound,
    RateLimited,
    RunnerError,
    SchemaMismatch,
    Timeout,
    Unavailable,
    ValidationFailed,
)
from runnerkit.contracts import (
    ErrorEnvelopeSchema,
    HealthCheckSchema,
    RunnerExecutionResponseSchema,
    is_uuid,
    is_zdatetime,
)
from runnerkit.errors import Unauthenticated

JOB_ID = "550e8400-e29b-41d4-a716-446655440000"
CORRELATION_ID = "7d444840-9dc0-11d1-b245-5ffdce74fad2"
SECRET = "hunter2-do-not-leak"

#: Released at the end of every test that uses ``release``; the sleeper waits on it.
RELEASE = threading.Event()


# --------------------------------------------------------------------------- capabilities


class Echo(Capability):
    """Echoes its message back, optionally after a pause."""

    id = "echo"
    job_types = ["test.echo"]
    max_concurrency = 4
    timeout_ms = 5_000
    #: How many times run() was entered, so tests can tell "answered" from "executed".
    calls: ClassVar[int] = 0

    class Input(Schema):
        message = fields.String(required=True)
        repeat = fields.Integer(load_default=1, validate=validate.Range(min=1, max=10))
        delay_ms = fields.Integer(load_default=0, validate=validate.Range(min=0, max=2_000))
        note = fields.Raw()  # any JSON value, echoed back untouched

    class Output(Schema):
        message = fields.String(required=True)
        repeat = fields.Integer(required=True)
        note = fields.Raw()

    def run(self, payload: dict[str, Any], ctx: Context) -> dict[str, Any]:
        type(self).calls += 1
        if payload["delay_ms"]:
            ctx.wait(payload["delay_ms"] / 1000.0)
        result = {"message": payload["message"] * payload["repeat"], "repeat": payload["repeat"]}
        if "note" in payload:
            result["note"] = payload["note"]
        return result


#: What the raiser raises for each ``kind`` of its payload.
RAISES: dict[str, Any] = {
    "validation": lambda: ValidationFailed(
        "name is taken",
        details=[{"message": "taken", "path": ["payload", "name"]}],
    ),
    "not_found": lambda: NotFound("no such document"),
    "conflict": lambda: Conflict("document is locked"),
    "rate_limited": lambda: RateLimited("slow down", retry_after=2),
    "rate_limited_fraction": lambda: RateLimited("slow down", retry_after=1.2),
    "unavailable": lambda: Unavailable("database is down"),
    "timeout": lambda: Timeout("upstream timed out"),
    "unauthenticated": lambda: Unauthenticated("bad upstream credentials"),
    "schema_mismatch": lambda: SchemaMismatch("wrong shape"),
    "runner_error": lambda: RunnerError("generic runner failure"),
    "runtime": lambda: RuntimeError(f"boom with {SECRET}"),
    "key_error": lambda: KeyError(SECRET),
    "marshmallow": lambda: ValidationError({"inner": ["Not valid."]}),
    # Errors a Zod peer would reject as raised: the envelope that leaves must still conform.
    "bad_path": lambda: ValidationFailed("bad item", details=[{"message": "x", "path": ["i", 0]}]),
    "bad_details": lambda: ValidationFailed(
        "bad", details=[{"path": ["a"]}, {"message": 5, "extra": object()}, "plain text"]
    ),
    "bad_severity": lambda: RunnerError("boom", severity="critical"),
    "bad_retry_after": lambda: RateLimited("slow", retry_after=-1),
    "nan_retry_after": lambda: RateLimited("slow", retry_after=float("nan")),
    "bad_code": lambda: RunnerError("boom", code=5),  # type: ignore[arg-type]
    "no_message": lambda: RunnerError(None),  # type: ignore[arg-type]
    "bad_value": lambda: ValidationFailed("v", details=[{"message": "m", "value": {1, 2}}]),
}


class Raiser(Capability):
    """Raises the error named by ``kind``."""

    id = "raiser"
    job_types = ["test.raise"]

    class Input(Schema):
        kind = fields.String(required=True, validate=validate.OneOf(sorted(RAISES)))

    class Output(Schema):
        never = fields.String()

    def run(self, payload: dict[str, Any], ctx: Context) -> dict[str, Any]:
        raise RAISES[payload["kind"]]()


class Sleeper(Capability):
    """Blocks until the test releases it, ignoring ``ctx.cancelled`` on purpose."""

    id = "sleeper"
    job_types = ["test.sleep"]
    timeout_ms = 400

    class Input(Schema):
        seconds = fields.Float(load_default=10.0)

    class Output(Schema):
        slept = fields.Boolean(required=True)

    def run(self, payload: dict[str, Any], ctx: Context) -> dict[str, Any]:
        RELEASE.wait(payload["seconds"])
        return {"slept": True}


class BadOutput(Capability):
    """Returns something its own Output rejects, chosen by ``kind``."""

    id = "bad-output"
    job_types = ["test.bad"]

    class Input(Schema):
        kind = fields.String(required=True)

    class Output(Schema):
        count = fields.Integer(required=True)
        name = fields.String(required=True)
        extra = fields.Raw()

    def run(self, payload: dict[str, Any], ctx: Context) -> Any:
        return {
            "not_json": {"count": 1, "name": "x", "extra": object()},
            "nan": {"count": 1, "name": "x", "extra": float("nan")},
            "wrong_type": {"count": "many", "name": "x"},
            "missing": {"count": 1},
            "null": {"count": None, "name": "x"},
            "not_object": ["count", 1],
            # "internal" is not in Output: refused, and its value never leaves.
            "undeclared": {"count": 1, "name": "x", "internal": SECRET},
            "coerced": {"count": "640", "name": "x"},
            "good": {"count": 1, "name": "x"},
        }[payload["kind"]]


class Order(Capability):
    """Totals an order: a nested list Input with an enum and a nested object."""

    id = "order"
    job_types = ["test.order"]

    class Input(Schema):
        class Item(Schema):
            name = fields.String(required=True)
            quantity = fields.Integer(required=True, validate=validate.Range(min=1))
            kind = fields.String(load_default="a", validate=validate.OneOf(["a", "b"]))

        class Customer(Schema):
            email = fields.String(required=True)

        items = fields.List(fields.Nested(Item), required=True, validate=validate.Length(min=1))
        customer = fields.Nested(Customer)
        tags = fields.List(fields.String(), load_default=list)

    class Output(Schema):
        total = fields.Integer(required=True)
        names = fields.List(fields.String(), required=True)

    def run(self, payload: dict[str, Any], ctx: Context) -> dict[str, Any]:
        items = payload["items"]
        return {"total": sum(i["quantity"] for i in items), "names": [i["name"] for i in items]}


TEST_CAPABILITIES = (Echo, Raiser, Sleeper, BadOutput, Order)


class JobLog:
    """Lines written to ``runnerkit.job`` by the JSON formatter the runner uses in production."""

    def __init__(self) -> None:
        self.stream = io.StringIO()

    def entries(self) -> list[dict[str, Any]]:
        """Every line so far, each parsed as the one JSON object it must be."""
        return [json.loads(line) for line in self.stream.getvalue().splitlines()]


# --------------------------------------------------------------------------- helpers


def request_body(capability: str = "echo", payload: Any = None, **extra: Any) -> dict[str, Any]:
    """A valid RunnerExecutionRequest with a fresh jobId (override fields with keywords).

    A fresh jobId per request matters: the runner's idempotency ledger replays the stored
    answer of a jobId it has already finished.
    """
    body: dict[str, Any] = {
        "jobId": new_uuid(),
        "moduleId": "test-module",
        "capabilityId": capability,
        "payload": {"message": "hi"} if payload is None else payload,
    }
    body.update(extra)
    return body


def post_execute(
    client: FlaskClient, capability: str = "echo", payload: Any = None, **extra: Any
) -> TestResponse:
    """POST a valid execution request for ``capability``."""
    return client.post("/execute", json=request_body(capability, payload, **extra))


def assert_envelope(envelope: Any) -> dict[str, Any]:
    """``envelope`` is a contract ErrorEnvelope with a Z timestamp; returns it loaded."""
    try:
        loaded: dict[str, Any] = ErrorEnvelopeSchema().load(envelope)
    except ValidationError as exc:  # pragma: no cover - the failure message is the point
        pytest.fail(f"not a valid ErrorEnvelope: {exc.messages}\n{envelope}")
    assert envelope["timestamp"].endswith("Z")
    assert is_uuid(envelope["id"])
    for detail in envelope.get("details", []):
        assert all(isinstance(part, str) for part in detail.get("path", []))
    return loaded


def assert_execution_response(body: Any) -> dict[str, Any]:
    """``body`` is a contract RunnerExecutionResponse; its error, if any, a valid envelope."""
    try:
        loaded: dict[str, Any] = RunnerExecutionResponseSchema().load(body)
    except ValidationError as exc:  # pragma: no cover
        pytest.fail(f"not a valid RunnerExecutionResponse: {exc.messages}\n{body}")
    if body["success"]:
        assert "error" not in body
    else:
        assert_envelope(body["error"])
    return loaded


def assert_failure(response: Any, status: int, category: str, *, job_known: bool = True) -> dict:
    """The answer is a JSON failure with this status and category, in the right body shape.

    With the jobId known the body is a full RunnerExecutionResponse, otherwise exactly
    ``{"success": false, "error": envelope}``. Returns the envelope.
    """
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    body = strict_json(response)
    assert body["success"] is False
    if job_known:
        assert_execution_response(body)
        assert is_uuid(body["jobId"])
    else:
        assert set(body) == {"success", "error"}
        assert_envelope(body["error"])
    envelope: dict[str, Any] = body["error"]
    assert envelope["category"] == category
    return envelope


def assert_health(body: Any) -> dict[str, Any]:
    """``body`` is a contract HealthCheck with a Z timestamp."""
    try:
        loaded: dict[str, Any] = HealthCheckSchema().load(body)
    except ValidationError as exc:  # pragma: no cover
        pytest.fail(f"not a valid HealthCheck: {exc.messages}\n{body}")
    assert is_zdatetime(body["timestamp"]) and body["timestamp"].endswith("Z")
    return loaded


def strict_json(response: TestResponse) -> Any:
    """The body parsed as JSON proper: ``NaN``/``Infinity`` (Python's extension) fail."""

    def refuse(name: str) -> Any:
        pytest.fail(f"the body contains {name}, which is not JSON")

    return json.loads(response.get_data(as_text=True), parse_constant=refuse)


def new_uuid() -> str:
    return str(uuid.uuid4())


def flask_dispatches(app: Flask) -> list[str]:
    """The paths of the requests ``app``'s Flask dispatches from now on: a WSGI lane in front
    of it (the forge's submission lane, the runner's execute lane) serves the others."""
    seen: list[str] = []
    original = app.full_dispatch_request

    def counted() -> Any:
        from flask import request

        seen.append(request.path)
        return original()

    app.full_dispatch_request = counted  # type: ignore[method-assign]
    return seen


def run_in_threads(
    target: Callable[[int], None], count: int, *, switch_interval: float | None = None
) -> None:
    """Run ``target(0)`` … ``target(count - 1)`` on as many threads at once and wait for all.

    ``switch_interval`` (seconds): the interpreter hands the GIL over that often meanwhile
    (``sys.setswitchinterval``), so races between the threads show up.
    """
    interval = sys.getswitchinterval()
    if switch_interval is not None:
        sys.setswitchinterval(switch_interval)
    try:
        threads = [threading.Thread(target=target, args=(index,)) for index in range(count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
