"""The JobForge stand-in lives in the public test kit; tests import it from here too."""

from runnerkit.testing.jobforge_stub import JobForgeStub, Recorded

__all__ = ["JobForgeStub", "Recorded"]
