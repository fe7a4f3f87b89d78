"""The test kit: contract validation, valid documents, a runner test client, pytest fixtures."""

from runnerkit.contracts.validator import ContractValidator, Problem, ValidationResult
from runnerkit.testing import documents
from runnerkit.testing.client import RunnerClient
from runnerkit.testing.jobforge_stub import JobForgeStub, Recorded

__all__ = [
    "ContractValidator",
    "JobForgeStub",
    "Problem",
    "Recorded",
    "RunnerClient",
    "ValidationResult",
    "documents",
]
