"""Capability class checks at definition time, Runner registry checks, and the job Context."""

from __future__ import annotations

import datetime
import decimal
import enum
import math
import threading
import time
import types
import uuid
from typing import Any

import pytest
from marshmallow import EXCLUDE, INCLUDE, RAISE, Schema, fields

from runnerkit import Capability, CapabilityDefinitionError, Context, Runner, SchemaMismatch
from runnerkit.contracts import fields as strict


class _In(Schema):
    text = fields.String(required=True)


class _Out(Schema):
    length = fields.Integer(required=True)


def _run(self: Any, payload: dict[str, Any], ctx: Context) -> dict[str, Any]:
    return {"length": len(payload["text"])}


VALID: dict[str, Any] = {
    "id": "widget",
    "version": "1.0.0",
    "job_types": ["widget.make"],
    "max_concurrency": 2,
    "timeout_ms": 1000,
    "Input": _In,
    "Output": _Out,
    "run": _run,
}

_MISSING = object()


def define(name: str = "Widget", base: type = Capability, **changes: Any) -> type[Capability]:
    """Run a class statement for a capability: VALID with ``changes`` (``_MISSING`` deletes)."""
    attrs = {**VALID, **changes}
    attrs = {k: v for k, v in attrs.items() if v is not _MISSING}
    return type(name, (base,), attrs)


# --------------------------------------------------------------------------- definition


def test_a_valid_definition_passes_and_fills_name_and_description() -> None:
    cls = define(__doc__="Makes widgets.\n\nMore text.")

    assert cls.abstract is False
    assert cls.name == "widget"
    assert cls.description == "Makes widgets."
    assert cls().manifest()["id"] == "widget"


@pytest.mark.parametrize(
    ("field", "changes"),
    [
        ("id", {"id": _MISSING}),
        ("id", {"id": ""}),
        ("id", {"id": 5}),
        ("id", {"id": "has space"}),
        ("version", {"version": "1.0"}),
        ("version", {"version": "v1.0.0"}),
        ("version", {"version": "1.0.0.0"}),
        ("version", {"version": 1}),
        ("job_types", {"job_types": _MISSING}),
        ("job_types", {"job_types": []}),
        ("job_types", {"job_types": "widget.make"}),
        ("job_types", {"job_types": [""]}),
        ("job_types", {"job_types": ["a", "a"]}),
        ("max_concurrency", {"max_concurrency": 0}),
        ("max_concurrency", {"max_concurrency": -1}),
        ("max_concurrency", {"max_concurrency": 1.5}),
        ("max_concurrency", {"max_concurrency": True}),
        ("timeout_ms", {"timeout_ms": 0}),
        ("timeout_ms", {"timeout_ms": -100}),
        ("timeout_ms", {"timeout_ms": math.nan}),
        ("timeout_ms", {"timeout_ms": math.inf}),
        ("timeout_ms", {"timeout_ms": "1000"}),
        ("Input", {"Input": _MISSING}),
        ("Input", {"Input": {"text": fields.String()}}),
        ("Output", {"Output": _MISSING}),
        ("Output", {"Output": _Out()}),
        ("run", {"run": _MISSING}),
        ("resources", {"resources": {"gpu": "yes"}}),
    ],
)
def test_definition_errors_name_the_class_and_the_field(field: str, changes: dict) -> None:
    with pytest.raises(CapabilityDefinitionError) as info:
        define("BrokenWidget", **changes)

    message = str(info.value)
    assert "BrokenWidget" in message
    assert f".{field}:" in message


def test_the_error_is_raised_by_the_class_statement_itself() -> None:
    with pytest.raises(CapabilityDefinitionError, match=r"NoJobTypes\.job_types"):

        class NoJobTypes(Capability):
            id = "no-job-types"
            Input = _In
            Output = _Out

            def run(self, payload: dict[str, Any], ctx: Context) -> dict[str, Any]:
                return {}


