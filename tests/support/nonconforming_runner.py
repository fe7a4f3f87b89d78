"""A runner that breaks the contracts on purpose, in plain Flask (no runnerkit), for the
conformance suite's tests.

It is what a hurried team might write from the guide: it works for the happy path, but its
answers carry ``runnerId: "unknown"``, invalid JSON gets Flask's HTML 500, ``"5"`` is coerced
to 5, an unknown capability is called a validation error, a redelivered job runs again, and
its health document is not a HealthCheck. A few things it gets right (a missing ``jobId`` is
refused with a proper envelope), so the suite is seen to tell the two apart.

``NONCONFORMING_HEALTH_DELAY_S`` makes ``/health`` answer that many seconds late.

With ``NONCONFORMING_FORGE_URL`` it also talks to a forge as the guide's runner does: it
registers (its ``healthCheckEndpoint`` is ``NONCONFORMING_HEALTH_URL``) and then heartbeats
every ``NONCONFORMING_HEARTBEAT_S`` seconds as ``runnerId: "unknown"``, never keeping the id
or the ``runnerToken`` the forge answered with.
"""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.request
import uuid
from datetime import UTC, datetime
from typing import Any

from flask import Flask, Response, request

app = Flask(__name__)

#: Its registration document, as the team wrote it (what ``--manifest`` reads).
MANIFEST: dict[str, Any] = {
    "name": "nonconforming-runner",
    "version": "0.1.0",
    "contractVersion": {"major": 1, "minor": 0, "patch": 0},
    "capabilities": [
        {
            "id": "add",
            "name": "add",
            "version": "1.0.0",
            "description": "Adds two integers",
            "inputSchema": {
                "type": "object",
                "properties": {
                    "a": {"type": "integer", "minimum": 0},
                    "b": {"type": "integer", "minimum": 0},
                },
                "required": ["a", "b"],
            },
            "outputSchema": {
                "type": "object",
                "properties": {"sum": {"type": "integer"}, "run": {"type": "integer"}},
                "required": ["sum"],
            },
            "supportedJobTypes": ["math.add"],
            "maxConcurrency": 1,
            "timeoutMs": 5000,
        }
    ],
    "healthCheckEndpoint": "http://127.0.0.1:3000/health",
}

_runs = 0


def _envelope(category: str, message: str) -> dict[str, Any]:
    return {
        "id": str(uuid.uuid4()),
        "timestamp": _now(),
        "category": category,
        "severity": "error",
        "code": category,
        "message": message,
        "service": "nonconforming-runner",
        "retryable": False,
        "contractVersion": {"major": 1, "minor": 0, "patch": 0},
    }


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _post(url: str, body: dict[str, Any]) -> None:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as answer:
            answer.read()
    except OSError:  # refused (HTTPError included) or unreachable: it carries on regardless
        pass


def _talk_to_forge(forge_url: str) -> None:
    """Register once, then heartbeat as "unknown" for as long as the process lives."""
    manifest = {**MANIFEST, "healthCheckEndpoint": os.environ["NONCONFORMING_HEALTH_URL"]}
    _post(f"{forge_url}/runners/register", manifest)
    every = float(os.environ.get("NONCONFORMING_HEARTBEAT_S", "1"))
    while True:
        beat = {"runnerId": "unknown", "timestamp": _now(), "status": "healthy", "activeJobs": 0}
        _post(f"{forge_url}/runners/heartbeat", beat)
        time.sleep(every)


if os.environ.get("NONCONFORMING_FORGE_URL"):
    threading.Thread(
        target=_talk_to_forge, args=(os.environ["NONCONFORMING_FORGE_URL"],), daemon=True
    ).start()


def _json(status: int, body: dict[str, Any]) -> Response:
    return Response(json.dumps(body), status=status, mimetype="application/json")


@app.get("/health")
def health() -> Response:
    time.sleep(float(os.environ.get("NONCONFORMING_HEALTH_DELAY_S", "0")))
    return _json(200, {"status": "ok", "uptime": 12})


@app.post("/execute")
def execute() -> Response:
    global _runs
    started = time.monotonic()
    body = json.loads(request.get_data())  # invalid JSON: an HTML 500 from Flask
    if "jobId" not in body:
        return _json(400, {"success": False, "error": _envelope("VALIDATION_ERROR", "no jobId")})
    if body.get("capabilityId") != "add":
        return _json(400, {"success": False, "error": _envelope("VALIDATION_ERROR", "unknown")})
    float(body.get("timeoutMs", 30000))  # "5000" is taken as 5000
    payload = body["payload"]
    if "a" not in payload or "b" not in payload:
        return _json(
            400,
            {
                "jobId": body["jobId"],
                "success": False,
                "error": _envelope("VALIDATION_ERROR", "a and b are required"),
                "executionTimeMs": 0,
                "runnerId": "unknown",
            },
        )
    _runs += 1
    return _json(
        200,
        {
            "jobId": body["jobId"],
            "success": True,
            "data": {"sum": int(payload["a"]) + int(payload["b"]), "run": _runs},
            "executionTimeMs": (time.monotonic() - started) * 1000,
            "runnerId": "unknown",
        },
    )
