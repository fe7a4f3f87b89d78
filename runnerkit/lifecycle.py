"""Kept import path: the code lives in :mod:`runnerkit.runner.lifecycle` and its siblings
(:mod:`~runnerkit.runner.registration`, :mod:`~runnerkit.runner.draining`,
:mod:`~runnerkit.runner.deregistration`)."""

from runnerkit.runner.deregistration import (
    deregister_instance,
    instance_key,
    masters_dir,
    on_master_exit,
    undelivered,
)
from runnerkit.runner.draining import DEFAULT_GRACEFUL_S, DRAIN_POLL_S, install_drain_handler
from runnerkit.runner.lifecycle import (
    HOUSEKEEPING_S,
    PRUNE_EVERY_S,
    DaemonThreadExecutor,
    Lifecycle,
    spawn_detached,
)
from runnerkit.runner.registration import REFUSED_RETRY_S
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
