"""The dispatcher's HTTP to runners: keep-alive connections, peer checks, answer limits.

Only the mechanics of one ``POST <runner base>/execute`` and its answer live here (what is
sent, and what the answer means, is :mod:`.sending`'s). The forge sends every job this way,
so this is http.client directly, one keep-alive connection per send thread and runner: see
:meth:`Connections._post`. A new connection whose peer address ALLOWED_RUNNER_NETWORKS
refuses is closed unused (:mod:`.targets`), an answer longer than MAX_ANSWER_BYTES is not
read, and a request the runner never read (its idle keep-alive connection closed just as it
was sent) is sent once more on a new connection.

:class:`Connections` is one part of :class:`~.dispatcher.Dispatcher` (a base class, not an
object of its own, so the send path costs no extra lookup); its state is set up in
``Dispatcher.__init__``.
"""

from __future__ import annotations

import http.client
import logging
import os
import select
import socket
import ssl
import threading
import time
from collections.abc import Mapping
from urllib.parse import urlsplit

from .answers import Answer, AnswerHeaders
from .targets import TargetPolicy

log = logging.getLogger("runnerkit.forge.dispatcher")

#: A runner's response headers (``get`` ignores case).
Headers = AnswerHeaders | http.client.HTTPMessage | Mapping[str, str]

#: How long a probe's new connection to a runner must stay open to count (see _connects).
PROBE_HOLD_S = 0.25

#: How long a reused connection that ended without an answer is watched for the reset that
#: shows the request reached a closed socket (a round trip, on the failure path only).
RESET_WAIT_S = 0.05


class ConnectFailed(Exception):
    """No connection to the runner could be made (the cause says why)."""


class TargetRefused(Exception):
    """The connection reached an address runners may not have (``args[0]``)."""


class _NotTaken(Exception):
    """The runner closed the connection without reading the request (the cause says how)."""


def _await_answer(conn: http.client.HTTPConnection, read_s: float) -> None:
    """Wait for the first byte of the answer on a reused plain connection.

    :class:`_NotTaken` when the runner had closed the connection without reading the request:
    a peer that closed its socket resets the connection when the request reaches it, at
    once or just after the end of the stream shows. An end of the stream with no reset is
    a runner that read the request and then closed (a worker that died running the job):
    that is left to ``getresponse`` (``RemoteDisconnected``, the attempt's failure).
    """
    sock = conn.sock
    if sock is None or isinstance(sock, ssl.SSLSocket):  # TLS records cannot be peeked
        return
    poller = select.poll()
    poller.register(sock, select.POLLIN | select.POLLERR | select.POLLHUP)
    if not poller.poll(read_s * 1000.0):
        raise TimeoutError("no answer")
    try:
        if sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b"":
            return  # the answer is arriving
    except BlockingIOError:
        return
    except OSError as exc:  # reset: the request was not read
        raise _NotTaken() from exc
    deadline = time.monotonic() + RESET_WAIT_S
    while True:
        error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            raise _NotTaken() from OSError(error, os.strerror(error))
        if time.monotonic() >= deadline:
            return
        time.sleep(RESET_WAIT_S / 10)


class AnswerTooLarge(Exception):
    """The runner's answer is longer than MAX_ANSWER_BYTES (``args[0]`` says how it showed)."""


def _connection(base_url: str, timeout: float) -> http.client.HTTPConnection:
    parts = urlsplit(base_url)
    host, port = parts.hostname or "", parts.port
    conn: http.client.HTTPConnection
    if parts.scheme == "https":
        conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=_tls())
    else:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
    conn.response_class = Answer  # headers read without the email package
    return conn


def _peer(conn: http.client.HTTPConnection) -> str:
    """The IP address a connection's socket is connected to ('' when unknown)."""
    try:
        return str(conn.sock.getpeername()[0]) if conn.sock is not None else ""
    except (OSError, IndexError):
        return ""


def _path(base_url: str) -> str:
    return urlsplit(base_url).path.rstrip("/")


_TLS: ssl.SSLContext | None = None


def _tls() -> ssl.SSLContext:
    global _TLS
    if _TLS is None:
        try:
            import certifi  # what requests verified with

            _TLS = ssl.create_default_context(cafile=certifi.where())
        except ImportError:
            _TLS = ssl.create_default_context()
    return _TLS


def _dropped(conn: http.client.HTTPConnection) -> bool:
    """Whether an idle keep-alive connection was closed (or sent something unasked)."""
    sock = conn.sock
    if sock is None:
        return True
    try:
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        return bool(poller.poll(0))
    except (OSError, ValueError):
        return True


