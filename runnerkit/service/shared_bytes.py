"""A few bytes of a file mapped into every process that opens it: values the processes of
one machine share without a system call to read them.

The runner's journals' epoch (``runner/directory_epoch.py``) and the forge's pending wake-up
mark (``forge/wakeup.py``) are such values. A missing or short file is first given its bytes
with ``pwrite``, never ``ftruncate``: a page with no block behind it would make a store into
the mapping on a full disk a SIGBUS, where a write fails with an error the caller handles.
"""

from __future__ import annotations

import mmap
import os


def map_shared(path: str, size: int, *, writable: bool = False) -> mmap.mmap | None:
    """The first ``size`` bytes of ``path`` (made with zeros if missing or shorter), mapped
    shared, for reading only unless ``writable``; None when the file cannot be made or mapped
    (no directory, no access, a full disk): the caller then does without."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:
        return None
    try:
        if os.fstat(fd).st_size < size and os.pwrite(fd, bytes(size), 0) != size:
            return None
        protection = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        return mmap.mmap(fd, size, mmap.MAP_SHARED, protection)
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)