def test_definition_error_is_a_type_error() -> None:
    assert issubclass(CapabilityDefinitionError, TypeError)


def test_abstract_classes_skip_the_checks_and_their_subclasses_do_not() -> None:
    class Base(Capability):
        abstract = True
        job_types = ["shared.type"]
        Input = _In
        Output = _Out

    assert Base.abstract is True

    with pytest.raises(CapabilityDefinitionError, match=r"Concrete\.id"):
        type("Concrete", (Base,), {"run": _run})

    concrete: type[Capability] = type("Concrete", (Base,), {"id": "concrete", "run": _run})
    assert concrete.abstract is False
    assert concrete.job_types == ["shared.type"]


def test_an_abstract_capability_cannot_be_registered() -> None:
    class Base(Capability):
        abstract = True

    with pytest.raises(CapabilityDefinitionError, match="capabilities"):
        Runner("r", capabilities=[Base])


# --------------------------------------------------------------------------- Runner


def test_runner_accepts_classes_and_instances() -> None:
    widget, gadget = define(), define("Gadget", id="gadget")

    runner = Runner("r", capabilities=[widget, gadget()])

    assert sorted(runner.capabilities) == ["gadget", "widget"]
    assert all(isinstance(c, Capability) for c in runner.capabilities.values())


def test_duplicate_ids_in_one_runner_name_both_classes() -> None:
    first, second = define("FirstWidget"), define("SecondWidget")

    with pytest.raises(CapabilityDefinitionError) as info:
        Runner("r", capabilities=[first, second])

    message = str(info.value)
    assert "SecondWidget.id" in message
    assert "FirstWidget" in message
    assert "'widget'" in message


@pytest.mark.parametrize("version", ["1.0", "latest", "", 1])
def test_bad_runner_version_is_a_definition_error(version: Any) -> None:
    with pytest.raises(CapabilityDefinitionError, match=r"Runner\.version"):
        Runner("r", version=version)


@pytest.mark.parametrize("name", ["", "   ", None])
def test_runner_needs_a_name(name: Any) -> None:
    with pytest.raises(CapabilityDefinitionError, match=r"Runner\.name"):
        Runner(name)


def test_non_capability_is_refused() -> None:
    with pytest.raises(CapabilityDefinitionError, match="not a Capability"):
        Runner("r", capabilities=[object()])


# --------------------------------------------------------------------------- input/output


def test_dump_output_names_the_field_of_a_wrong_type() -> None:
    widget = define()()

    with pytest.raises(SchemaMismatch) as info:
        widget.dump_output({"length": "long"})

    assert "length" in info.value.message
    assert info.value.details[0]["path"] == ["data", "length"]
    assert info.value.retryable is False


def test_dump_output_names_a_missing_field() -> None:
    widget = define()()

    with pytest.raises(SchemaMismatch) as info:
        widget.dump_output({})

    assert "length" in info.value.message
    assert ["data", "length"] in [d["path"] for d in info.value.details]


def test_dump_output_refuses_non_objects() -> None:
    with pytest.raises(SchemaMismatch, match="str"):
        define()().dump_output("3")


# ------------------------------------------------ the output check says what outputSchema says


class Shade(enum.Enum):
    DARK = "dark"


class _Point(Schema):
    x = fields.Integer(required=True)


class _Loose(Schema):
    class Meta:
        unknown = INCLUDE

    kept = fields.String()


class _Dropping(Schema):
    class Meta:
        unknown = EXCLUDE

    kept = fields.String()


