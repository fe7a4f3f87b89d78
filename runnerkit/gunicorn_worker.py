"""gunicorn's gthread worker, with two things a runner needs that gthread lacks.

- **Its own errors as envelopes.** Some requests never reach the app: a malformed request
  line or header, a URL or headers over gunicorn's limits (414, 431), an unsupported
  transfer coding (501). gunicorn answers those with a small HTML page; every other error of
  a runner or the forge is a contract ErrorEnvelope. :class:`ThreadWorker` lets gunicorn
  decide the status as always and rewrites only the page: the same status line, a JSON
  ``{"success": false, "error": ...}`` body.
- **Clients that stall.** gthread reads a request on a blocking socket with no timeout, so a
  client that sends half its headers and waits holds a thread for ever; a few dozen of them
  take every thread, ``/health`` included. Here the socket's blocking mode has a timeout
  (``RUNNERKIT_CLIENT_IDLE_TIMEOUT_S``): a read or write without progress for that long
  ends the connection (a body read in the app answers 400 instead).

``deploy/gunicorn.conf.py`` and the forge's command use it (``worker_class``).
"""

from __future__ import annotations

import html
import json
import re
import socket
from typing import Any, ClassVar

from gunicorn import util
from gunicorn.workers import gthread

from runnerkit.errors import make_envelope
from runnerkit.http import CLIENT_IDLE_TIMEOUT_S, HTTP_ERRORS

_STATUS_LINE = re.compile(rb"^HTTP/1\.[01] (\d{3}) ([^\r\n]*)")
#: gunicorn's page: <html>…<h1><p>reason</p></h1> message </body></html>.
_MESSAGE = re.compile(r"</h1>(.*?)</body>", re.DOTALL)


class _EnvelopeSocket:
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


class _TimedSocket(socket.socket):
    """A client socket whose blocking mode has a timeout (gthread switches a connection
    between non-blocking, for its poller, and blocking, for the thread serving it).

    Accepted sockets become this class in place (``__class__``), so everything but these two
    methods stays the C socket's own; a read that timed out is remembered by ``id`` until the
    worker closes the connection.
    """

    __slots__ = ()
    timeout_s = CLIENT_IDLE_TIMEOUT_S  # the worker sets its own
    timed_out: ClassVar[set[int]] = set()

    def setblocking(self, flag: bool) -> None:
        if flag:
            self.settimeout(self.timeout_s)
        else:
            super().setblocking(False)

    def recv(self, *args: Any) -> bytes:
        try:
            return super().recv(*args)
        except TimeoutError:
            _TimedSocket.timed_out.add(id(self))
            raise


class ThreadWorker(gthread.ThreadWorker):
    """gthread, with its own error pages as ErrorEnvelopes and a timeout for stalled clients."""

    def load_wsgi(self) -> None:
        super().load_wsgi()
        _TimedSocket.timeout_s = self._client_timeout()  # the app's setting, once it is loaded

    def enqueue_req(self, conn: Any) -> None:
        if type(conn.sock) is socket.socket and not self.cfg.is_ssl:
            conn.sock.__class__ = _TimedSocket
        super().enqueue_req(conn)

    def handle_error(self, req: Any, client: Any, addr: Any, exc: BaseException) -> None:
        super().handle_error(req, _EnvelopeSocket(client, self._service()), addr, exc)

    def finish_request(self, conn: Any, fs: Any) -> None:
        sock = conn.sock
        if id(sock) in _TimedSocket.timed_out:
            # gthread would close "gracefully", waiting up to 2 s on its main loop for the
            # client to close first: a client that stopped talking would stall the worker.
            _TimedSocket.timed_out.discard(id(sock))
            self.nr_conns -= 1
            util.close(sock)
            return
        super().finish_request(conn, fs)

    def _client_timeout(self) -> float:
        extensions = getattr(getattr(self, "wsgi", None), "extensions", {}) or {}
        runner = extensions.get("runnerkit")
        if runner is not None:
            return float(runner.settings.client_idle_timeout_s)
        return CLIENT_IDLE_TIMEOUT_S

    def _service(self) -> str:
        """The ``service`` of the envelope: the runner's name or the forge's service name."""
        extensions = getattr(getattr(self, "wsgi", None), "extensions", {}) or {}
        runner = extensions.get("runnerkit")
        if runner is not None:
            return str(runner.name)
        forge = extensions.get("forge")
        if forge is not None:
            return str(forge.settings.service_name)
        return "runnerkit"
