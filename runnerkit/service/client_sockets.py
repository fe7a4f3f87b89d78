"""The client socket as the gunicorn worker wraps it: JSON error pages, reads with a timeout.

gunicorn answers requests that never reach the app (a malformed head, 414, 431, 501) with a
small HTML page; :class:`EnvelopeSocket` rewrites it as an ErrorEnvelope on its way out
(:func:`envelope_response`). gthread reads a request on a blocking socket with no timeout;
:class:`TimedSocket` gives the blocking mode a timeout and a total deadline per request, so
a stalled client cannot hold a thread for ever, and switches modes without system calls.
Both are :class:`ThreadWorker`'s (:mod:`runnerkit.service.gunicorn_worker`).
"""

from __future__ import annotations

import html
import json
import math
import re
import select
import socket
import time
from typing import Any

from runnerkit.errors import make_envelope
from runnerkit.service import libc_calls
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
    """A client socket whose blocking mode has a timeout, switched without system calls.

    gthread switches a connection between non-blocking (for its poller) and blocking (for
    the thread serving it), and gunicorn sets a timeout around every drain of a request's
    body: four mode changes per request. CPython makes each one an ``ioctl`` with the GIL
    given up, and under load every release of the GIL costs the thread two context switches
    to get it back. So here the descriptor stays non-blocking for the connection's life and
    the mode is this object's own (:attr:`_rk_timeout`: 0 non-blocking, ``None`` blocking, a
    number the longest wait without progress). A read or write that would block waits in
    ``poll`` for that long (a timeout then raises ``TimeoutError``, as the socket's own
    would), so a stalled client cannot hold a thread for ever. The response goes out in one
    ``send`` that keeps the GIL (it never waits: the descriptor does not block); what does
    not fit waits for room as above.

    A socket whose body a request thread reads (behind ``Expect: 100-continue``, or handed
    over before it was whole) has a total deadline (:attr:`rk_deadline`): a read after it,
    or a wait that would pass it, raises a timeout as an idle one does. :attr:`timed_out`
    says a read timed out, for the worker to close the connection at once.
    """

    __slots__ = ("_rk_timeout", "rk_deadline", "timed_out")
    timeout_s = CLIENT_IDLE_TIMEOUT_S  # the worker sets its own

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        super().settimeout(0.0)  # the descriptor's mode, once for the connection
        self._rk_timeout: float | None = 0.0
        #: Monotonic time after which no more of the request may be read (None: no deadline).
        self.rk_deadline: float | None = None
        self.timed_out = False

    @classmethod
    def adopt(cls, sock: socket.socket) -> TimedSocket:
        """``sock``'s connection as a TimedSocket, in non-blocking mode (``sock`` is
        detached: it no longer owns the descriptor)."""
        family, kind, proto = sock.family, sock.type, sock.proto
        return cls(family, kind, proto, sock.detach())

    # -- the mode, without system calls ------------------------------------------------

    def setblocking(self, flag: bool) -> None:
        self._rk_timeout = self.timeout_s if flag else 0.0

    def getblocking(self) -> bool:
        return self._rk_timeout != 0.0

    def settimeout(self, value: float | None) -> None:
        if value is not None:
            value = float(value)
            if value < 0.0:
                raise ValueError("Timeout value out of range")
        self._rk_timeout = value

    def gettimeout(self) -> float | None:
        return self._rk_timeout

    # -- reads and writes that wait in poll when the mode says so -----------------------

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        while True:
            self._check_deadline()
            try:
                return super().recv(bufsize, flags)
            except BlockingIOError:
                if self._rk_timeout == 0.0:
                    raise
            self._wait(select.POLLIN, reading=True)

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        while True:
            self._check_deadline()
            try:
                return super().recv_into(buffer, nbytes, flags)
            except BlockingIOError:
                if self._rk_timeout == 0.0:
                    raise
            self._wait(select.POLLIN, reading=True)

    def send(self, data: Any, flags: int = 0) -> int:
        while True:
            try:
                return super().send(data, flags)
            except BlockingIOError:
                if self._rk_timeout == 0.0:
                    raise
            self._wait(select.POLLOUT)

    def sendall(self, data: Any, flags: int = 0) -> None:
        if self._rk_timeout == 0.0:
            super().sendall(data, flags)  # the non-blocking socket's own: may raise
            return
        if type(data) is not bytes:
            data = bytes(data)
        try:
            # The usual case: all of it fits in the socket's buffer, in one call.
            sent = libc_calls.send(self.fileno(), data, flags)
        except (BlockingIOError, InterruptedError):
            sent = 0
        rest = memoryview(data)[sent:]
        while rest:
            try:
                sent = super().send(rest, flags)
            except (BlockingIOError, InterruptedError):
                self._wait(select.POLLOUT)
                continue
            rest = rest[sent:]

    def _check_deadline(self) -> None:
        if self.rk_deadline is not None and time.monotonic() > self.rk_deadline:
            self.timed_out = True
            raise TimeoutError("the request was not complete within its deadline")

    def _wait(self, events: int, *, reading: bool = False) -> None:
        """Wait until the socket is ready for ``events``, at most the mode's timeout (and,
        for a read, until the request's deadline); ``TimeoutError`` if it is not."""
        timeout = self._rk_timeout
        if reading and self.rk_deadline is not None:
            left = self.rk_deadline - time.monotonic()
            timeout = left if timeout is None else min(timeout, left)
        poller = select.poll()
        poller.register(self, events)
        if timeout is not None and (
            timeout <= 0.0 or not poller.poll(max(1, math.ceil(timeout * 1000)))
        ):
            if reading:
                self.timed_out = True
            raise TimeoutError("timed out")
        if timeout is None:
            poller.poll()
