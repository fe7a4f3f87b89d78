"""The conformance suite's findings: one line per check for people, JUnit XML for CI.

A check is *required* (a failure makes the suite fail) or *advisory* (a finding is reported,
the exit status is not changed). Each finding names the path it is about, so a runner team
sees at once which field of which answer is wrong.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from xml.sax.saxutils import escape, quoteattr

PASS = "pass"
FAIL = "fail"
ADVISORY = "advisory"


@dataclass(frozen=True)
class Finding:
    """One thing wrong: where (a dotted path in the answer, or "" for the answer as a whole)
    and why."""

    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}" if self.path else self.reason


@dataclass
class Check:
    """One check of the suite and what it found."""

    name: str
    required: bool = True
    findings: list[Finding] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def outcome(self) -> str:
        if not self.findings:
            return PASS
        return FAIL if self.required else ADVISORY

    def fail(self, reason: str, path: str = "") -> None:
        self.findings.append(Finding(path, reason))


@dataclass
class Report:
    """Every check run against one runner URL."""

    url: str
    checks: list[Check] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """Whether every required check passed (advisories do not count)."""
        return all(c.outcome != FAIL for c in self.checks)

    def counts(self) -> dict[str, int]:
        result = {PASS: 0, FAIL: 0, ADVISORY: 0}
        for check in self.checks:
            result[check.outcome] += 1
        return result

    def summary(self) -> str:
        counts = self.counts()
        verdict = "conforms" if self.passed else "DOES NOT CONFORM"
        return (
            f"{self.url}: {verdict} ({len(self.checks)} checks: {counts[PASS]} passed, "
            f"{counts[FAIL]} failed, {counts[ADVISORY]} advisory)"
        )

    def lines(self, check: Check) -> list[str]:
        """The lines of one check: its outcome and name, then each finding indented."""
        label = {PASS: "pass    ", FAIL: "FAIL    ", ADVISORY: "advisory"}[check.outcome]
        return [f"{label}  {check.name}", *(f"          - {f}" for f in check.findings)]

    def as_text(self) -> str:
        lines = [line for check in self.checks for line in self.lines(check)]
        return "\n".join([*lines, self.summary()])

    def as_dict(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "passed": self.passed,
            "counts": self.counts(),
            "checks": [
                {
                    "name": c.name,
                    "required": c.required,
                    "outcome": c.outcome,
                    "findings": [{"path": f.path, "reason": f.reason} for f in c.findings],
                }
                for c in self.checks
            ],
        }

    def as_junit(self) -> str:
        """JUnit XML: a failed required check is a ``<failure>``; an advisory finding is a
        passing test case whose ``<system-out>`` says what was found."""
        counts = self.counts()
        cases = []
        for check in self.checks:
            body = ""
            text = escape("\n".join(str(f) for f in check.findings))
            if check.outcome == FAIL:
                message = quoteattr("; ".join(str(f) for f in check.findings)[:500])
                body = f"<failure message={message}>{text}</failure>"
            elif check.outcome == ADVISORY:
                body = f"<system-out>advisory: {text}</system-out>"
            cases.append(
                f"  <testcase classname={quoteattr('runnerkit.conformance')} "
                f'name={quoteattr(check.name)} time="{check.seconds:.4f}">{body}</testcase>'
            )
        return (
            '<?xml version="1.0" encoding="utf-8"?>\n'
            f"<testsuite name={quoteattr('runnerkit conformance ' + self.url)} "
            f'tests="{len(self.checks)}" failures="{counts[FAIL]}" errors="0">\n'
            + "\n".join(cases)
            + "\n</testsuite>\n"
        )
