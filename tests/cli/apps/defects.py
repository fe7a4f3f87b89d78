"""Runners with one defect each, for `runnerkit validate` tests (selected by attribute)."""

from typing import Any

from marshmallow import Schema, fields

from runnerkit import Capability, Context, Runner


class _Base(Capability):
    abstract = True

    class Input(Schema):
        text = fields.String(required=True)

    class Output(Schema):
        text = fields.String(required=True)

    def run(self, payload: dict[str, Any], ctx: Context) -> dict[str, Any]:
        return {"text": payload["text"]}


class One(_Base):
    id = "one"
    job_types = ["shared.type"]


class Two(_Base):
    id = "two"
    job_types = ["shared.type"]


class BadExampleInput(_Base):
    id = "bad-example-input"
    job_types = ["bad.input"]
    examples = [{"input": {"text": 5}}]


class WrongExampleOutput(_Base):
    id = "wrong-example-output"
    job_types = ["wrong.output"]
    examples = [{"input": {"text": "a"}, "output": {"text": "b"}}]


class BrokenSchema(_Base):
    id = "broken-schema"
    job_types = ["broken.schema"]

    class Input(Schema):
        text = fields.String(required=True, metadata={"minLength": "not a number"})


duplicate_job_types = Runner("dup", capabilities=[One(), Two()])
bad_example_input = Runner("bad-input", capabilities=[BadExampleInput()])
wrong_example_output = Runner("wrong-output", capabilities=[WrongExampleOutput()])
broken_schema = Runner("broken", capabilities=[BrokenSchema()])
bad_health_url = Runner("bad-url", capabilities=[One()])
bad_health_url.create_app({"RUNNERKIT_HEALTH_CHECK_URL": "not a url"})
