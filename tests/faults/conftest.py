"""Fixtures and hooks of the fault-injection suite (``tests/faults``).

- ``fault_stack()`` makes a :class:`~tests.faults.harness.FaultStack` (the e2e harness's
  Stack, forge and runners under gunicorn), stopped when the test ends, pass or fail; a
  failing test's report gets the end of each of its servers' logs (the e2e hook, imported);
- ``fault_summary(verdict)`` records a scenario's summary line; every recorded line is
  printed at the end of the run, in pytest's normal output (no ``-s`` needed);
- ``@pytest.mark.faults_long`` is for scenarios too slow for every ``make test``: they are
  deselected unless ``RUNNERKIT_FAULTS_LONG=1`` is set (as ``make faults`` does) or ``-m``
  names the marker. None needs it at present: the whole suite takes about 3 minutes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import pytest_runtest_makereport  # noqa: F401 - logs of failing tests
from tests.faults.harness import FaultStack, Verdict

LONG_MARKER = "faults_long"
LONG_ENV = "RUNNERKIT_FAULTS_LONG"
_SUMMARY = pytest.StashKey[list[str]]()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{LONG_MARKER}: a slow fault-injection scenario; runs with {LONG_ENV}=1 (make faults)",
    )
    config.stash[_SUMMARY] = []


def _long_wanted(config: pytest.Config) -> bool:
    return os.environ.get(LONG_ENV, "") not in ("", "0") or LONG_MARKER in (
        config.getoption("markexpr", "") or ""
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _long_wanted(config):
        return
    skipped = [item for item in items if item.get_closest_marker(LONG_MARKER)]
    if skipped:
        config.hook.pytest_deselected(items=skipped)
        items[:] = [item for item in items if not item.get_closest_marker(LONG_MARKER)]


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    lines = terminalreporter.config.stash.get(_SUMMARY, [])
    if lines:
        terminalreporter.write_sep("=", "fault-injection scenarios")
        for line in lines:
            terminalreporter.write_line(line)


@pytest.fixture
def fault_summary(request: pytest.FixtureRequest) -> Callable[[Verdict], None]:
    """``fault_summary(verdict)``: keep the scenario's summary line for the end of the run."""

    def record(verdict: Verdict) -> None:
        request.config.stash[_SUMMARY].append(verdict.line())

    return record


@pytest.fixture
def fault_stack(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Callable[..., FaultStack]]:
    """``fault_stack(**fields) -> FaultStack``: a fresh, forge-less stack (``db_url=`` puts its
    forge on PostgreSQL); stopped after the test."""
    made: list[FaultStack] = []
    request.node.e2e_stacks = made  # read by the e2e report hook

    def make(**fields: Any) -> FaultStack:
        fresh = FaultStack(tmp_path / f"stack{len(made)}", **fields)
        made.append(fresh)
        return fresh

    yield make
    for fresh in made:
        fresh.stop()
