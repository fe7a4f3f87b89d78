"""The client socket as the gunicorn worker wraps it: JSON error pages, reads with a timeout.

gunicorn answers requests that never reach the app (a malformed head, 414, 431, 501) with a
small HTML page; :class:`EnvelopeSocket` rewrites it as an ErrorEnvelope on its way out
(:func:`envelope_response`). gthread reads a request on a blocking socket with no timeout;
:class:`TimedSocket` gives the blocking mode a timeout and a total deadline per request, so
a stalled client cannot hold a thread for ever. Both are :class:`ThreadWorker`'s
(:mod:`runnerkit.service.gunicorn_worker`).
"""

from __future__ import annotations

import html
import json
import re
import socket
import time
from typing import Any, ClassVar

from runnerkit.errors import make_envelope
from runnerkit.service.http import CLIENT_IDLE_TIMEOUT_S, HTTP_ERRORS

_STATUS_LINE = re.compile(rb"^HTTP/1\.[01] (\d{3}) ([^\r\n]*)")
#: gunicorn's page: <html>…<h1><p>reason</p></h1> message </body></html>.
_MESSAGE = re.compile(r"</h1>(.*?)</body>", re.DOTALL)


class EnvelopeSocket:
    """The client socket as gunicorn's error writer sees it: its HTML page becomes JSON."""

    def __init__(self, sock: Any, service: str) -> None:
        self._sock = sock
        self._service = service

    def sendall(self, data: bytes) -> None:
        self._sock.sendall(envelope_response(data, self._service))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def envelope_response(page: bytes, service: str) -> bytes:
    """gunicorn's HTML error response ``page`` as the same status with an ErrorEnvelope."""
    match = _STATUS_LINE.match(page)
    if match is None:  # not an error page of gunicorn's: leave it alone
        return page
    status, reason = int(match.group(1)), match.group(2).decode("latin-1")
    _, _, body = page.partition(b"\r\n\r\n")
    found = _MESSAGE.search(body.decode("latin-1"))
    detail = " ".join(html.unescape(found.group(1)).split()) if found else ""
    category, code = HTTP_ERRORS.get(status, ("INTERNAL_ERROR", f"HTTP_{status}"))
    message = f"{reason}: {detail}" if detail and detail != reason else reason
    envelope = make_envelope(category, code, message, service=service, retryable=status >= 500)
    payload = json.dumps({"success": False, "error": envelope}, separators=(",", ":")).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    )
    return head.encode("latin-1") + payload


class TimedSocket(socket.socket):
    """A client socket whose blocking mode has a timeout (gthread switches a connection
    between non-blocking, for its poller, and blocking, for the thread serving it).

    Accepted sockets become this class in place (``__class__``), so everything but these two
    methods stays the C socket's own; a read that timed out is remembered by ``id`` until the
    worker closes the connection. A socket whose body a request thread reads (behind ``Expect:
    100-continue``, or handed over before it was whole) has a total deadline in
    :attr:`deadlines`: a read after it raises a timeout as an idle one does.
    """

    __slots__ = ()
    timeout_s = CLIENT_IDLE_TIMEOUT_S  # the worker sets its own
    timed_out: ClassVar[set[int]] = set()
    #: ``id`` → monotonic time after which no more of the request may be read.
    deadlines: ClassVar[dict[int, float]] = {}

    def setblocking(self, flag: bool) -> None:
        if flag:
            self.settimeout(self.timeout_s)
        else:
            super().setblocking(False)

    def recv(self, *args: Any) -> bytes:
        deadline = TimedSocket.deadlines.get(id(self))
        if deadline is not None and time.monotonic() > deadline:
            TimedSocket.timed_out.add(id(self))
            raise TimeoutError("the request was not complete within its deadline")
        try:
            return super().recv(*args)
        except TimeoutError:
            TimedSocket.timed_out.add(id(self))
            raise
