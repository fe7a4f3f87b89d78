"""The example runner with one health check that hangs, for the shutdown test.

Serve it with ``gunicorn tests.integration.hung_health_app:app`` from the repository root.
"""

from __future__ import annotations

import time

from app import app, runner

__all__ = ["app"]


@runner.health_check(name="stuck-dependency")
def stuck_dependency() -> bool:
    """A dependency that never answers (as a hung TCP connect would)."""
    time.sleep(60)
    return True
