"""Slow clients (slowloris) against a real server: connections that trickle a request.

:class:`Tricklers` opens connections to a server and sends each a request one byte at a
time, every ``interval_s``: either the head itself (it never completes) or, after a whole head
with a Content-Length or a chunked one, the body (chunked: a thousand one-byte chunks). It
records how each connection ended: ``"closed"`` when the server closed it with nothing to
say, or the status of the answer it sent. Used by the security tests and the
fault-injection suite.
"""

from __future__ import annotations

import json
import select
import socket
import time
from dataclasses import dataclass, field
from typing import Any

#: A request head that never ends: its last header's value grows one byte at a time.
SLOW_HEAD = b"POST /execute HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nX-Pad: "
#: A whole head that announces a body, which then trickles.
SLOW_BODY_HEAD = (
    b"POST /execute HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    b"Content-Length: 4000\r\n\r\n"
)
#: A whole head of a chunked body, which then trickles (buffered like a Content-Length one).
SLOW_CHUNKED_HEAD = (
    b"POST /execute HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
)


@dataclass
class Trickler:
    sock: socket.socket
    pending: bytes
    received: bytes = b""
    ended: str = ""  # "", "closed", or the status of the server's answer

    def status_and_error(self) -> tuple[int, dict[str, Any]]:
        head, _, body = self.received.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        return status, json.loads(body.decode())["error"] if body else {}


@dataclass
class Tricklers:
    host: str
    port: int
    interval_s: float = 2.0
    conns: list[Trickler] = field(default_factory=list)

    def open(self, count: int, *, body: bool, chunked: bool = False) -> None:
        """``count`` connections: each sends the first byte of a head (or a whole head, with
        ``body``; chunked with ``chunked``) now, and one more byte per :meth:`tick`."""
        for _ in range(count):
            sock = socket.create_connection((self.host, self.port), timeout=5)
            sock.setblocking(False)
            if chunked:
                first, rest = SLOW_CHUNKED_HEAD, b"1\r\n \r\n" * 1000
            elif body:
                first, rest = SLOW_BODY_HEAD, b"{" + b" " * 3999
            else:
                first, rest = SLOW_HEAD[:1], SLOW_HEAD[1:] + b"a" * 10_000
            sock.send(first)
            self.conns.append(Trickler(sock, rest))

    @property
    def open_count(self) -> int:
        return sum(1 for c in self.conns if not c.ended)

    def tick(self) -> None:
        """Read what the server sent (an answer, or the end), then send one more byte each."""
        live = [c for c in self.conns if not c.ended]
        if live:
            readable, _, _ = select.select([c.sock for c in live], [], [], 0)
            for conn in live:
                if conn.sock in readable:
                    self._read(conn)
        for conn in self.conns:
            if conn.ended or not conn.pending:
                continue
            try:
                conn.sock.send(conn.pending[:1])
                conn.pending = conn.pending[1:]
            except BlockingIOError:
                pass
            except OSError:  # reset by the server
                conn.ended = conn.ended or "closed"

    def _read(self, conn: Trickler) -> None:
        try:
            while True:
                data = conn.sock.recv(65536)
                if not data:
                    break
                conn.received += data
        except BlockingIOError:
            return  # more may come; the next tick reads it
        except OSError:
            pass  # reset: the server closed it
        if conn.received.startswith(b"HTTP/1."):
            conn.ended = conn.received.split(b" ", 2)[1].decode()
        else:
            conn.ended = "closed"

    def run_until_all_end(self, limit_s: float, on_tick: Any = None) -> None:
        """Tick every ``interval_s`` until every connection ended, for ``limit_s`` at most."""
        stop = time.monotonic() + limit_s
        while self.open_count and time.monotonic() < stop:
            self.tick()
            if on_tick is not None:
                on_tick()
            time.sleep(self.interval_s)
        self.tick()

    def close(self) -> None:
        for conn in self.conns:
            conn.sock.close()
