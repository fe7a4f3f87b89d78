"""A runner with one slot for the tests of its asynchronous queue (test_instance_queue.py).

Serve it with ``gunicorn tests.instance.queue_app:app`` from the repository root. Each job of
``one-at-a-time`` (maxConcurrency 1) appends its ``tag`` to the file named by
``QUEUE_APP_STARTS`` as it starts, so the order in which the instance's workers started their
jobs is read from one file; a job with ``hold: true`` then keeps the slot until the file named
by ``QUEUE_APP_RELEASE`` exists (or it is cancelled).
"""

from __future__ import annotations

import os
import time
from typing import Any

from marshmallow import Schema

from runnerkit import Capability, Context, Runner
from runnerkit.contracts import fields as strict


class OneAtATime(Capability):
    id = "one-at-a-time"
    version = "1.0.0"
    description = "Notes that it started, then holds the instance's one slot if asked"
    job_types = ["test.one-at-a-time"]
    max_concurrency = 1
    timeout_ms = 60_000

    class Input(Schema):
        tag = strict.StrictInteger(required=True)
        hold = strict.StrictBoolean(load_default=False)

    class Output(Schema):
        tag = strict.StrictInteger(required=True)

    def run(self, payload: dict[str, Any], ctx: Context) -> dict[str, Any]:
        fd = os.open(os.environ["QUEUE_APP_STARTS"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, f"{payload['tag']}\n".encode())
        finally:
            os.close(fd)
        if payload["hold"]:
            while not ctx.cancelled and not os.path.exists(os.environ["QUEUE_APP_RELEASE"]):
                time.sleep(0.02)
        return {"tag": payload["tag"]}


runner = Runner("queue-runner", version="1.0.0", capabilities=[OneAtATime()])
app = runner.create_app()
