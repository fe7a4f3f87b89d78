"""Fixtures of the security tests: real gunicorn servers, stopped whatever happens."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.security.stack import Stack, attach_logs


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """A failed test's report ends with the logs of the servers it used."""
    report = yield
    attach_logs(item, report)
    return report


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    """Servers of one test (see :class:`Stack`), stopped at teardown."""
    servers = Stack(tmp_path)
    try:
        yield servers
    finally:
        servers.stop()
