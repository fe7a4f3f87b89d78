"""The process's failed writes of its own files (:data:`STORAGE`), for readiness and metrics.

A full disk must not stop a worker, so a write that fails is noted here, not raised; the
runner's readiness reports what is failing, and the metrics count it. Process-wide, as the
disk is, and on the shared floor because the metrics of every service read it.
"""

from __future__ import annotations

import logging
import threading

from runnerkit.service.afterfork import renew_after_fork

log = logging.getLogger("runnerkit.state")


class WriteFailures:
    """Writes to this process's files that failed and have not succeeded since.

    A full disk (ENOSPC), an I/O error or a read-only directory must not stop a worker: the
    write that failed is noted here and tried again later, the worker serves on, and
    readiness answers 503 naming what failed (``Runner``'s "storage" check) until it works.
    Process-wide, as the disk is.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._failing: dict[str, str] = {}
        renew_after_fork(self)

    def renew_after_fork(self) -> None:
        self._lock = threading.Lock()

    def failed(self, what: str, exc: BaseException) -> bool:
        """Note that ``what`` could not be written; True when it was not failing before."""
        with self._lock:
            new = what not in self._failing
            self._failing[what] = f"{type(exc).__name__}: {exc}"[:200]
        return new

    def recovered(self, what: str) -> None:
        if what in self._failing:
            with self._lock:
                if self._failing.pop(what, None) is not None:
                    log.warning("%s is written again", what)

    def problems(self) -> dict[str, str]:
        with self._lock:
            return dict(self._failing)


#: The process's failed writes of its own files (see :class:`WriteFailures`); the ledger's
#: are the instance's :class:`StorageHealth`.
STORAGE = WriteFailures()