class Connections:
    """Each send thread's HTTP connections to runners (a part of the Dispatcher)."""

    # Set up in Dispatcher.__init__.
    _http: threading.local
    reconnects: int
    targets: TargetPolicy
    max_answer: int

    def _post(
        self, base_url: str, body: bytes, headers: dict[str, str], connect_s: float, read_s: float
    ) -> tuple[int, Headers, bytes]:
        """``POST <base_url>/execute`` on this thread's keep-alive connection to that runner.

        http.client directly (neither requests nor urllib3): the forge sends every job this
        way and their layers above http.client (request preparation, hooks, the proxy and
        netrc look-ups, pool keys, retry objects) cost more CPU than the request itself.
        What those gave that is kept: keep-alive connections (one per send thread and runner),
        a connection the runner closed while idle is not reused, separate connect and read
        timeouts, certificates checked for https (certifi's bundle when it is installed).
        Redirects are not followed and proxies from the environment are not used.

        A runner may close an idle keep-alive connection just as the forge sends on it (its
        idle timeout): when a reused connection shows the runner closed it without reading
        the request (see :meth:`_exchange`), the request is sent once more on a new
        connection (``/execute`` is idempotent per ``jobId`` in any case). Nothing else is
        retried here (an attempt is retried by the job's RetryPolicy): a request the runner
        read before the connection ended may have run, so that is the attempt's failure.

        Raises :class:`ConnectFailed` when no connection could be made, ``TimeoutError`` when
        the runner did not answer in ``read_s``, ``OSError`` or ``HTTPException`` when the
        connection broke.
        """
        connections: dict[str, http.client.HTTPConnection] = self._http.__dict__.setdefault(
            "connections", {}
        )
        conn = connections.pop(base_url, None)
        if conn is not None and _dropped(conn):
            conn.close()
            conn = None
        if conn is not None:
            try:
                return self._exchange(connections, base_url, conn, body, headers, read_s)
            except _NotTaken:
                self.reconnects += 1
                log.info("a kept-alive connection to %s was closed; sending again", base_url)
        conn = self._connect(base_url, connect_s)
        return self._exchange(connections, base_url, conn, body, headers, read_s, reused=False)

    def _connect(self, base_url: str, connect_s: float) -> http.client.HTTPConnection:
        """A new connection to the runner, its peer checked (see :meth:`_post`)."""
        conn = _connection(base_url, connect_s)
        try:
            conn.connect()
        except OSError as exc:
            conn.close()
            raise ConnectFailed() from exc
        # The address really connected to, not the one a name resolved to before.
        peer = _peer(conn)
        if not self.targets.allows(peer, conn.host):
            conn.close()
            raise TargetRefused(f"{conn.host} ({peer})")
        return conn

    def _connects(self, base_url: str, connect_s: float) -> bool:
        """Whether a new TCP connection to the runner can be made, and stays open a moment.

        A runner dying as it is probed may still complete the handshake from its listening
        socket's backlog, then reset it as the socket closes: a connection that is closed
        (or sent anything unasked) within PROBE_HOLD_S counts as failed.
        """
        parts = urlsplit(base_url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            with socket.create_connection((parts.hostname or "", port), connect_s) as sock:
                poller = select.poll()
                poller.register(sock, select.POLLIN | select.POLLHUP | select.POLLERR)
                return not poller.poll(PROBE_HOLD_S * 1000.0)
        except (OSError, ValueError):
            return False

    def _exchange(
        self,
        connections: dict[str, http.client.HTTPConnection],
        base_url: str,
        conn: http.client.HTTPConnection,
        body: bytes,
        headers: dict[str, str],
        read_s: float,
        *,
        reused: bool = True,
    ) -> tuple[int, Headers, bytes]:
        """One request and its answer on ``conn``; kept in ``connections`` if reusable.

        On a ``reused`` connection, :class:`_NotTaken` (its cause the error) when the runner
        closed it without reading the request: the request could not be written, or the
        peer reset the connection (see :func:`_await_answer`). A connection that just ends,
        the runner having read the request (a worker that died running the job), is not:
        that attempt may have run.
        """
        limit = self.max_answer
        try:
            assert conn.sock is not None
            conn.sock.settimeout(read_s)
            try:
                conn.request("POST", _path(base_url) + "/execute", body, headers)
            except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError) as exc:
                if reused:
                    raise _NotTaken() from exc
                raise
            if reused:
                _await_answer(conn, read_s)
            try:
                response = conn.getresponse()
            except http.client.RemoteDisconnected:  # the end of the stream, no reset
                raise
            except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError) as exc:
                if reused:  # reset: the request was not read
                    raise _NotTaken() from exc
                raise
            declared = response.getheader("Content-Length", "")
            if declared.strip().isdigit() and int(declared) > limit:
                raise AnswerTooLarge(f"Content-Length {int(declared)}")
            data = response.read(limit + 1)
            if len(data) > limit:
                raise AnswerTooLarge(f"more than {limit} bytes")
        except BaseException:
            conn.close()  # an unread or half-read answer: the connection is not reused
            raise
        if response.will_close or not response.isclosed():
            conn.close()
        else:
            connections[base_url] = conn
        return response.status, response.headers, data
