"""The Capability base class a runner author subclasses, and the Context a job runs with."""

from __future__ import annotations

import copy
import functools
import inspect
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar

from marshmallow import Schema, ValidationError

from runnerkit.contracts import SEMVER_RE
from runnerkit.contracts.json_schema import json_schema
from runnerkit.errors import SchemaMismatch, details_from_validation_error
from runnerkit.runner.isolation import MODES
from runnerkit.runner.outputs import OutputCheck
from runnerkit.runner.plain_schemas import PlainLoader, plain_loader

ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")


class CapabilityDefinitionError(TypeError):
    """A Capability subclass is declared wrongly; raised when the class is defined."""


class Progress:
    """One ``ctx.progress`` call, kept until it can be reported."""

    __slots__ = ("message", "percent", "timestamp")

    def __init__(self, percent: float, message: str, timestamp: float) -> None:
        self.percent = percent
        self.message = message
        self.timestamp = timestamp


class _JobLogger(logging.LoggerAdapter[logging.Logger]):
    """Adds the job's ids to every record, keeping the caller's own ``extra=`` fields.

    (A plain LoggerAdapter replaces them before Python 3.13.)
    """

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        kwargs["extra"] = {**(self.extra or {}), **(kwargs.get("extra") or {})}
        return msg, kwargs


