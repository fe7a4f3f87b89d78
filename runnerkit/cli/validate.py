"""``runnerkit validate``: the contract check of a runner, for people and for CI.

Checks what a JobForge peer will rely on: the registration document against the contract,
each capability's input/output schema as JSON Schema, unique ids and job types, and every
example a capability declares — its input must pass ``Input`` and its run must produce a valid
``Output`` (and the expected output, when one is given).
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any
from xml.sax.saxutils import escape, quoteattr

from jsonschema import SchemaError
from jsonschema.validators import validator_for
from marshmallow import ValidationError

from runnerkit.contracts.validator import ContractValidator
from runnerkit.errors import RunnerError
from runnerkit.runner.capability import Capability, Context


@dataclass
class Check:
    """One named check and its outcome."""

    name: str
    ok: bool
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class Report:
    runner: str
    checks: list[Check] = field(default_factory=list)

    @property
    def valid(self) -> bool:
        return all(c.ok for c in self.checks)

    def add(self, name: str, problems: list[str], started: float) -> None:
        self.checks.append(Check(name, not problems, problems, time.monotonic() - started))

    def as_dict(self) -> dict[str, Any]:
        return {
            "runner": self.runner,
            "valid": self.valid,
            "checks": [{"name": c.name, "ok": c.ok, "problems": c.problems} for c in self.checks],
        }

    def as_text(self) -> str:
        lines = []
        for check in self.checks:
            lines.append(f"{'ok  ' if check.ok else 'FAIL'}  {check.name}")
            lines.extend(f"      - {p}" for p in check.problems)
        verdict = "valid" if self.valid else "INVALID"
        failed = sum(not c.ok for c in self.checks)
        lines.append(f"{self.runner}: {verdict} ({len(self.checks)} checks, {failed} failed)")
        return "\n".join(lines)

    def as_junit(self) -> str:
        failures = sum(not c.ok for c in self.checks)
        cases = []
        for check in self.checks:
            body = ""
            if not check.ok:
                message = quoteattr("; ".join(check.problems)[:500])
                body = (
                    f"<failure message={message}>{escape(chr(10).join(check.problems))}</failure>"
                )
            cases.append(
                f"  <testcase classname={quoteattr('runnerkit.validate.' + self.runner)} "
                f'name={quoteattr(check.name)} time="{check.seconds:.4f}">{body}</testcase>'
            )
        return (
            '<?xml version="1.0" encoding="utf-8"?>\n'
            f"<testsuite name={quoteattr('runnerkit validate ' + self.runner)} "
            f'tests="{len(self.checks)}" failures="{failures}" errors="0">\n'
            + "\n".join(cases)
            + "\n</testsuite>\n"
        )


def validate_runner(runner: Any) -> Report:
    """Run every check on a Runner."""
    report = Report(runner.name)
    started = time.monotonic()
    document = runner.registration_document()
    result = ContractValidator().validate("RunnerRegistrationRequest", document)
    report.add(
        "registration document is a valid RunnerRegistrationRequest",
        [f"{'.'.join(p.path) or '(root)'}: {p.message}" for p in result.errors],
        started,
    )
    for capability in runner.capabilities.values():
        started = time.monotonic()
        manifest = capability.manifest()
        problems = []
        for key in ("inputSchema", "outputSchema"):
            try:
                validator_for(manifest[key]).check_schema(manifest[key])
            except SchemaError as exc:
                problems.append(f"{key}: {exc.message}")
        report.add(f"{capability.id}: input and output are valid JSON Schema", problems, started)
    started = time.monotonic()
    seen: dict[str, str] = {}
    problems = []
    for capability in runner.capabilities.values():
        for job_type in capability.job_types:
            if job_type in seen:
                problems.append(
                    f"job type {job_type!r} is handled by both {seen[job_type]!r} and "
                    f"{capability.id!r}: JobForge could route it to either"
                )
            seen[job_type] = capability.id
    report.add("capability ids and job types are unique", problems, started)
    for capability in runner.capabilities.values():
        for index, example in enumerate(getattr(capability, "examples", []) or []):
            started = time.monotonic()
            report.add(
                f"{capability.id}: example {index + 1} runs and matches Output",
                _check_example(capability, example),
                started,
            )
    return report


def _check_example(capability: Capability, example: Any) -> list[str]:
    if not isinstance(example, dict) or "input" not in example:
        return ["an example must be a dict with an 'input' (and optionally 'output')"]
    try:
        payload = capability.load_input(example["input"])
    except ValidationError as exc:
        return [f"input does not pass Input: {exc.messages}"]
    ctx = Context(
        job_id=str(uuid.uuid4()),
        capability_id=capability.id,
        correlation_id=str(uuid.uuid4()),
        timeout_ms=float(capability.timeout_ms),
    )
    try:
        output = capability.dump_output(capability.run(payload, ctx))
    except RunnerError as exc:
        return [f"run raised {type(exc).__name__} ({exc.code}): {exc.message}"]
    except Exception as exc:  # noqa: BLE001 - a broken example is a finding, not a crash
        return [f"run raised {type(exc).__name__}: {exc}"]
    if "output" in example and json.dumps(output, sort_keys=True) != json.dumps(
        example["output"], sort_keys=True
    ):
        return [f"output {output!r} differs from the expected {example['output']!r}"]
    return []
