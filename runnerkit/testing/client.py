"""A test client for a runner app that speaks the execution contract (and signs if needed)."""

from __future__ import annotations

import json
from typing import Any

from flask import Flask
from werkzeug.test import TestResponse

from runnerkit.service.signing import sign
from runnerkit.testing.documents import execution_request


class RunnerClient:
    """Wraps Flask's test client: ``execute("text-stats", {"text": "hi"})``.

    When the app has a signing secret, every request is signed with it, as JobForge would.
    """

    def __init__(self, app: Flask) -> None:
        self.app = app
        self.client = app.test_client()
        runner = app.extensions["runnerkit"]
        self.secret: str = runner.settings.signing_secret
        #: Where the runner's routes are mounted (``init_app(app, url_prefix=...)``).
        self.prefix: str = runner.url_prefix

    def execute(
        self,
        capability_id: str,
        payload: dict[str, Any] | None = None,
        *,
        signed: bool = True,
        headers: dict[str, str] | None = None,
        **request: Any,
    ) -> TestResponse:
        """POST one RunnerExecutionRequest; extra keyword arguments go into the request."""
        body = execution_request(capability_id, payload, **request)
        return self.post_raw(json.dumps(body).encode(), signed=signed, headers=headers)

    def post_raw(
        self, raw: bytes, *, signed: bool = True, headers: dict[str, str] | None = None
    ) -> TestResponse:
        """POST bytes to the runner's ``/execute`` as they are (for malformed-request tests)."""
        all_headers = dict(headers or {})
        if signed and self.secret:
            all_headers.update(sign(raw, self.secret))
        return self.client.post(
            f"{self.prefix}/execute", data=raw, headers=all_headers, content_type="application/json"
        )

    def get(self, path: str) -> TestResponse:
        return self.client.get(path)
