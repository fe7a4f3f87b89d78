"""A runner whose capabilities fail with an unexpected exception, one per isolation mode.

``gunicorn tests.observability.crash_app:app``. Each capability's ``run`` calls
``explode_somewhere_deep``, which raises ``ValueError``: a test finds that frame's name in
the job's log line to know the traceback is the capability's own. ``fine`` succeeds.
"""

from __future__ import annotations

from typing import Any

from flask import Flask
from marshmallow import Schema, fields

from runnerkit import Capability, Context, Runner


def explode_somewhere_deep(mode: str) -> None:
    raise ValueError(f"boom in {mode}")


class _Crash(Capability):
    abstract = True
    job_types: list[str] = []
    timeout_ms = 5_000

    class Input(Schema):
        pass

    class Output(Schema):
        never = fields.String()

    def run(self, payload: dict[str, Any], ctx: Context) -> dict[str, Any]:
        explode_somewhere_deep(self.isolation)
        return {}


class CrashThread(_Crash):
    id = "crash-thread"
    job_types = ["crash.thread"]
    isolation = "thread"


class CrashProcess(_Crash):
    id = "crash-process"
    job_types = ["crash.process"]
    isolation = "process"


class CrashInline(_Crash):
    id = "crash-inline"
    job_types = ["crash.inline"]
    isolation = "inline"


class Fine(Capability):
    id = "fine"
    job_types = ["crash.fine"]

    class Input(Schema):
        pass

    class Output(Schema):
        ok = fields.Boolean(required=True)

    def run(self, payload: dict[str, Any], ctx: Context) -> dict[str, Any]:
        return {"ok": True}


runner = Runner(
    "crash-runner",
    version="1.0.0",
    capabilities=[CrashThread(), CrashProcess(), CrashInline(), Fine()],
)
app: Flask = runner.create_app()
