"""The HealthCheck contract (``GET /health``)."""

from __future__ import annotations

from marshmallow import fields

from .base import NONNEGATIVE, ContractSchema, one_of
from .fields import Object, StrictNumber, StrictString, ZDateTime

__all__ = ["HEALTH_STATUSES", "HealthCheckItemSchema", "HealthCheckSchema", "http_status_for"]

HEALTH_STATUSES: tuple[str, ...] = ("healthy", "degraded", "unhealthy", "unknown")


class HealthCheckItemSchema(ContractSchema):
    """One dependency check inside a HealthCheck."""

    name = StrictString(required=True)
    status = StrictString(required=True, validate=one_of(HEALTH_STATUSES))
    responseTimeMs = StrictNumber(required=True, validate=NONNEGATIVE)
    message = StrictString()


class HealthCheckSchema(ContractSchema):
    """A service's health; ``uptime`` is in seconds."""

    service = StrictString(required=True)
    status = StrictString(required=True, validate=one_of(HEALTH_STATUSES))
    timestamp = ZDateTime(required=True)
    version = StrictString(required=True)
    uptime = StrictNumber(required=True, validate=NONNEGATIVE)
    checks = fields.List(Object(HealthCheckItemSchema), load_default=list)


def http_status_for(status: str) -> int:
    """200 when healthy or degraded, else 503 (the contract names 503 for unhealthy)."""
    return 200 if status in ("healthy", "degraded") else 503