class _Kinds(Schema):
    """One field of each kind a capability's Output commonly uses."""

    text = fields.String()
    email = fields.Email()
    strict_text = strict.StrictString()
    count = fields.Integer()
    strict_count = strict.StrictInteger()
    ratio = fields.Float()
    amount = strict.StrictNumber()
    price = fields.Decimal(as_string=True)
    flag = fields.Boolean()
    strict_flag = strict.StrictBoolean()
    when = fields.DateTime()
    day = fields.Date()
    stamp = strict.ZDateTime()
    ident = fields.UUID()
    shade = fields.Enum(Shade)
    point = fields.Nested(_Point)
    points = fields.List(fields.Nested(_Point))
    counts = fields.List(fields.Integer())
    scores = fields.Dict(keys=fields.String(), values=fields.Float())
    anything = fields.Raw()
    maybe = fields.Integer(allow_none=True)
    loose = fields.Nested(_Loose)
    dropping = fields.Nested(_Dropping)


def _kinds() -> Capability:
    return define("Kinds", Output=_Kinds)()


@pytest.mark.parametrize(
    ("key", "value", "emitted"),
    [
        ("text", "640", "640"),
        ("email", "a@example.com", "a@example.com"),
        ("strict_text", "s", "s"),
        ("count", 640, 640),
        ("count", 640.0, 640),  # the same JSON number: "type": "integer" accepts it
        ("count", decimal.Decimal("7"), 7),
        ("strict_count", 3, 3),
        ("ratio", 0.5, 0.5),
        ("ratio", 2, 2.0),
        ("amount", 3, 3),
        ("price", decimal.Decimal("1.50"), "1.50"),
        ("flag", False, False),
        ("strict_flag", True, True),
        ("when", datetime.datetime(2026, 1, 2, 3, 4, 5), "2026-01-02T03:04:05"),
        ("day", datetime.date(2026, 1, 2), "2026-01-02"),
        ("stamp", datetime.datetime(2026, 1, 2, tzinfo=datetime.UTC), "2026-01-02T00:00:00.000Z"),
        ("ident", uuid.UUID(int=1), str(uuid.UUID(int=1))),
        ("shade", Shade.DARK, "DARK"),
        ("point", {"x": 1}, {"x": 1}),
        ("point", types.SimpleNamespace(x=2), {"x": 2}),  # an object, as Nested serialises
        ("points", [{"x": 1}, {"x": 2}], [{"x": 1}, {"x": 2}]),
        ("counts", [1, 2], [1, 2]),
        ("scores", {"a": 1.5}, {"a": 1.5}),
        ("anything", {"free": ["form"]}, {"free": ["form"]}),
        ("maybe", None, None),
    ],
)
def test_values_of_the_advertised_type_are_accepted(key: str, value: Any, emitted: Any) -> None:
    assert _kinds().dump_output({key: value}) == {key: emitted}


@pytest.mark.parametrize(
    ("key", "value", "path", "message"),
    [
        ("text", 5, ["text"], "Not a valid string."),
        ("text", b"bytes", ["text"], "Not a valid string."),
        ("email", 5, ["email"], "Not a valid string."),
        ("strict_text", 5, ["strict_text"], "Not a valid string."),
        ("count", "640", ["count"], "Not a valid integer."),
        ("count", 5.5, ["count"], "Not a valid integer."),  # not truncated to 5
        ("count", True, ["count"], "Not a valid integer."),
        ("strict_count", "640", ["strict_count"], "Not a valid integer."),
        ("ratio", "0.5", ["ratio"], "Not a valid number."),
        ("amount", False, ["amount"], "Not a valid number."),
        ("price", "1.50", ["price"], "Not a valid number."),
        ("flag", "true", ["flag"], "Not a valid boolean."),
        ("flag", 1, ["flag"], "Not a valid boolean."),
        ("strict_flag", "false", ["strict_flag"], "Not a valid boolean."),
        ("point", {"x": "1"}, ["point", "x"], "Not a valid integer."),
        ("point", {"x": 1, "y": 2}, ["point", "y"], "Unknown field."),
        ("points", [{"x": 1}, {"x": "2"}], ["points", "1", "x"], "Not a valid integer."),
        ("counts", [1, "2"], ["counts", "1"], "Not a valid integer."),
        ("scores", {"a": "high"}, ["scores", "a"], "Not a valid number."),
        ("undeclared", 1, ["undeclared"], "Unknown field."),
    ],
)
def test_values_of_another_type_and_undeclared_keys_are_schema_mismatch(
    key: str, value: Any, path: list[str], message: str
) -> None:
    with pytest.raises(SchemaMismatch) as info:
        _kinds().dump_output({key: value})

    assert info.value.retryable is False
    assert ".".join(path) in info.value.message
    (detail,) = info.value.details
    assert detail["path"] == ["data", *path]
    assert detail["message"] == message