class Context:
    """What a running job may know and do: its identity, its deadline, cancellation, progress.

    Python cannot stop a thread from outside, so a long capability should look at
    ``ctx.cancelled`` (or sleep with ``ctx.wait``) and return early once its deadline passes or
    the job is cancelled; the runner answers the caller at the deadline either way.
    """

    def __init__(
        self,
        *,
        job_id: str,
        capability_id: str,
        correlation_id: str,
        timeout_ms: float,
        logger: logging.Logger | None = None,
        clock: Any = time.monotonic,
        on_progress: Callable[[Progress], None] | None = None,
    ) -> None:
        self.job_id = job_id
        self.capability_id = capability_id
        self.correlation_id = correlation_id
        self.timeout_ms = timeout_ms
        self._clock = clock
        self._started = clock()
        self._deadline_mono = self._started + timeout_ms / 1000.0
        self._created_wall = time.time()
        self._cancel = threading.Event()
        self._lock = threading.Lock()
        self._progress: list[Progress] = []
        self._on_progress = on_progress
        self._base_logger = logger

    @functools.cached_property
    def deadline(self) -> datetime:
        """The wall-clock deadline (UTC), for messages and for passing on to other services."""
        return datetime.fromtimestamp(self._created_wall, UTC) + timedelta(
            milliseconds=self.timeout_ms
        )

    @functools.cached_property
    def logger(self) -> _JobLogger:
        """A logger whose records carry this job's ids (made when a job first logs)."""
        base = self._base_logger or logging.getLogger(f"runnerkit.capability.{self.capability_id}")
        return _JobLogger(
            base,
            {
                "jobId": self.job_id,
                "capabilityId": self.capability_id,
                "correlationId": self.correlation_id,
            },
        )

    @property
    def deadline_monotonic(self) -> float:
        """The deadline on the ``time.monotonic`` clock."""
        return float(self._deadline_mono)

    @property
    def remaining_ms(self) -> float:
        """Milliseconds left before the deadline (never negative)."""
        return max(0.0, (self._deadline_mono - self._clock()) * 1000.0)

    @property
    def cancelled(self) -> bool:
        """True once the job was cancelled or its deadline has passed."""
        return self._cancel.is_set() or self._clock() >= self._deadline_mono

    def cancel(self) -> None:
        """Ask the capability to stop; it sees ``cancelled`` turn true."""
        self._cancel.set()

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``, waking early on cancellation; returns ``cancelled``."""
        remaining = self.remaining_ms / 1000.0
        self._cancel.wait(max(0.0, min(seconds, remaining)))
        return self.cancelled

    def progress(self, percent: float, message: str = "") -> None:
        """Record progress now; the runner reports it later (best effort)."""
        if isinstance(percent, bool) or not isinstance(percent, int | float):
            raise TypeError("percent must be a number")
        if math.isnan(percent):
            raise ValueError("percent must be a number from 0 to 100")
        value = min(100.0, max(0.0, float(percent)))
        update = Progress(value, str(message), time.time())
        with self._lock:
            self._progress.append(update)
        if self._on_progress is not None:
            try:
                self._on_progress(update)
            except Exception:
                self.logger.warning("could not record progress", exc_info=True)

    def for_child(self, on_progress: Callable[[Progress], None]) -> Context:
        """This context in a forked child (process isolation): same job and deadline, fresh
        locks (another thread may have held these at the fork), progress to ``on_progress``.
        """
        child = copy.copy(self)
        child._lock = threading.Lock()
        child._cancel = threading.Event()
        if self._cancel.is_set():
            child._cancel.set()
        child._progress = []
        child._on_progress = on_progress
        return child

    def progress_updates(self) -> list[Progress]:
        """Every progress update recorded so far, oldest first."""
        with self._lock:
            return list(self._progress)


class Capability:
    """One thing a runner can do. Subclass it, set the class attributes, implement ``run``.

    The class is checked when it is defined, so a mistake fails at import with the class and
    field named, not at the first job. Set ``abstract = True`` on an intermediate base class.
    """

    abstract: ClassVar[bool] = True
    id: ClassVar[str]
    name: ClassVar[str] = ""
    version: ClassVar[str] = "1.0.0"
    description: ClassVar[str] = ""
    job_types: ClassVar[list[str]] = []
    max_concurrency: ClassVar[int] = 1
    timeout_ms: ClassVar[float] = 30_000
    resources: ClassVar[dict[str, Any]] = {}
    #: Where ``run`` runs. ``"thread"`` (default): on a job thread of the worker, so the
    #: caller is answered ``TIMEOUT`` at the deadline; code that overruns keeps its slot until
    #: it returns. ``"process"``: in a child process forked from the worker, killed at the
    #: deadline (:mod:`runnerkit.isolation`). ``"inline"``: on the request's own thread, for
    #: quick code that never blocks: no thread hand-off (about 0.1 ms less per job under
    #: gunicorn), but no answer before the code returns (a late one is still ``TIMEOUT``).
    isolation: ClassVar[str] = "thread"
    #: ``[{"input": {...}, "output": {...}}]``: checked by ``runnerkit validate`` (output optional).
    examples: ClassVar[list[dict[str, Any]]] = []
    Input: ClassVar[type[Schema]]
    Output: ClassVar[type[Schema]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("abstract", False):
            return
        cls.abstract = False
        _check_definition(cls)
        if not cls.name:
            cls.name = cls.id
        if not cls.description:
            doc = (cls.__doc__ or "").strip().splitlines()
            cls.description = doc[0] if doc else cls.name
        cls._input_schema = cls.Input()
        cls._output_schema = cls.Output()
        cls._output_check = OutputCheck.of(cls._output_schema)
        cls._plain = (plain_loader(cls._input_schema), plain_loader(cls._output_schema))

    _input_schema: ClassVar[Schema]
    _output_schema: ClassVar[Schema]
    _output_check: ClassVar[OutputCheck]
    #: ``Input``'s and ``Output``'s quicker loads of plain values, for plain schemas
    #: (:mod:`.plain_schemas`): a tuple, so neither is bound as a method.
    _plain: ClassVar[tuple[PlainLoader | None, PlainLoader | None]]

    def run(self, payload: dict[str, Any], ctx: Context) -> Mapping[str, Any]:
        """Do the work. ``payload`` has passed ``Input``; the result must pass ``Output``."""
        raise NotImplementedError

    def load_input(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        """Validate and load a job's payload; raises marshmallow's ValidationError."""
        plain_input = self._plain[0]
        if plain_input is not None:
            plain = plain_input(payload)
            if plain is not None:
                return plain
        loaded: dict[str, Any] = self._input_schema.load(payload)
        return loaded

    def dump_output(self, result: Any) -> dict[str, Any]:
        """Serialise ``run``'s result through ``Output`` and check it.

        The check says what the advertised ``outputSchema`` says (:mod:`runnerkit.outputs`):
        a key ``Output`` does not declare, or a value of the wrong JSON type for a stock
        field (``"640"`` for an ``Integer``), is refused rather than dropped or coerced. A
        result that ``Output`` rejects is the capability's bug: a non-retryable
        ``SCHEMA_MISMATCH`` naming the fields.
        """
        if not isinstance(result, Mapping):
            raise SchemaMismatch(
                f"{type(self).__name__}.run returned {type(result).__name__}, "
                "expected an object matching Output",
                details=[{"message": "Not an object", "path": ["data"]}],
            )
        problems = self._output_check.problems(result)
        if problems:
            raise self._mismatch(ValidationError(problems), result)
        try:
            data: dict[str, Any] = self._output_schema.dump(result)
            plain_output = self._plain[1]
            if plain_output is None or plain_output(data) is None:
                self._output_schema.load(data)
        except ValidationError as exc:
            raise self._mismatch(exc, data) from exc
        except (TypeError, ValueError, AttributeError, ArithmeticError) as exc:
            # Not str(exc): Python quotes the value there ("invalid literal for int() with
            # base 10: 's3cr3t'"), and this envelope travels to JobForge, TruthCore and logs.
            found = _unserialisable_field(self._output_schema, result)
            field, kind, value = found if found else (None, "", None)
            path = ["data", field] if field else ["data"]
            what = f"a {type(value).__name__} value" if found else "the result"
            problem = f"{kind or 'Output'} cannot serialise {what} ({type(exc).__name__})"
            raise SchemaMismatch(
                f"{type(self).__name__}.run returned a value Output cannot serialise: "
                f"{field or 'data'}",
                details=[{"message": problem, "path": path}],
            ) from exc
        if self._output_check.carries:
            self._output_check.carry(result, data)
        return data

    def _mismatch(self, exc: ValidationError, data: Any) -> SchemaMismatch:
        details = details_from_validation_error(exc, prefix=("data",), data=data)
        for detail in details:
            if detail.get("code") == "unknown_field":
                # A key Output does not declare holds what the author never meant to send.
                detail.pop("value", None)
        fields = ", ".join(".".join(d.get("path", [])[1:]) or "data" for d in details)
        return SchemaMismatch(
            f"{type(self).__name__}.run returned a value its Output schema rejects: {fields}",
            details=details,
        )

    @classmethod
    def manifest(cls) -> dict[str, Any]:
        """This capability as a contract RunnerCapability, schemas as JSON Schema."""
        resources = {"gpu": False, **cls.resources}
        return {
            "id": cls.id,
            "name": cls.name,
            "version": cls.version,
            "description": cls.description,
            "inputSchema": json_schema(cls.Input),
            "outputSchema": json_schema(cls.Output),
            "supportedJobTypes": list(cls.job_types),
            "maxConcurrency": cls.max_concurrency,
            "timeoutMs": cls.timeout_ms,
            "resourceRequirements": resources,
        }


def _unserialisable_field(schema: Schema, result: Any) -> tuple[str, str, Any] | None:
    """The first Output field whose value cannot be serialised: (name, field class, value).

    ``Schema.dump`` raises the bare ``ValueError``/``TypeError`` of the failing field (e.g.
    ``int("many")``) without saying which field it was.
    """
    for attr, field in schema.dump_fields.items():
        try:
            field.serialize(attr, result, accessor=schema.get_attribute)
        except (TypeError, ValueError, AttributeError, ArithmeticError):
            value = schema.get_attribute(result, attr, None)
            return field.data_key or attr, type(field).__name__, value
    return None


def _check_definition(cls: type[Capability]) -> None:
    """Fail at class definition with the class and field named."""

    def fail(field: str, problem: str) -> CapabilityDefinitionError:
        return CapabilityDefinitionError(f"{cls.__qualname__}.{field}: {problem}")

    ident = getattr(cls, "id", None)
    if not isinstance(ident, str) or not ident:
        raise fail("id", "is required (a non-empty string such as 'text-stats')")
    if not ID_RE.match(ident):
        raise fail("id", f"{ident!r} must be letters, digits, '.', '_', ':' or '-'")
    if not isinstance(cls.version, str) or not SEMVER_RE.fullmatch(cls.version):
        raise fail("version", f"{cls.version!r} is not a semantic version like '1.0.0'")
    if not isinstance(cls.name, str):
        raise fail("name", "must be a string")
    if not isinstance(cls.description, str):
        raise fail("description", "must be a string")
    types = cls.job_types
    if isinstance(types, str) or not isinstance(types, list | tuple) or not types:
        raise fail("job_types", "must be a non-empty list of job type strings")
    if not all(isinstance(t, str) and t for t in types):
        raise fail("job_types", "every job type must be a non-empty string")
    if len(set(types)) != len(types):
        raise fail("job_types", "lists a job type twice")
    mc = cls.max_concurrency
    if isinstance(mc, bool) or not isinstance(mc, int) or mc <= 0:
        raise fail("max_concurrency", f"{mc!r} must be a positive integer")
    tm = cls.timeout_ms
    if isinstance(tm, bool) or not isinstance(tm, int | float) or not math.isfinite(tm) or tm <= 0:
        raise fail("timeout_ms", f"{tm!r} must be a positive number of milliseconds")
    if cls.isolation not in MODES:
        raise fail("isolation", f"{cls.isolation!r} must be one of {', '.join(MODES)}")
    res = cls.resources
    if not isinstance(res, Mapping):
        raise fail("resources", "must be a dict with optional 'cpu', 'memory' and 'gpu'")
    for key in ("cpu", "memory"):
        if key in res and not isinstance(res[key], str):
            raise fail("resources", f"'{key}' must be a string such as '500m' or '256Mi'")
    if "gpu" in res and not isinstance(res["gpu"], bool):
        raise fail("resources", "'gpu' must be true or false")
    for field in ("Input", "Output"):
        schema = getattr(cls, field, None)
        if not (isinstance(schema, type) and issubclass(schema, Schema)):
            raise fail(field, "must be a nested marshmallow Schema class")
    if cls.run is Capability.run:
        raise fail("run", "must be implemented: def run(self, payload, ctx)")
    _check_run(cls.run, fail)


def _check_run(run: Any, fail: Callable[[str, str], CapabilityDefinitionError]) -> None:
    """``run`` is called as ``run(payload, ctx)`` on a job thread and must return the result.

    A coroutine or generator function would "return" an un-run coroutine or generator, and a
    signature that cannot take ``(payload, ctx)`` would fail every job with a TypeError: both
    are caught here, when the class is defined, not on the first job.
    """
    if inspect.iscoroutinefunction(run) or inspect.isasyncgenfunction(run):
        raise fail(
            "run",
            "is 'async def': runnerkit runs capabilities on threads and does not await them; "
            "write a plain 'def run(self, payload, ctx)' (call asyncio.run inside if needed)",
        )
    if inspect.isgeneratorfunction(run):
        raise fail(
            "run",
            "is a generator (it uses 'yield'): it must return its result, "
            "not yield it; report progress with ctx.progress(percent, message)",
        )
    try:
        signature = inspect.signature(run)
    except (TypeError, ValueError):  # a builtin or C callable: nothing to check
        return
    try:
        signature.bind(object(), {}, object())
    except TypeError:
        raise fail(
            "run",
            f"has the signature {signature}; expected def run(self, payload, ctx)",
        ) from None
