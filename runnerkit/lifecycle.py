"""Kept import path: the code lives in :mod:`runnerkit.runner.lifecycle`."""

from runnerkit.runner.lifecycle import (
    DEFAULT_GRACEFUL_S,
    DRAIN_POLL_S,
    HOUSEKEEPING_S,
    PRUNE_EVERY_S,
    REFUSED_RETRY_S,
    DaemonThreadExecutor,
    Lifecycle,
    deregister_instance,
    install_drain_handler,
    instance_key,
    masters_dir,
    on_master_exit,
    spawn_detached,
    undelivered,
)
from runnerkit.service.process import instance_owner, under_gunicorn

__all__ = [
    "DEFAULT_GRACEFUL_S",
    "DRAIN_POLL_S",
    "HOUSEKEEPING_S",
    "PRUNE_EVERY_S",
    "REFUSED_RETRY_S",
    "DaemonThreadExecutor",
    "Lifecycle",
    "deregister_instance",
    "install_drain_handler",
    "instance_key",
    "instance_owner",
    "masters_dir",
    "on_master_exit",
    "spawn_detached",
    "undelivered",
    "under_gunicorn",
]
