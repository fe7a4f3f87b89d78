"""A directory's list of files, watched by its processes without a system call.

Every claim of a job looks for the journals of workers that died (their answers must be
replayed, not run again), so it must notice a journal created a moment ago by a sibling.
``os.stat`` of the directory said so, but it gives up the GIL, and under load each claim
then waited for the GIL again (two context switches, a seventh of a worker's thread time
at 64 connections). Here a process that adds or removes a file writes 8 new random bytes
to ``<directory>/journals.epoch``; the others see them through a read-only shared mapping
of that file, a memory read. Writes go through ``pwrite``, so a full disk fails the write
(the caller's error) instead of a store into the mapping.
"""

from __future__ import annotations

import mmap
import os
import secrets

from runnerkit.service.shared_bytes import map_shared

#: The file's name in the directory, and its size.
EPOCH_FILE = "journals.epoch"
_SIZE = 8


class DirectoryEpoch:
    """8 bytes that change whenever a process of the directory adds or removes a file."""

    def __init__(self, directory: str) -> None:
        self.path = os.path.join(directory, EPOCH_FILE)
        self._map: mmap.mmap | None = None

    def read(self) -> bytes | None:
        """The current value, or None when the file cannot be mapped (no directory yet,
        or no access): the caller then looks at the directory itself."""
        mapped = self._map
        if mapped is None:
            mapped = self._map = map_shared(self.path, _SIZE)
            if mapped is None:
                return None
        return mapped[:_SIZE]

    def bump(self) -> None:
        """Say a file was added or removed (``OSError`` if that cannot be written)."""
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.pwrite(fd, secrets.token_bytes(_SIZE), 0)
        finally:
            os.close(fd)
