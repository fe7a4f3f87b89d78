"""A capability declared wrongly: fails when the class statement runs."""

from marshmallow import Schema, fields

from runnerkit import Capability, Runner


class Broken(Capability):
    id = "broken"
    version = "one"
    job_types = ["x"]

    class Input(Schema):
        a = fields.String()

    class Output(Schema):
        a = fields.String()

    def run(self, payload, ctx):  # type: ignore[no-untyped-def]
        return payload


runner = Runner("never", capabilities=[Broken()])