def test_an_undeclared_keys_value_is_not_echoed() -> None:
    with pytest.raises(SchemaMismatch) as info:
        _kinds().dump_output({"text": "ok", "internal": "s3cr3t-value"})

    assert [d["code"] for d in info.value.details] == ["unknown_field"]
    assert "s3cr3t-value" not in repr(info.value.details) + info.value.message


def test_include_carries_undeclared_keys_and_exclude_drops_them() -> None:
    capability = _kinds()

    data = capability.dump_output(
        {"loose": {"kept": "a", "extra": [1]}, "dropping": {"kept": "b", "extra": 2}}
    )

    assert data == {"loose": {"kept": "a", "extra": [1]}, "dropping": {"kept": "b"}}


@pytest.mark.parametrize(
    ("unknown", "advertised"),
    [(RAISE, False), (INCLUDE, True), (EXCLUDE, None)],
)
@pytest.mark.parametrize("described", [False, True])
def test_the_advertised_schema_says_what_the_check_does_with_undeclared_keys(
    unknown: str, advertised: bool | None, described: bool
) -> None:
    meta: dict[str, Any] = {"unknown": unknown}
    if described:  # apispec alone leaves additionalProperties out of a described schema
        meta["description"] = "described"
    output = type("Output", (Schema,), {"Meta": type("Meta", (), meta), "a": fields.Integer()})
    capability = define("Advertised", Output=output)()
    schema = capability.manifest()["outputSchema"]

    assert schema.get("additionalProperties") == advertised
    accepted = True
    try:
        capability.dump_output({"a": 1, "b": 2})
    except SchemaMismatch:
        accepted = False
    assert accepted is (advertised is not False)


def test_a_number_emitted_as_a_string_is_advertised_as_a_string() -> None:
    schema = _kinds().manifest()["outputSchema"]
    assert schema["properties"]["price"]["type"] == "string"
    assert schema["properties"]["count"]["type"] == "integer"


# --------------------------------------------------------------------------- Context


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _ctx(timeout_ms: float = 1000, clock: Any = time.monotonic) -> Context:
    return Context(
        job_id="j", capability_id="c", correlation_id="k", timeout_ms=timeout_ms, clock=clock
    )


def test_remaining_ms_decreases_and_never_goes_negative() -> None:
    clock = FakeClock()
    ctx = _ctx(1000, clock)

    assert ctx.remaining_ms == pytest.approx(1000)
    clock.now += 0.25
    assert ctx.remaining_ms == pytest.approx(750)
    clock.now += 5
    assert ctx.remaining_ms == 0


def test_remaining_ms_decreases_in_real_time() -> None:
    ctx = _ctx(10_000)
    first = ctx.remaining_ms
    time.sleep(0.02)

    assert ctx.remaining_ms < first
    assert ctx.remaining_ms <= 10_000 - 20


def test_cancelled_turns_true_at_the_deadline() -> None:
    clock = FakeClock()
    ctx = _ctx(1000, clock)

    clock.now += 0.999
    assert ctx.cancelled is False
    clock.now += 0.001
    assert ctx.cancelled is True


def test_cancel_sets_cancelled_before_the_deadline() -> None:
    ctx = _ctx(60_000)
    assert ctx.cancelled is False

    ctx.cancel()

    assert ctx.cancelled is True


