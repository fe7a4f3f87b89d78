"""A runner with one trivial capability, ``echo``: the payload's text back, nothing else.

Everything else is runnerkit's defaults. ``BENCH_ECHO_MAX_CONCURRENCY`` sets the capability's
``max_concurrency`` (default 64, so concurrency slots never limit the HTTP benchmark; the
forge benchmark sets 6, one worker's job allowance: 8 threads less 2 reserved);
``BENCH_ECHO_ISOLATION`` its ``isolation`` (default ``thread``, runnerkit's default).
``BENCH_ECHO_STRIPPED=1`` takes away every step ``bench.ablations`` can remove (ledger, job
thread, job log, metrics, slots, marshmallow): not a runnerkit setting, a measuring stick for
how close to bare Flask runnerkit's remaining pipeline could ever get.
``BENCH_ECHO_WITHOUT=ledger`` (or ``job-thread``, ``slot``, ``validation``, ``log-line``,
``metrics``; comma-separated for several) takes away only that step, for pricing it; with
``RUNNERKIT_SIGNING_SECRET`` set, ``hmac`` or ``replay-record`` takes away that part of the
signature check.

Serve with ``gunicorn -c deploy/gunicorn.conf.py bench.apps.runner_app:app``.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

from marshmallow import Schema, fields

from runnerkit import Capability, Context, Runner
from runnerkit.contracts import fields as strict


class Echo(Capability):
    """Returns the payload's text unchanged."""

    id = "echo"
    version = "1.0.0"
    job_types = ["bench.echo"]
    max_concurrency = int(os.environ.get("BENCH_ECHO_MAX_CONCURRENCY", "64"))
    timeout_ms = 5_000
    isolation = os.environ.get("BENCH_ECHO_ISOLATION", "thread")

    class Input(Schema):
        text = strict.StrictString(required=True)

    class Output(Schema):
        text = fields.String(required=True)

    def run(self, payload: dict[str, Any], ctx: Context) -> dict[str, Any]:
        return {"text": payload["text"]}


runner = Runner("bench-runner", version="1.0.0", capabilities=[Echo()], tags=["bench"])
app = runner.create_app()

if os.environ.get("BENCH_ECHO_STRIPPED") == "1":
    from bench.ablations import everything_off

    # Entered for the life of the process: the stand-ins replace the steps in every worker.
    _STRIPPED = contextlib.ExitStack()
    _STRIPPED.enter_context(everything_off(runner))
elif os.environ.get("BENCH_ECHO_WITHOUT"):
    from bench.ablations import steps

    # One step (or a few, comma-separated) taken away for the life of the process.
    _WITHOUT = contextlib.ExitStack()
    for _step in os.environ["BENCH_ECHO_WITHOUT"].split(","):
        _WITHOUT.enter_context(steps(runner)[_step.strip()]())
