"""Fixtures of the observability tests: the security tests' real-server fixtures, reused."""

from tests.security.conftest import pytest_runtest_makereport, stack

__all__ = ["pytest_runtest_makereport", "stack"]
