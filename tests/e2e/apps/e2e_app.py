"""A small runner for the end-to-end tests, configured by environment variables.

Serve it with ``gunicorn tests.e2e.apps.e2e_app:app`` from the repository root.

- ``E2E_LABEL``: the runner's label (its name is ``e2e-runner-<label>``);
- ``E2E_CAPS``: comma-separated capability ids this runner offers (default: all of them);
- ``E2E_EXEC_LOG``: a JSON-lines file every capability appends to when it starts and ends
  (``{"event", "job", "cap", "label", "pid", "t", "ok"}``). Runners of one test share it, so
  it is the capabilities' own record of what ran where and when.

Capabilities (each answers ``{"label", "pid", "tag"}`` so a result names where it ran):

=========  ================  ===============  ==================================================
id         job type          maxConcurrency   what it does
=========  ================  ===============  ==================================================
alpha      ``e2e.alpha``     4                returns at once
beta       ``e2e.beta``      4                returns at once
work       ``e2e.work``      2                sleeps ``ms`` (honours cancellation)
solo       ``e2e.solo``      1                sleeps ``ms`` (honours cancellation)
flaky      ``e2e.flaky``     2                fails retryably (RUNTIME_ERROR) while this job has
                                              started fewer than ``fail_times`` times before
strict     ``e2e.strict``    2                requires ``{"n": int 0..10}``; returns at once
=========  ================  ===============  ==================================================
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
from runnerkit.errors import RunnerError

LABEL = os.environ.get("E2E_LABEL", "x")
EXEC_LOG = os.environ.get("E2E_EXEC_LOG", "")


class FlakyFailure(RunnerError):
    """A failure a retry may cure."""

    category = "RUNTIME_ERROR"
    code = "E2E_FLAKY"
    retryable = True


def _append(record: dict[str, Any]) -> None:
    if not EXEC_LOG:
        return
    with open(EXEC_LOG, "a", encoding="utf-8") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        handle.write(json.dumps(record) + "\n")
        handle.flush()


def _starts_before(job_id: str) -> int:
    """How often ``job_id`` has started before (on any runner sharing the log)."""
    if not EXEC_LOG or not os.path.exists(EXEC_LOG):
        return 0
    count = 0
    with open(EXEC_LOG, encoding="utf-8") as handle:
        fcntl.flock(handle, fcntl.LOCK_SH)
        for line in handle:
            record = json.loads(line)
            if record["job"] == job_id and record["event"] == "start":
                count += 1
    return count


class _Result(Schema):
    label = fields.String(required=True)
    pid = fields.Integer(required=True)
    tag = fields.String(required=True)


class _Recorded(Capability):
    """Writes start/end records around ``work``."""

    abstract = True
    Output = _Result

    def run(self, payload: dict[str, Any], ctx: Context) -> dict[str, Any]:
        record = {"job": ctx.job_id, "cap": self.id, "label": LABEL, "pid": os.getpid()}
        _append({**record, "event": "start", "t": time.time()})
        ok = False
        try:
            self.work(payload, ctx)
            ok = True
        finally:
            _append({**record, "event": "end", "t": time.time(), "ok": ok})
        return {"label": LABEL, "pid": os.getpid(), "tag": payload.get("tag", "")}

    def work(self, payload: dict[str, Any], ctx: Context) -> None:
        """Nothing by default."""


class _Quick(Schema):
    tag = strict.StrictString(load_default="")


class _Sleep(Schema):
    ms = strict.StrictInteger(load_default=0, validate=validate.Range(min=0, max=60_000))
    tag = strict.StrictString(load_default="")


class Alpha(_Recorded):
    """Returns at once; only some runners offer it."""

    id = "alpha"
    job_types = ["e2e.alpha"]
    max_concurrency = 4
    Input = _Quick


class Beta(_Recorded):
    """Returns at once; only some runners offer it."""

    id = "beta"
    job_types = ["e2e.beta"]
    max_concurrency = 4
    Input = _Quick


class _Sleeper(_Recorded):
    abstract = True
    Input = _Sleep

    def work(self, payload: dict[str, Any], ctx: Context) -> None:
        ctx.wait(payload["ms"] / 1000.0)


class Work(_Sleeper):
    """Sleeps ``ms`` milliseconds, two at a time."""

    id = "work"
    job_types = ["e2e.work"]
    max_concurrency = 2


class Solo(_Sleeper):
    """Sleeps ``ms`` milliseconds, one at a time."""

    id = "solo"
    job_types = ["e2e.solo"]
    max_concurrency = 1


class Flaky(_Recorded):
    """Fails retryably until the job has started ``fail_times`` times before."""

    id = "flaky"
    job_types = ["e2e.flaky"]
    max_concurrency = 2

    class Input(Schema):
        fail_times = strict.StrictInteger(required=True, validate=validate.Range(min=0))
        tag = strict.StrictString(load_default="")

    def work(self, payload: dict[str, Any], ctx: Context) -> None:
        # This run's own start record is already in the log, hence the "- 1".
        before = _starts_before(ctx.job_id) - 1
        if before < payload["fail_times"]:
            raise FlakyFailure(f"failure {before + 1} of {payload['fail_times']}")


class Strict(_Recorded):
    """Returns at once, for a payload with a small integer ``n``."""

    id = "strict"
    job_types = ["e2e.strict"]
    max_concurrency = 2

    class Input(Schema):
        n = strict.StrictInteger(required=True, validate=validate.Range(min=0, max=10))
        tag = strict.StrictString(load_default="")


ALL = {c.id: c for c in (Alpha, Beta, Work, Solo, Flaky, Strict)}
_wanted = [c.strip() for c in os.environ.get("E2E_CAPS", ",".join(ALL)).split(",") if c.strip()]

runner = Runner(
    f"e2e-runner-{LABEL}",
    version="1.0.0",
    capabilities=[ALL[c]() for c in _wanted],
    tags=["e2e", LABEL],
)
app = runner.create_app()
