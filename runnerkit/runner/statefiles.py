"""The files of the runner's state directory: private, and never seen half-written.

:func:`secure_directory` makes sure the state directory is this user's alone (0700) and
refuses one that another user could write to; :func:`private_file` keeps a file 0600 without
opening one SQLite may hold locks on; :func:`write_json_atomic` and :func:`read_json` keep
the small JSON records (identity, lease, ledger identity) whole for every reader.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import stat
import tempfile
from typing import Any

from runnerkit.service.settings import ConfigError


def _owner_name(uid: int) -> str:
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def secure_directory(path: str) -> None:
    """Make sure ``path`` is a directory of this user's that nobody else may write to.

    A missing one is created 0700 (its missing parents with the default mode). An existing
    one owned by another user, or writable by group or others, is refused with a
    :class:`ConfigError`: whoever controls it could read stored results, plant a ledger that
    replays answers of their own, or hold the locks. One of this user's that others may
    read or enter is narrowed to 0700.
    """
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        os.makedirs(parent, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    st = os.stat(path)
    mode = stat.S_IMODE(st.st_mode)
    me = os.geteuid()
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"The runner's state directory {path} is not a directory")
    if st.st_uid != me:
        raise ConfigError(
            f"The runner's state directory {path} is owned by {_owner_name(st.st_uid)} "
            f"(mode {mode:04o}), not by this user ({_owner_name(me)}): another user could "
            "read its stored results or plant state. Remove it, or set RUNNERKIT_STATE_DIR "
            "to a directory of your own."
        )
    if mode & 0o022:
        who = "others" if mode & 0o002 else "its group"
        raise ConfigError(
            f"The runner's state directory {path} (owned by {_owner_name(st.st_uid)}) is "
            f"writable by {who} (mode {mode:04o}): anyone who may write there could plant "
            f"state or read stored results. Run "
            f"'chmod 700 {path}' or remove it, or set RUNNERKIT_STATE_DIR to a private one."
        )
    if mode & 0o077:
        os.chmod(path, 0o700)


def private_file(path: str) -> None:
    """Create ``path`` (empty) 0600 if it is missing, or narrow it to 0600 if it exists.

    SQLite creates a database with the umask's mode (0644 as a rule) and gives its -wal and
    -shm files the main file's mode, so a ledger made here first stays private.

    An existing file is never opened here: closing any descriptor of a file drops every POSIX
    lock the process holds on it, SQLite's included. A second SQLite connection of the process
    to the same file (the outbox beside the ledger) would silently cost the first one its
    SHARED lock, and the next process to close its last connection would then think itself
    the last one, checkpoint and delete the -wal and -shm files under it: from then on that
    process wrote to and read from a WAL file no one else sees (a reload's new leader never
    saw the other workers' outbox rows). Only a file this call creates, on which no process
    can hold a lock yet, is opened and closed.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        if stat.S_IMODE(os.stat(path).st_mode) & 0o077:
            os.chmod(path, 0o600)
    else:
        os.close(fd)
    for suffix in ("-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            if stat.S_IMODE(os.stat(path + suffix).st_mode) & 0o077:
                os.chmod(path + suffix, 0o600)


#: This process's id, kept current across fork: ``os.getpid()`` is a system call, and the
def write_json_atomic(path: str, data: dict[str, Any]) -> None:
    """Replace ``path`` with ``data`` so a reader never sees half a file."""
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_json(path: str) -> dict[str, Any] | None:
    try:
        with open(path) as handle:
            value = json.load(handle)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None
