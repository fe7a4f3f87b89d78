"""runnerkit: write ControlPlane job runners on Flask, gunicorn and marshmallow."""

from runnerkit.capability import Capability, CapabilityDefinitionError, Context
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
from runnerkit.runner import Runner

__version__ = "0.1.0"

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
