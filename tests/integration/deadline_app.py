"""A runner whose capability ignores its deadline on a thread (``isolation = "thread"``), for
the tests of answers sent at the deadline while the code runs on.

Serve it with ``gunicorn tests.integration.deadline_app:app`` from the repository root.

=======  =======  ==========================================================================
id       timeout  what it does
=======  =======  ==========================================================================
sleepy   300 ms   sleeps ``payload.ms`` milliseconds without a look at ``ctx.cancelled``;
                  maxConcurrency 1 for the instance
=======  =======  ==========================================================================
"""

from __future__ import annotations

import time
from typing import Any

from marshmallow import Schema, fields

from runnerkit import Capability, Context, Runner
from runnerkit.contracts import fields as strict


class Sleepy(Capability):
    """Sleeps as long as it is told, past its deadline too."""

    id = "sleepy"
    job_types = ["deadline.sleepy"]
    max_concurrency = 1
    timeout_ms = 300

    class Input(Schema):
        ms = strict.StrictInteger(required=True)

    class Output(Schema):
        slept = fields.Integer(required=True)

    def run(self, payload: dict[str, Any], ctx: Context) -> dict[str, Any]:
        time.sleep(payload["ms"] / 1000.0)  # no look at ctx.cancelled
        return {"slept": payload["ms"]}


runner = Runner("deadline-runner", version="1.0.0", capabilities=[Sleepy()])
app = runner.create_app()
