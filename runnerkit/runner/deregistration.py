"""The instance's end: its runner is deregistered from JobForge once, by whoever comes first.

Two callers race for it: the sentinel process (:mod:`runnerkit.runner.sentinel`), which
watches the gunicorn master, and the master's own ``on_exit`` hook
(:func:`on_master_exit`, with ``deploy/gunicorn.conf.py``), which finds the instances it
served in its entry under :func:`masters_dir`; each worker's lifecycle adds its instance to
that entry at start. The identity file and an ``flock`` make the DELETE happen exactly once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import tempfile
import time

import psutil
import requests

from runnerkit.runner.jobforge import JobForgeClient
from runnerkit.runner.lease import LeaderLease
from runnerkit.runner.statefiles import read_json
from runnerkit.service.filelocks import FileLock
from runnerkit.service.logs import configure_logging

log = logging.getLogger("runnerkit.lifecycle")


def instance_key(owner: tuple[int, float]) -> str:
    return f"{owner[0]}@{owner[1]:.2f}"


def masters_dir() -> str:
    return os.path.join(tempfile.gettempdir(), "runnerkit", "masters")


def forget_dead_masters() -> None:
    """Remove the entries of masters that are gone.

    A master served with ``deploy/gunicorn.conf.py`` removes its own entry in ``on_exit``;
    one started without it (plain ``gunicorn app:app``) cannot, and its entry would stay.
    """
    with contextlib.suppress(OSError):
        for name in os.listdir(masters_dir()):
            stem, _, ext = name.partition(".")
            if ext == "json" and stem.isdigit() and not psutil.pid_exists(int(stem)):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(masters_dir(), name))


def deregister_instance(state_dir: str, key: str, lock_timeout_s: float = 15.0) -> bool:
    """DELETE the instance's runner from JobForge, once, whoever calls first.

    An ``flock`` on ``leader.lock`` makes the sentinel and the master hook take turns; the
    identity is removed after a successful DELETE, so a second caller finds nothing to do.
    The caller also takes the leader lease, waiting for a worker still leading to let go
    (it would heartbeat after the DELETE, and JobForge's 404 would make it register again),
    and taking it over from one that is stopped: that one steps down if it ever resumes.
    """
    instance = read_json(os.path.join(state_dir, "instance.json"))
    if not instance or instance.get("instance") != key or not instance.get("jobforgeUrl"):
        return False
    state_lock = FileLock(os.path.join(state_dir, "leader.lock"))
    if not state_lock.acquire(blocking=True, timeout=lock_timeout_s):
        log.warning("could not take the leader lock to deregister; deregistering anyway")
    lease = LeaderLease(state_dir, expiry_s=lock_timeout_s)
    deadline = time.monotonic() + lock_timeout_s
    while not lease.acquire(force=time.monotonic() >= deadline):
        if time.monotonic() >= deadline + 1.0:
            log.warning("could not take the leader lease to deregister; deregistering anyway")
            break
        time.sleep(0.05)
    try:
        identity_path = os.path.join(state_dir, "identity.json")
        identity = read_json(identity_path)
        if not identity or identity.get("instance") != key or not identity.get("runnerId"):
            return False
        left = undelivered(state_dir)
        if left:
            log.warning(
                "deregistering with %d outbox message(s) (results, progress, assertions) "
                "not delivered: the workers' drain ended first; they stay in %s",
                left,
                state_dir,
            )
        client = JobForgeClient(
            instance["jobforgeUrl"],
            token=instance.get("token", ""),
            connect_timeout_s=float(instance.get("connectTimeoutS", 3.0)),
            read_timeout_s=float(instance.get("readTimeoutS", 10.0)),
        )
        for attempt in range(3):
            try:
                response = client.deregister(
                    identity["runnerId"], str(identity.get("runnerToken") or "")
                )
            except requests.RequestException as exc:
                log.warning("deregistration failed (%s)", type(exc).__name__)
                time.sleep(0.5 * (attempt + 1))
                continue
            if response.status_code < 300 or response.status_code == 404:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(identity_path)
                log.info("deregistered runner %s", identity["runnerId"])
                return True
            log.warning("JobForge answered %s to deregistration", response.status_code)
            return False
        return False
    finally:
        lease.close()
        state_lock.release()


def undelivered(state_dir: str) -> int:
    """Rows the instance's outbox still has to deliver (0 when it cannot be read)."""
    path = os.path.join(state_dir, "ledger.sqlite3")
    if not os.path.exists(path):
        return 0
    try:
        with contextlib.closing(
            sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1.0)
        ) as conn:
            (count,) = conn.execute("SELECT COUNT(*) FROM outbox WHERE dead = 0").fetchone()
    except sqlite3.Error:
        return 0
    return int(count)


def on_master_exit(master_pid: int | None = None) -> None:
    """gunicorn ``on_exit`` hook: deregister every runner instance this master served."""
    pid = os.getpid() if master_pid is None else master_pid
    path = os.path.join(masters_dir(), f"{pid}.json")
    entry = read_json(path)
    if not entry:
        return
    # The master never loaded the app, so nothing has set up runnerkit's log lines here.
    configure_logging(
        str(entry.get("service") or "runnerkit"),
        str(entry.get("version") or ""),
        "text" if os.environ.get("RUNNERKIT_LOG_FORMAT", "").strip().lower() == "text" else "json",
        os.environ.get("RUNNERKIT_LOG_LEVEL", "INFO"),
    )
    for state_dir in entry.get("stateDirs", []):
        deregister_instance(state_dir, entry["instance"])
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
