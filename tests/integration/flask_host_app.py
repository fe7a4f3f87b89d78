"""A host's own Flask app that mounts a runner with ``init_app(app, url_prefix="/runner")``.

Serve it with ``gunicorn 'tests.integration.flask_host_app:make_host_app()'`` from the
repository root; the in-process tests call :func:`make_host_app` with their own config.

The host keeps its own routes (``/mine`` answers 403 with Flask's own page, ``/broken``
raises, ``/upload`` takes any body, ``/settings`` shows the app config runnerkit must leave
alone). The capabilities read ``current_app.config[payload.key]`` as capability code using a
Flask extension would, one per isolation mode, and log through ``ctx.logger``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from flask import Flask, abort, current_app, jsonify, request
from marshmallow import Schema, fields

from runnerkit import Capability, Context, Runner
from runnerkit.contracts import fields as strict

#: The host's own setting the capabilities read through ``current_app``.
GREETING = "hello from the host's config"


class _ConfigInput(Schema):
    key = strict.StrictString(required=True)


class _ConfigOutput(Schema):
    value = fields.String(required=True)
    pid = fields.Integer(required=True)


def _read_config(payload: dict[str, Any], ctx: Context) -> dict[str, Any]:
    ctx.logger.info("reading the app's %s", payload["key"])
    return {"value": str(current_app.config[payload["key"]]), "pid": os.getpid()}


class ConfigOnThread(Capability):
    """Reads the app's config on the default job thread."""

    id = "config-thread"
    job_types = ["flask.config.thread"]
    max_concurrency = 4
    timeout_ms = 10_000
    Input = _ConfigInput
    Output = _ConfigOutput

    def run(self, payload: dict[str, Any], ctx: Context) -> dict[str, Any]:
        return _read_config(payload, ctx)


class ConfigInChild(Capability):
    """Reads the app's config in a forked child (``isolation = "process"``)."""

    id = "config-process"
    job_types = ["flask.config.process"]
    max_concurrency = 2
    timeout_ms = 10_000
    isolation = "process"
    Input = _ConfigInput
    Output = _ConfigOutput

    def run(self, payload: dict[str, Any], ctx: Context) -> dict[str, Any]:
        return _read_config(payload, ctx)


class ConfigInline(Capability):
    """Reads the app's config on the request's own thread (``isolation = "inline"``)."""

    id = "config-inline"
    job_types = ["flask.config.inline"]
    max_concurrency = 2
    timeout_ms = 10_000
    isolation = "inline"
    Input = _ConfigInput
    Output = _ConfigOutput

    def run(self, payload: dict[str, Any], ctx: Context) -> dict[str, Any]:
        return _read_config(payload, ctx)


CAPABILITIES: list[Capability] = [ConfigOnThread(), ConfigInChild(), ConfigInline()]

PREFIX = "/runner"


def make_host_app(config: Mapping[str, Any] | None = None, url_prefix: str = PREFIX) -> Flask:
    """The host's app with its own routes, and a runner mounted under ``url_prefix``."""
    app = Flask("flask-host")
    app.config["GREETING"] = GREETING
    app.config.update(config or {})

    @app.get("/mine")
    def mine() -> Any:
        abort(403)

    @app.get("/broken")
    def broken() -> Any:
        raise LookupError("the host's own bug")

    @app.post("/upload")
    def upload() -> Any:
        return jsonify(size=len(request.get_data()))

    @app.get("/settings")
    def settings() -> Any:
        return jsonify(
            maxContentLength=current_app.config["MAX_CONTENT_LENGTH"],
            sortKeys=current_app.json.sort_keys,  # type: ignore[attr-defined]
        )

    runner = Runner("flask-host-runner", version="1.0.0", capabilities=CAPABILITIES)
    runner.init_app(app, url_prefix=url_prefix)
    return app
