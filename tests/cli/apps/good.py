"""A valid runner for `runnerkit validate` tests."""

from typing import Any

from marshmallow import Schema, fields

from runnerkit import Capability, Context, Runner


class Upper(Capability):
    id = "upper"
    job_types = ["text.upper"]
    examples = [{"input": {"text": "ab"}, "output": {"text": "AB"}}]

    class Input(Schema):
        text = fields.String(required=True)

    class Output(Schema):
        text = fields.String(required=True)

    def run(self, payload: dict[str, Any], ctx: Context) -> dict[str, Any]:
        return {"text": payload["text"].upper()}


runner = Runner("good-runner", version="1.0.0", capabilities=[Upper()])
app = runner.create_app()
