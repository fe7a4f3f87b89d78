"""The Date header of every response the worker sends, formatted once a second.

gunicorn formats it for every response (``util.http_date``: ``email.utils.formatdate``, a
``datetime`` and a string built each time); :class:`~runnerkit.service.gunicorn_worker.ThreadWorker`
puts :func:`http_date` in its place in the worker's process. Same text, same format
(RFC 7231's IMF-fixdate), the current second's made once.
"""

from __future__ import annotations

import email.utils
import time

#: The header's text and the second it is for.
_date: tuple[int, str] = (0, "")


def http_date(timestamp: float | None = None) -> str:
    """gunicorn's ``util.http_date``: ``timestamp`` (default: now) as an HTTP date."""
    if timestamp is not None:
        return email.utils.formatdate(timestamp, localtime=False, usegmt=True)
    global _date
    second = int(time.time())
    cached = _date
    if cached[0] != second:
        cached = _date = (second, email.utils.formatdate(second, localtime=False, usegmt=True))
    return cached[1]
