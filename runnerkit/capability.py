"""Kept import path: the code lives in :mod:`runnerkit.runner.capability`."""

from runnerkit.runner.capability import (
    ID_RE,
    Capability,
    CapabilityDefinitionError,
    Context,
    Progress,
)

__all__ = [
    "ID_RE",
    "Capability",
    "CapabilityDefinitionError",
    "Context",
    "Progress",
]
