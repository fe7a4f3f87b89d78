"""Helpers for tests that run real components: gunicorn processes and a JobForge stand-in."""

from tests.support.jobforge_stub import JobForgeStub, Recorded
from tests.support.procs import REPO_ROOT, GunicornProcess, free_port, running

__all__ = ["REPO_ROOT", "GunicornProcess", "JobForgeStub", "Recorded", "free_port", "running"]
