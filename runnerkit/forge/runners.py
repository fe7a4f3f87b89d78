"""The runner registry: registration, heartbeats, deregistration, RunnerMetadata.

A runner is dispatched to at its *base URL*: its ``healthCheckEndpoint`` with a trailing
``/health`` (or ``/health/live``, ``/health/ready``) removed, or with the whole path removed
when it ends otherwise — ``http://127.0.0.1:3000/health`` → ``http://127.0.0.1:3000``,
``http://host/prefix/health`` → ``http://host/prefix``. A runner whose endpoint is not an
http(s) URL is registered but never dispatched to.

Registering again with the same ``healthCheckEndpoint`` replaces the old registration (a
runner that lost its id); jobs running there move to the new id.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from runnerkit.contracts import CONTRACT_VERSION, format_version, is_compatible, paginated
from runnerkit.errors import NotFound, ValidationFailed

from . import db, violations
from .jobs import Clock
from .settings import ForgeSettings
from .targets import TargetPolicy
from .trust import new_runner_token

log = logging.getLogger("runnerkit.forge.runners")

_HEALTH_SUFFIXES = ("/health/live", "/health/ready", "/health")


def base_url(health_check_endpoint: str) -> str:
    """Where ``/execute`` lives for a runner with this health URL; '' when not http(s)."""
    parts = urlsplit(health_check_endpoint.strip())
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        return ""
    path = parts.path.rstrip("/")
    for suffix in _HEALTH_SUFFIXES:
        if path.endswith(suffix):
            prefix = path[: -len(suffix)]
            break
    else:
        prefix = ""
    return f"{parts.scheme.lower()}://{parts.netloc}{prefix}"


def check_contract_version(version: Mapping[str, Any]) -> None:
    """400 VALIDATION_ERROR naming both versions when the majors differ."""
    if not is_compatible(version):
        theirs, ours = format_version(version), format_version(CONTRACT_VERSION)
        raise ValidationFailed(
            f"Contract version {theirs} is not compatible with this JobForge's {ours} "
            "(the major versions differ)",
            code="INCOMPATIBLE_CONTRACT_VERSION",
            details=[
                {
                    "message": f"Runner speaks contract {theirs}; JobForge speaks {ours}",
                    "path": ["contractVersion"],
                    "code": "incompatible",
                    "value": theirs,
                }
            ],
        )


class RunnerRegistry:
    """The runners table, as the HTTP API and the dispatcher see it."""

    def __init__(self, database: db.Database, settings: ForgeSettings) -> None:
        self.db = database
        self.settings = settings
        self.targets = TargetPolicy(str(settings.allowed_runner_networks))

    def metadata(self, row: db.Row) -> dict[str, Any]:
        """The RunnerMetadata of a runner row, plus ``contractViolations`` (how many things
        it sent broke a contract, :mod:`.referee`) and, while its latest heartbeat was
        refused, ``refusal`` (why); contract peers drop both."""
        document = db.loads(row["document"])
        metadata = {
            "id": row["id"],
            "name": document["name"],
            "version": document["version"],
            "contractVersion": document["contractVersion"],
            "capabilities": document["capabilities"],
            "supportedContracts": [format_version(document["contractVersion"])],
            "healthCheckEndpoint": document["healthCheckEndpoint"],
            "registeredAt": row["registered_at"],
            "lastHeartbeatAt": row["last_heartbeat_at"],
            "status": row["status"],
            "tags": document["tags"],
            "contractViolations": int(row["violations"]),
        }
        refusal = violations.current_refusal(row)
        if refusal:
            metadata["refusal"] = refusal
        return metadata

    def register(self, registration: Mapping[str, Any]) -> dict[str, Any]:
        """Store a loaded RunnerRegistrationRequest; the RunnerRegistrationResponse with the
        runner's own credential, ``runnerToken`` (only its hash is kept).

        400 VALIDATION_ERROR when the endpoint's host is not an address runners may have
        (:mod:`.targets`).
        """
        check_contract_version(registration["contractVersion"])
        runner_id = str(uuid.uuid4())
        now = Clock()
        interval = int(self.settings.heartbeat_interval_ms)
        health_url = registration["healthCheckEndpoint"]
        base = base_url(health_url)
        refusal = self.targets.refusal(base) if base else None
        if refusal is not None:
            raise ValidationFailed(
                f"healthCheckEndpoint is refused: {refusal} (see "
                "RUNNERKIT_FORGE_ALLOWED_RUNNER_NETWORKS)",
                code="RUNNER_ADDRESS_REFUSED",
                details=[{"message": refusal, "path": ["healthCheckEndpoint"], "code": "refused"}],
            )
        token, token_hash = new_runner_token()
        if not base:
            log.warning(
                "runner %s registered with %r: not an http(s) URL, it will get no jobs",
                registration["name"],
                health_url,
            )
        with self.db.tx() as conn:
            previous = db.runner_ids_with_health_url(conn, health_url)
            db.insert_runner(
                conn,
                {
                    "id": runner_id,
                    "name": registration["name"],
                    "version": registration["version"],
                    "document": db.dumps(registration),
                    "health_url": health_url,
                    "base_url": base,
                    "registered_at": now.z,
                    "last_heartbeat_at": now.z,
                    "last_seen": now.ts,
                    "status": "healthy",
                    "heartbeat_interval_ms": interval,
                    "token_hash": token_hash,
                },
            )
            for old in previous:
                db.move_slots(conn, old, runner_id)
                violations.move(conn, old, runner_id)
                db.delete_runner(conn, old)
        if previous:
            log.info("runner %s re-registered as %s", ", ".join(previous), runner_id)
        return {
            "runnerId": runner_id,
            "registeredAt": now.z,
            "heartbeatIntervalMs": interval,
            "runnerToken": token,
        }

    def heartbeat(self, heartbeat: Mapping[str, Any]) -> dict[str, Any]:
        """Record a loaded RunnerHeartbeat; 404 RESOURCE_NOT_FOUND for an unknown runner."""
        now = Clock()
        runner_id = heartbeat["runnerId"]
        with self.db.tx() as conn:
            row = db.get_runner(conn, runner_id)
            known = row is not None and db.record_heartbeat(
                conn,
                runner_id,
                status=heartbeat["status"],
                last_heartbeat_at=now.z,
                last_seen=now.ts,
                reported_active=min(int(heartbeat["activeJobs"]), db.MAX_INTEGER),
            )
        if not known or row is None:
            raise NotFound(
                f"No runner {runner_id} is registered; register again",
                code="RUNNER_NOT_FOUND",
                details=[{"message": "Unknown runnerId", "path": ["runnerId"]}],
            )
        if row["status"] == "offline":
            log.info("runner %s is back (%s)", runner_id, heartbeat["status"])
        return {
            "runnerId": runner_id,
            "status": heartbeat["status"],
            "receivedAt": now.z,
            "heartbeatIntervalMs": int(row["heartbeat_interval_ms"]),
        }

    def deregister(self, runner_id: str) -> None:
        with self.db.tx() as conn:
            if not db.delete_runner(conn, runner_id):
                raise NotFound(f"No runner {runner_id} is registered", code="RUNNER_NOT_FOUND")
            violations.forget(conn, runner_id)

    def get(self, runner_id: str) -> dict[str, Any]:
        with self.db.connection() as conn:
            row = db.get_runner(conn, runner_id)
        if row is None:
            raise NotFound(f"No runner {runner_id} is registered", code="RUNNER_NOT_FOUND")
        return self.metadata(row)

    def list(self, *, status: str | None, limit: int, offset: int) -> dict[str, Any]:
        """A PaginatedResponse of RunnerMetadata, oldest registration first."""
        with self.db.snapshot() as conn:
            rows, total = db.list_runners(conn, status=status, limit=limit, offset=offset)
        items = [self.metadata(r) for r in rows]
        return paginated(items, total, limit, offset)
