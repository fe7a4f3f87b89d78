"""The baseline: a bare Flask route doing the same JSON echo as the runner's trivial capability.

It parses the same RunnerExecutionRequest body and answers the same shape of response
(``jobId``, ``success``, ``executionTimeMs``, ``runnerId``, ``data``), with none of runnerkit's
work: no validation, ledger, job thread, concurrency slots, metrics or job log.

Serve with ``gunicorn -c deploy/gunicorn.conf.py bench.apps.flask_app:app``.
"""

from __future__ import annotations

import time
from typing import Any

from flask import Flask, jsonify, request

RUNNER_ID = "00000000-0000-4000-8000-000000000000"

app = Flask("bench-bare-flask")
app.json.sort_keys = False  # type: ignore[attr-defined]


@app.post("/execute")
def execute() -> Any:
    started = time.monotonic()
    body = request.get_json(force=True)
    return jsonify(
        {
            "jobId": body["jobId"],
            "success": True,
            "executionTimeMs": round((time.monotonic() - started) * 1000.0, 3),
            "runnerId": RUNNER_ID,
            "data": {"text": body["payload"]["text"]},
        }
    )


@app.get("/health/live")
def live() -> Any:
    return jsonify({"status": "healthy"})
