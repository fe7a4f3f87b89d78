"""Whether the instance's stored state can be trusted and written.

:class:`LedgerIdentity` notices a ledger file deleted or replaced under a running instance
(:class:`LedgerReplaced`), which would otherwise run finished jobs again; :class:`StorageHealth`
notices writes that fail (disk full, I/O error) and tells every worker's readiness through a
marker file. :data:`STORAGE_ERRORS` is what a failing state directory raises.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
from collections.abc import Callable

from runnerkit.runner.statefiles import read_json, write_json_atomic

log = logging.getLogger("runnerkit.state")


class LedgerReplaced(Exception):
    """The ledger file of the running instance was deleted or replaced under it.

    Running jobs against a fresh, empty ledger would run finished jobs a second time, so
    the instance refuses new jobs instead (503 ``LEDGER_REPLACED``) until it is restarted.
    """


#: What a failing state directory raises: SQLite's errors (disk full, I/O, locked for too
#: long), the operating system's (lock and json files), and a replaced ledger.
STORAGE_ERRORS: tuple[type[BaseException], ...] = (sqlite3.Error, OSError, LedgerReplaced)


class LedgerIdentity:
    """Which file (``st_dev``, ``st_ino``) the ledger of the running instance is.

    Deleting ``ledger.sqlite3*`` under a running instance splits it in two: workers that
    have it open keep the unlinked file, and a worker started afterwards (gunicorn recycles
    them) would create a new, empty one and run finished jobs again. So the first process
    of an instance to open the ledger records its identity in ``ledger.identity.json``,
    keyed by the instance; every later opening by a process of that instance must find
    that same file, and each worker compares it again on its housekeeping tick
    (:meth:`verify`, one ``stat``). A mismatch or a missing file makes :attr:`broken` say
    what changed: the ledger then refuses claims (:class:`LedgerReplaced`) and readiness
    turns unhealthy. A new instance (the whole runner restarted) records the file anew.
    """

    def __init__(self, path: str, instance: Callable[[], str]) -> None:
        self.path = path
        self.record_path = os.path.join(os.path.dirname(path), "ledger.identity.json")
        self.instance = instance
        #: What happened to the ledger ("" while it is the instance's own file).
        self.broken = ""
        self._expected: tuple[int, int] | None = None

    def _recorded(self) -> tuple[int, int] | None:
        record = read_json(self.record_path)
        if not record or record.get("instance") != self.instance():
            return None
        try:
            return int(record["dev"]), int(record["ino"])
        except (KeyError, TypeError, ValueError):
            return None

    def _break(self, what: str) -> None:
        if not self.broken:
            self.broken = (
                f"the ledger {self.path} {what} while this instance runs; new jobs are "
                "refused so that finished ones cannot run twice: restart the runner"
            )
            log.error("ledger replaced: %s", self.broken)
        raise LedgerReplaced(self.broken)

    def _compare(self, expected: tuple[int, int]) -> None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._break("was deleted")
        else:
            if (st.st_dev, st.st_ino) != expected:
                self._break(
                    f"was replaced (device/inode {expected[0]}/{expected[1]} became "
                    f"{st.st_dev}/{st.st_ino})"
                )

    def before_open(self) -> None:
        """Raise :class:`LedgerReplaced` if the instance recorded a file that is not there."""
        if self.broken:
            raise LedgerReplaced(self.broken)
        expected = self._recorded()
        if expected is not None:
            self._compare(expected)

    def after_open(self) -> None:
        """Record the file just opened as the instance's, or check it is the recorded one."""
        st = os.stat(self.path)
        current = (st.st_dev, st.st_ino)
        expected = self._recorded()
        if expected is None:
            write_json_atomic(
                self.record_path,
                {"instance": self.instance(), "dev": current[0], "ino": current[1]},
            )
        elif expected != current:
            self._compare(expected)  # raises LedgerReplaced
        self._expected = current

    def verify(self) -> str:
        """Compare the file with the recorded identity now; "" when it is the same."""
        if not self.broken:
            expected = self._expected or self._recorded()
            if expected is not None:
                with contextlib.suppress(LedgerReplaced):
                    self._compare(expected)
        return self.broken


class StorageHealth:
    """Whether the instance's state can be written right now.

    A write that fails (disk full, I/O error) sets :attr:`failure` in its process and leaves
    the marker file ``state.unwritable``, which the readiness check of every worker sees.
    The next write that succeeds in a process that had failed (a job's answer stored, or
    the housekeeping probe every worker runs while the marker exists) clears both. Reading
    :attr:`failure` costs nothing on the path of a job; the marker is looked at only by
    readiness and housekeeping.
    """

    def __init__(self, directory: str) -> None:
        self.marker = os.path.join(directory, "state.unwritable")
        #: This process's last storage failure; "" while its writes work.
        self.failure = ""

    def failed(self, exc: BaseException) -> None:
        """A write failed: degrade readiness (here, and for every worker via the marker)."""
        message = f"{type(exc).__name__}: {exc}"[:300]
        first = not self.failure
        self.failure = message
        with contextlib.suppress(OSError):
            # An empty file still fits on a full disk where its text may not.
            fd = os.open(self.marker, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
            with contextlib.suppress(OSError):
                os.write(fd, message.encode()[:300])
            os.close(fd)
        if first:
            log.error(
                "the instance's state cannot be written (%s); jobs are answered 503 "
                "STATE_UNAVAILABLE and readiness is unhealthy until a write succeeds",
                message,
            )

    def recovered(self) -> None:
        """A write succeeded: clear this process's failure and the instance's marker."""
        had = self.failure
        self.failure = ""
        try:
            os.unlink(self.marker)
        except FileNotFoundError:
            if not had:
                return
        except OSError:
            return
        log.info("the instance's state can be written again")

    def marked(self) -> bool:
        return self.failure != "" or os.path.exists(self.marker)

    def problem(self) -> str:
        """What is wrong with the state's writes ("" when nothing)."""
        if self.failure:
            return self.failure
        try:
            with open(self.marker, encoding="utf-8", errors="replace") as handle:
                text = handle.read(300)
        except FileNotFoundError:
            return ""
        except OSError as exc:
            text = type(exc).__name__
        return text or "a worker of this instance could not write its state"
