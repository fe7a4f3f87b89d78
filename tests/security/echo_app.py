"""A runner for the security and observability tests, served by real gunicorn.

``gunicorn tests.security.echo_app:app`` (from the repository root; ``app`` is created on first
access). Its capabilities:

- ``echo`` (job type ``test.echo``): accepts any JSON object and answers ``{"echo": payload}``
  unchanged. On the way it logs: a line through ``ctx.logger`` (with the payload as an
  ``extra`` field), the payload as a structured field through a ``runnerkit.*`` logger (so it
  passes runnerkit's JSON formatter and its redaction), and a line through a plain third-party
  logger that runnerkit attaches no handler to;
- ``vault`` (``test.vault``): a strict schema with secret-named fields, to provoke validation
  errors whose details must not echo secrets;
- ``leak`` (``test.leak``): returns ``{payload.field: payload.secret_value}``, so a test can
  hand each ``Output`` field a value it rejects (a secret where an Integer, an email, a
  date... belongs); its input's ``choice`` has a validator message that quotes the input.
"""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask
from marshmallow import INCLUDE, Schema, fields, validate

from runnerkit import Capability, Context, Runner
from runnerkit.contracts import fields as strict

#: A logger of "someone else's library": runnerkit attaches no handler to it.
thirdparty = logging.getLogger("thirdparty")
#: A child of runnerkit's logger: formatted as JSON, secret-named keys redacted.
payload_log = logging.getLogger("runnerkit.echo")


class Echo(Capability):
    """Answers with its payload, unchanged."""

    id = "echo"
    job_types = ["test.echo"]
    max_concurrency = 16
    timeout_ms = 5_000

    class Input(Schema):
        class Meta:
            unknown = INCLUDE

    class Output(Schema):
        echo = fields.Raw(required=True)

    def run(self, payload: dict[str, Any], ctx: Context) -> dict[str, Any]:
        ctx.logger.info("echo received its payload", extra={"input": payload})
        payload_log.info("echo payload", extra={"input": payload})
        thirdparty.warning("thirdparty library line for job %s", ctx.job_id)
        return {"echo": payload}


class Vault(Capability):
    """Stores nothing; only validates, so invalid input produces error envelopes."""

    id = "vault"
    job_types = ["test.vault"]

    class Input(Schema):
        class Credentials(Schema):
            value = strict.StrictString(required=True, validate=validate.Length(max=4))

        name = strict.StrictString(required=True)
        secretField_token = strict.StrictString(validate=validate.Length(max=4))
        auth_token = fields.Nested(Credentials)
        count = strict.StrictInteger()

    class Output(Schema):
        stored = fields.Boolean(required=True)

    def run(self, payload: dict[str, Any], ctx: Context) -> dict[str, Any]:
        return {"stored": True}


class Leak(Capability):
    """Returns ``{payload.field: payload.secret_value}``: whatever Output field is named."""

    id = "leak"
    job_types = ["test.leak"]
    max_concurrency = 8

    class Input(Schema):
        field = strict.StrictString(required=True)
        secret_value = fields.Raw(required=True, allow_none=True)
        choice = strict.StrictString(
            validate=validate.OneOf(["a", "b"], error="{input} is not one of {choices}")
        )

    class Output(Schema):
        class Inner(Schema):
            n = fields.Integer(required=True)

        api_token = fields.Integer()
        secret_strict = strict.StrictInteger()
        secret_choice = fields.String(validate=validate.OneOf(["a", "b"]))
        secret_pattern = fields.String(validate=validate.Regexp(r"^[0-9]+$"))
        secret_short = fields.String(validate=validate.Length(max=3))
        password_email = fields.Email()
        token_url = fields.URL()
        secret_date = fields.Date()
        secret_nested = fields.Nested(Inner)
        token_list = fields.List(fields.Integer())
        count = fields.Integer()  # not secret-named: its value is echoed in details[].value

    def run(self, payload: dict[str, Any], ctx: Context) -> dict[str, Any]:
        return {payload["field"]: payload["secret_value"]}


def make_runner() -> Runner:
    return Runner("security-echo", version="2.3.4", capabilities=[Echo(), Vault(), Leak()])


_app: Flask | None = None


def __getattr__(name: str) -> Any:
    """``app`` is built from the environment on first access (gunicorn's), not at import, so
    tests can import the capabilities without creating an app."""
    global _app
    if name == "app":
        if _app is None:
            _app = make_runner().create_app()
        return _app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
