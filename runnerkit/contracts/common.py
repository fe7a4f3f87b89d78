"""ContractVersion (``types/common.ts`` and ``versioning/index.ts``)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from .base import NONNEGATIVE, ContractSchema
from .fields import StrictInteger, StrictString

__all__ = [
    "CONTRACT_VERSION",
    "SEMVER_RE",
    "ContractVersionSchema",
    "format_version",
    "is_compatible",
    "parse_version",
]

#: The contract version this package implements. Copy it before changing it.
CONTRACT_VERSION: dict[str, Any] = {"major": 1, "minor": 0, "patch": 0}

#: ``MAJOR.MINOR.PATCH[-PRE]``; groups are major, minor, patch, preRelease.
SEMVER_RE = re.compile(r"(\d+)\.(\d+)\.(\d+)(?:-([0-9A-Za-z][0-9A-Za-z.\-]*))?", re.ASCII)


class ContractVersionSchema(ContractSchema):
    """``{major, minor, patch, preRelease?}``; a change of ``major`` is breaking."""

    major = StrictInteger(required=True, validate=NONNEGATIVE)
    minor = StrictInteger(required=True, validate=NONNEGATIVE)
    patch = StrictInteger(required=True, validate=NONNEGATIVE)
    preRelease = StrictString()


def parse_version(text: str) -> dict[str, Any]:
    """Parse ``"1.2.3"`` or ``"1.2.3-beta.1"`` into a ContractVersion dict; ValueError if not."""
    m = SEMVER_RE.fullmatch(text) if isinstance(text, str) else None
    if m is None:
        raise ValueError(f"not a MAJOR.MINOR.PATCH[-PRE] version: {text!r}")
    version: dict[str, Any] = {"major": int(m[1]), "minor": int(m[2]), "patch": int(m[3])}
    if m[4] is not None:
        version["preRelease"] = m[4]
    return version


def format_version(version: Mapping[str, Any]) -> str:
    """The inverse of ``parse_version``."""
    text = f"{version['major']}.{version['minor']}.{version['patch']}"
    pre = version.get("preRelease")
    return f"{text}-{pre}" if pre else text


def is_compatible(
    theirs: Mapping[str, Any] | str, ours: Mapping[str, Any] = CONTRACT_VERSION
) -> bool:
    """Same ``major`` means compatible; accepts a dict or a version string."""
    their_version = parse_version(theirs) if isinstance(theirs, str) else theirs
    return bool(their_version["major"] == ours["major"])
