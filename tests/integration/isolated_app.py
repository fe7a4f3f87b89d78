"""A runner whose capabilities run with ``isolation = "process"``, for the isolation tests.

Serve it with ``gunicorn tests.integration.isolated_app:app`` from the repository root;
the in-process tests build their own Runner from ``CAPABILITIES``.

==========  ==============  ====================================================================
id          timeout         what it does
==========  ==============  ====================================================================
where       5 s             reports progress, answers the pids it ran in (its own, its parent's)
stubborn    400 ms          writes its pid and a ``sleep`` child's pid to ``payload.pidFile``,
                            then sleeps 30 s ignoring ``ctx.cancelled``; maxConcurrency 1
failing     5 s             ``payload.how``: ``runner-error`` raises a RunnerError with a code and
                            details; ``unpicklable`` an exception pickle cannot carry; ``exit``
                            leaves with ``os._exit(3)``; ``kill`` SIGKILLs itself
==========  ==============  ====================================================================
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from marshmallow import Schema, fields

from runnerkit import Capability, Context, Runner, ValidationFailed
from runnerkit.contracts import fields as strict


class Where(Capability):
    """Answers the process it ran in."""

    id = "where"
    job_types = ["isolated.where"]
    max_concurrency = 2
    timeout_ms = 5_000
    isolation = "process"

    class Input(Schema):
        note = strict.StrictString()

    class Output(Schema):
        pid = fields.Integer(required=True)
        parentPid = fields.Integer(required=True)

    def run(self, payload: dict[str, Any], ctx: Context) -> dict[str, Any]:
        ctx.progress(50, "halfway")
        return {"pid": os.getpid(), "parentPid": os.getppid()}


class Stubborn(Capability):
    """Ignores its deadline, and starts a process of its own that would outlive it."""

    id = "stubborn"
    job_types = ["isolated.stubborn"]
    max_concurrency = 1
    timeout_ms = 400
    isolation = "process"

    class Input(Schema):
        pidFile = strict.StrictString(required=True)

    class Output(Schema):
        done = fields.Boolean(required=True)

    def run(self, payload: dict[str, Any], ctx: Context) -> dict[str, Any]:
        sleeper = subprocess.Popen(["sleep", "30"])
        with open(payload["pidFile"], "w", encoding="utf-8") as pids:
            pids.write(f"{os.getpid()} {sleeper.pid}\n")
        time.sleep(30)  # no look at ctx.cancelled: only a kill stops this
        return {"done": True}


class _Unpicklable(Exception):
    def __init__(self, reason: str, extra: int) -> None:
        super().__init__(reason)
        self.extra = extra

    def __reduce__(self) -> Any:
        raise TypeError("not today")


class Failing(Capability):
    """Fails in the way ``payload.how`` names."""

    id = "failing"
    job_types = ["isolated.failing"]
    max_concurrency = 2
    timeout_ms = 5_000
    isolation = "process"

    class Input(Schema):
        how = strict.StrictString(required=True)

    class Output(Schema):
        never = fields.String(required=True)

    def run(self, payload: dict[str, Any], ctx: Context) -> dict[str, Any]:
        how = payload["how"]
        if how == "runner-error":
            raise ValidationFailed(
                "the text is too short",
                code="TEXT_TOO_SHORT",
                details=[{"message": "at least 3 characters", "path": ["payload", "text"]}],
            )
        if how == "unpicklable":
            raise _Unpicklable("cannot travel", 7)
        if how == "exit":
            os._exit(3)
        if how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        return {"never": how}


def stubborn_pids(pid_file: str | os.PathLike[str], timeout: float = 10.0) -> list[int]:
    """The pids a ``stubborn`` job wrote (its process, its ``sleep``), once it has."""
    path = Path(pid_file)
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.read_text().endswith("\n")):
        if time.monotonic() > deadline:
            raise AssertionError(f"no stubborn job wrote {path} within {timeout} s")
        time.sleep(0.02)
    return [int(p) for p in path.read_text().split()]


CAPABILITIES = [Where(), Stubborn(), Failing()]

runner = Runner("isolated-runner", version="1.0.0", capabilities=CAPABILITIES)
app = runner.create_app()
