"""runnerkit: write ControlPlane job runners on Flask, gunicorn and marshmallow."""

from runnerkit._version import __version__
from runnerkit.contracts import CONTRACT_VERSION
from runnerkit.errors import (
    Conflict,
    NotFound,
    RateLimited,
    RunnerError,
    SchemaMismatch,
    Timeout,
    Unavailable,
    ValidationFailed,
    build_envelope,
    retry_delay,
    should_retry,
)
from runnerkit.runner.app import Runner
from runnerkit.runner.capability import Capability, CapabilityDefinitionError, Context

__all__ = [
    "CONTRACT_VERSION",
    "Capability",
    "CapabilityDefinitionError",
    "Conflict",
    "Context",
    "NotFound",
    "RateLimited",
    "Runner",
    "RunnerError",
    "SchemaMismatch",
    "Timeout",
    "Unavailable",
    "ValidationFailed",
    "__version__",
    "build_envelope",
    "retry_delay",
    "should_retry",
]
