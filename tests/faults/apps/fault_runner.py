"""A runner for the fault-injection suite: many sleeping slots, and a capability that overruns.

Served with ``gunicorn tests.faults.apps.fault_runner:app`` by the e2e harness (the faults
conftest points a stack's runners at this module instead of ``tests/e2e/apps/e2e_app.py``).
It reads the same environment (``E2E_LABEL``, ``E2E_CAPS``, ``E2E_EXEC_LOG``) and appends the
same JSON-lines start/end records, so ``Stack.executions`` reads both apps alike. End records
also carry ``cut``: the capability's deadline had passed (or the job was cancelled) by the time
its code returned, i.e. that execution did *not* produce the answer the caller got.

=========  =================  ================================  ================================
id         job type           maxConcurrency                    what it does
=========  =================  ================================  ================================
nap        ``fault.nap``      ``FAULT_NAP_SLOTS`` (default 8)   sleeps ``ms`` with ``ctx.wait``:
                                                                stops at its deadline
stubborn   ``fault.stubborn`` 2                                 sleeps ``ms`` with ``time.sleep``:
                                                                ignores its deadline entirely
=========  =================  ================================  ================================
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from typing import Any

from marshmallow import Schema, fields, validate

from runnerkit import Capability, Context, Runner
from runnerkit.contracts import fields as strict

LABEL = os.environ.get("E2E_LABEL", "x")
EXEC_LOG = os.environ.get("E2E_EXEC_LOG", "")
NAP_SLOTS = int(os.environ.get("FAULT_NAP_SLOTS", "8"))


def _append(record: dict[str, Any]) -> None:
    if not EXEC_LOG:
        return
    with open(EXEC_LOG, "a", encoding="utf-8") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        handle.write(json.dumps(record) + "\n")
        handle.flush()


class _Result(Schema):
    label = fields.String(required=True)
    pid = fields.Integer(required=True)
    tag = fields.String(required=True)


class _Sleep(Schema):
    ms = strict.StrictInteger(load_default=0, validate=validate.Range(min=0, max=60_000))
    tag = strict.StrictString(load_default="")


class _Recorded(Capability):
    """Writes start/end records around ``sleep``."""

    abstract = True
    Input = _Sleep
    Output = _Result

    def run(self, payload: dict[str, Any], ctx: Context) -> dict[str, Any]:
        record = {"job": ctx.job_id, "cap": self.id, "label": LABEL, "pid": os.getpid()}
        _append({**record, "event": "start", "t": time.time()})
        ok = False
        try:
            self.sleep(payload["ms"] / 1000.0, ctx)
            ok = True
        finally:
            end = {"event": "end", "t": time.time(), "ok": ok, "cut": ctx.cancelled}
            _append({**record, **end})
        return {"label": LABEL, "pid": os.getpid(), "tag": payload["tag"]}

    def sleep(self, seconds: float, ctx: Context) -> None:
        raise NotImplementedError


class Nap(_Recorded):
    """Sleeps ``ms`` milliseconds, waking at its deadline or on cancellation."""

    id = "nap"
    job_types = ["fault.nap"]
    max_concurrency = NAP_SLOTS

    def sleep(self, seconds: float, ctx: Context) -> None:
        ctx.wait(seconds)


class Stubborn(_Recorded):
    """Sleeps ``ms`` milliseconds whatever its deadline says (code that cannot be stopped)."""

    id = "stubborn"
    job_types = ["fault.stubborn"]
    max_concurrency = 2

    def sleep(self, seconds: float, ctx: Context) -> None:
        time.sleep(seconds)


ALL = {c.id: c for c in (Nap, Stubborn)}
_wanted = [c.strip() for c in os.environ.get("E2E_CAPS", ",".join(ALL)).split(",") if c.strip()]

runner = Runner(
    f"fault-runner-{LABEL}",
    version="1.0.0",
    capabilities=[ALL[c]() for c in _wanted],
    tags=["faults", LABEL],
)
app = runner.create_app()