def test_wait_returns_early_when_cancelled() -> None:
    ctx = _ctx(60_000)
    threading.Timer(0.05, ctx.cancel).start()

    started = time.monotonic()
    result = ctx.wait(5)

    assert result is True
    assert time.monotonic() - started < 1.0


def test_wait_stops_at_the_deadline() -> None:
    ctx = _ctx(100)

    started = time.monotonic()
    result = ctx.wait(5)

    assert result is True
    assert 0.08 <= time.monotonic() - started < 1.0


def test_wait_sleeps_the_full_time_when_nothing_happens() -> None:
    ctx = _ctx(60_000)

    started = time.monotonic()
    result = ctx.wait(0.05)

    assert result is False
    assert time.monotonic() - started >= 0.045


def test_progress_records_clamped_values_in_order() -> None:
    ctx = _ctx()

    ctx.progress(-5, "before start")
    ctx.progress(42.5, "half-ish")
    ctx.progress(150)
    ctx.progress(100)

    updates = ctx.progress_updates()
    assert [u.percent for u in updates] == [0.0, 42.5, 100.0, 100.0]
    assert [u.message for u in updates] == ["before start", "half-ish", "", ""]
    assert all(isinstance(u.timestamp, float) for u in updates)


@pytest.mark.parametrize(
    ("value", "error"), [(math.nan, ValueError), (True, TypeError), ("5", TypeError)]
)
def test_progress_refuses_non_numbers(value: Any, error: type[Exception]) -> None:
    ctx = _ctx()

    with pytest.raises(error):
        ctx.progress(value)

    assert ctx.progress_updates() == []


def test_progress_updates_is_a_copy() -> None:
    ctx = _ctx()
    ctx.progress(10)

    ctx.progress_updates().clear()

    assert len(ctx.progress_updates()) == 1


def test_context_logger_carries_the_job_ids() -> None:
    ctx = Context(job_id="job-1", capability_id="cap", correlation_id="corr", timeout_ms=1000)

    assert ctx.logger.extra == {"jobId": "job-1", "capabilityId": "cap", "correlationId": "corr"}
    # Not "runnerkit.job": that logger carries exactly one summary line per job.
    assert ctx.logger.logger.name == "runnerkit.capability.cap"


def _run_takes_payload_only(self: Any, payload: dict[str, Any]) -> dict[str, Any]:
    return {}


def _run_takes_keyword_ctx(self: Any, payload: dict[str, Any], *, ctx: Context) -> dict[str, Any]:
    return {}


async def _run_async(self: Any, payload: dict[str, Any], ctx: Context) -> dict[str, Any]:
    return {}


def _run_generator(self: Any, payload: dict[str, Any], ctx: Context) -> Any:
    yield {}


async def _run_async_generator(self: Any, payload: dict[str, Any], ctx: Context) -> Any:
    yield {}


@pytest.mark.parametrize(
    ("run", "says"),
    [
        (_run_takes_payload_only, "expected def run(self, payload, ctx)"),
        (_run_takes_keyword_ctx, "expected def run(self, payload, ctx)"),
        (_run_async, "async def"),
        (_run_generator, "generator"),
        (_run_async_generator, "async def"),
    ],
)
def test_a_run_that_cannot_be_called_as_run_payload_ctx_fails_at_definition(
    run: Any, says: str
) -> None:
    with pytest.raises(CapabilityDefinitionError) as info:
        define("WrongRun", run=run)

    message = str(info.value)
    assert "WrongRun.run:" in message
    assert says in message


def test_run_signatures_that_accept_payload_and_ctx_pass() -> None:
    def with_defaults(self: Any, payload: dict[str, Any], ctx: Any = None, extra: int = 1) -> Any:
        return {}

    def with_star_args(self: Any, *args: Any, **kwargs: Any) -> Any:
        return {}

    for run in (with_defaults, with_star_args):
        assert define("GoodRun", run=run).run is run
