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

- **Clients that trickle.** An idle timeout alone does not stop a client that sends one byte
  every few seconds (slowloris): 40 of them held every thread. So the worker's main loop
  reads each request's head, and a body with a Content-Length within the app's body limit,
  with non-blocking reads, and hands the connection to a request thread only once all of it
  is in: a slow client costs a selector entry, not a thread, and ``/health`` keeps
  answering. The head has ``RUNNERKIT_CLIENT_HEADER_TIMEOUT_S`` in all, the body
  ``RUNNERKIT_CLIENT_BODY_TIMEOUT_S``, and neither may go ``RUNNERKIT_CLIENT_IDLE_TIMEOUT_S``
  without a byte; a connection past a deadline is closed (after a 400 ``BODY_UNREADABLE``
  envelope when its head had come). A chunked body is buffered too, up to its last chunk and
  trailers (:func:`scan_chunked` walks the chunks as they arrive, each chunk once, and stops
  waiting at malformed framing or a body over the app's limit: gunicorn's parser and the app
  answer those, 400 and 413). A body behind ``Expect: 100-continue`` is read by the request
  thread, under the same total deadline (the reads raise a timeout past it: a 400 from
  :func:`runnerkit.http.read_body`): its client sends the body only after gunicorn's
  ``100 Continue``, which gunicorn sends when a thread takes the request, so waiting for that
  body on the main loop would stall both sides until the deadline. A request that arrives
  whole, the usual case, costs one non-blocking read and a scan of its head on the main loop
  (a chunked one also a walk over its chunk-size lines), and its thread then parses from
  memory instead of reading the socket.

``deploy/gunicorn.conf.py`` and the forge's command use it (``worker_class``).

The socket wrappers are :mod:`runnerkit.service.client_sockets`, the walk over a chunked body
:mod:`runnerkit.service.chunked_framing`; sizing a runner's threads is
:mod:`runnerkit.runner.thread_fitting`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import queue
import selectors
import socket
import time
from functools import partial
from typing import Any

from gunicorn import http, util
from gunicorn.workers import gthread

from runnerkit.errors import make_envelope
from runnerkit.service import gil_selector, libc_calls, new_connections
from runnerkit.service.chunked_framing import CHUNKED_MORE, DEFAULT_BODY_CAP, scan_chunked
from runnerkit.service.client_sockets import EnvelopeSocket, TimedSocket
from runnerkit.service.http_date import http_date
from runnerkit.service.request_threads import RequestThreads, Task
from runnerkit.service.settings import CLIENT_TIMEOUT_SETTINGS, PREFIX, resolve

#: The settings the worker reads (from the runner's settings, or the environment for the forge).
_TIMEOUTS = ("CLIENT_IDLE_TIMEOUT_S", "CLIENT_HEADER_TIMEOUT_S", "CLIENT_BODY_TIMEOUT_S")
#: How often the main loop looks for connections past their deadline (seconds).
SWEEP_INTERVAL_S = 0.25
#: How often, at most, the main loop tells the arbiter it lives (seconds; gunicorn's
#: ``timeout`` is 30 s by default, the runner's 120).
NOTIFY_INTERVAL_S = 0.5
#: Largest single non-blocking read while buffering a request.
READ_SIZE = 65536
#: Most bytes a worker holds for requests being buffered, all connections together. Past it
#: a request is handed to a thread as it is (its reads then under the same total deadline),
#: so many clients sending large bodies at once cost threads, as before, not memory.
BUFFER_BUDGET = 64 * 1024 * 1024

#: ``rk_need`` of a chunked body not yet whole: beyond any buffer, so it is not "all in".
_UNKNOWN = 1 << 62


class MethodQueue(gthread.PollableMethodQueue):
    """gthread's queue of work for the main loop, its wake-up byte written keeping the GIL.

    Every request ends with one (its connection goes back to the main loop); ``os.write``
    would give the GIL up around a write to a non-blocking pipe, which never waits, and
    under load the request thread would then wait for the GIL again (two context switches).
    """

    def defer(self, callback: Any, *args: Any) -> None:
        self._queue.put(partial(callback, *args))
        with contextlib.suppress(OSError):  # a full pipe: the main loop drains the queue anyway
            libc_calls.write(self._write_fd, b"\x00")

    def run_callbacks(self, _fileobj: Any, max_callbacks: int = 50) -> None:
        """gthread's, the wake-up bytes read keeping the GIL (the pipe does not block)."""
        try:
            woken = len(self._wakeups.read(self._read_fd, max_callbacks))
        except OSError:
            return
        for _ in range(woken + 10):  # +10: wake-up bytes a full pipe dropped
            try:
                callback = self._queue.get_nowait()
            except queue.Empty:
                break
            callback()

    @functools.cached_property
    def _wakeups(self) -> libc_calls.ReadBuffer:
        return libc_calls.ReadBuffer(64)


class ThreadWorker(gthread.ThreadWorker):
    """gthread, with its own error pages as ErrorEnvelopes, a timeout for stalled clients and
    requests buffered on the main loop until they are whole (see the module's docstring).

    A connection being buffered is a :class:`gthread.TConn` with more attributes: ``rk_buf``
    (what arrived), ``rk_need`` (bytes that make the request whole, -1 until the head is in;
    for a chunked body, unknown, :data:`_UNKNOWN` until its last chunk is in), ``rk_scan``
    (where to look for the head's end next), ``rk_stream`` (a body the request thread reads
    itself), ``rk_chunk`` and ``rk_data`` (for a chunked body being buffered: where its next
    chunk-size line starts, -1 otherwise, and its data bytes so far), ``rk_deadline`` (the
    total one) and ``rk_idle`` (the idle timeout's, from the last byte). It is in
    :attr:`_buffering` and, while it waits for bytes, registered with the poller. Only the
    main loop touches them.
    """

    poller: selectors.BaseSelector

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.method_queue = MethodQueue()
        self._buffering: dict[Any, bool] = {}  # conn → registered with the poller
        self._reads = libc_calls.ReadBuffer(READ_SIZE)  # the main loop's
        self._buffered = 0  # bytes held in their rk_buf, all together
        self._next_sweep = 0.0
        self._next_notify = 0.0
        self._next_parent_check = 0.0
        util.http_date = http_date  # every response's Date header, made once a second
        self._header_timeout_s = 10.0
        self._body_timeout_s = 30.0
        self._body_cap = DEFAULT_BODY_CAP
        cfg = self.cfg
        line = cfg.limit_request_line if cfg.limit_request_line > 0 else 8190
        fields = cfg.limit_request_fields if cfg.limit_request_fields > 0 else 100
        field_size = cfg.limit_request_field_size if cfg.limit_request_field_size > 0 else 8190
        #: Beyond this a head cannot be valid: hand it over and let gunicorn answer 414/431.
        #: (Trailers of a chunked body have the same bound.)
        self._head_cap = line + (fields + 1) * (field_size + 2) + 4
        #: A longer chunk-size line is gunicorn's to refuse.
        self._line_cap = field_size
        #: TLS and HTTP/2 prior knowledge read the socket before HTTP/1 parsing: no buffering.
        self._buffers = not cfg.is_ssl and getattr(cfg, "http2_cleartext", "off") in (
            "off",
            "upgrade",
            False,
            None,
        )

    def run(self) -> None:
        """gthread's loop, on a poller whose registrations keep the GIL (``gil_selector``)."""
        self.poller.close()  # gthread's, made in init_process; nothing is registered yet
        self.poller = gil_selector.poller()
        new_connections.attach(self)
        super().run()

    def set_accept_enabled(self, enabled: bool) -> None:
        """gthread's, except that a process yielding to its siblings takes no new connection
        (:mod:`~runnerkit.service.new_connections`). gthread's loop calls it at every turn
        where the flag and the poller disagree."""
        super().set_accept_enabled(enabled and not new_connections.yielding)

    def yielding_changed(self) -> None:
        """Have the main loop follow :data:`new_connections.yielding` now (from any thread)."""
        self.method_queue.defer(self._follow_yielding)

    def _follow_yielding(self) -> None:
        if self._accepting and new_connections.yielding:
            self.set_accept_enabled(False)
        # Else, when accepting again, gthread's loop turns to it now (``can_accept`` differs
        # from ``_accepting``).

    def notify(self) -> None:
        """Tell the arbiter this worker lives, at most every :data:`NOTIFY_INTERVAL_S` (or
        a tenth of gunicorn's ``timeout``): gthread does at every turn of its loop, a
        ``utime`` that gives the GIL up, several times per request under load."""
        now = time.monotonic()
        if now >= self._next_notify:
            timeout = float(self.cfg.timeout or 0)
            self._next_notify = now + (
                min(NOTIFY_INTERVAL_S, timeout / 10) if timeout > 0 else NOTIFY_INTERVAL_S
            )
            super().notify()

    def is_parent_alive(self) -> bool:
        """gthread's (has the arbiter changed?), asked at every turn of the loop: looked at
        as often as the arbiter is told the worker lives (:meth:`notify`), not per request."""
        now = time.monotonic()
        if now < self._next_parent_check:
            return True
        self._next_parent_check = now + NOTIFY_INTERVAL_S
        return bool(super().is_parent_alive())

    def get_thread_pool(self) -> RequestThreads:
        """``threads`` kept hot; a runner raises the ceiling to fit its capabilities."""
        return RequestThreads(int(self.cfg.threads))

    def load_wsgi(self) -> None:
        super().load_wsgi()
        # The app's settings, once it is loaded.
        idle, header, body = self._client_timeouts()
        TimedSocket.timeout_s = idle
        self._header_timeout_s, self._body_timeout_s = header, body
        self._body_cap = self._app_body_cap()

    def enqueue_req(self, conn: Any) -> None:
        if type(conn.sock) is socket.socket and not self.cfg.is_ssl:
            conn.sock = TimedSocket.adopt(conn.sock)  # a new connection (not yet polled)
        if not self._buffers:
            self._to_thread(conn)
            return
        # Read ahead by the last request (pipelined): the start of this one.
        buf = conn.parser.unreader.take_buffered() if conn.parser is not None else b""
        conn.rk_buf = buf
        conn.rk_need = -1
        conn.rk_scan = 0
        conn.rk_stream = False
        self._buffered += len(buf)
        now = time.monotonic()
        conn.rk_deadline = now + self._header_timeout_s
        conn.rk_idle = now + TimedSocket.timeout_s
        self._buffering[conn] = False
        if buf and self._whole(conn):
            self._hand_over(conn)
        else:
            self._fill(conn)

    # -- buffering on the main loop -----------------------------------------------------

    def _fill(self, conn: Any) -> None:
        """Read what the client has sent so far without blocking; hand the connection over
        once its request is whole, else wait (registered with the poller) for more."""
        sock, buf = conn.sock, conn.rk_buf
        # The GIL kept only on a TimedSocket, whose descriptor never blocks: a read that
        # waited with it held would stop the whole worker.
        read = partial(self._reads.read, sock.fileno()) if type(sock) is TimedSocket else None
        while True:
            try:
                data = read() if read is not None else sock.recv(READ_SIZE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._drop(conn)
                return
            if not data:
                # The client closed its side: what came is all there is, let the parser
                # judge it (a body shorter than its Content-Length is a 400).
                if buf:
                    self._hand_over(conn)
                else:
                    self._drop(conn)
                return
            if not buf:
                buf = data  # the usual case: the whole request in one read, never copied
            else:
                if type(buf) is bytes:
                    buf = bytearray(buf)  # a request in pieces: appended in place
                buf += data
            conn.rk_buf = buf
            self._buffered += len(data)
            conn.rk_idle = time.monotonic() + TimedSocket.timeout_s
            if self._whole(conn):
                self._hand_over(conn)
                return
        if not self._buffering[conn]:
            self.poller.register(sock, selectors.EVENT_READ, partial(self._on_readable, conn))
            self._buffering[conn] = True

    def _on_readable(self, conn: Any, _sock: Any) -> None:
        self._fill(conn)

    def _whole(self, conn: Any) -> bool:
        """Whether the buffered bytes make the request whole (or as much as is buffered).

        The head is whole at its blank line; a Content-Length body within the app's limit is
        waited for too, and so is a chunked body (``Transfer-Encoding: chunked`` alone, HTTP/1.1,
        no Content-Length) up to its end, or to malformed framing or data over the limit.
        Anything else (``Expect``, other or conflicting codings, no or an invalid length, a
        body over the limit, a head too large to be valid) is handed over after the head, for
        the request thread and gunicorn's parser to read or refuse as they always do; so is
        what arrived so far once the worker holds :data:`BUFFER_BUDGET` bytes.
        """
        buf = conn.rk_buf
        if self._buffered > BUFFER_BUDGET:
            return True
        if conn.rk_need < 0:
            # Only what came since the last look is searched: a head in many small pieces
            # costs linear time, not quadratic.
            end = buf.find(b"\r\n\r\n", conn.rk_scan)
            if end < 0:
                # Too long to be valid, or a head ended by bare LFs: gunicorn's verdict.
                if len(buf) > self._head_cap or buf.find(b"\n\n", conn.rk_scan) >= 0:
                    return True
                conn.rk_scan = max(0, len(buf) - 3)
                return False
            head = buf[:end].lower()
            # A body the request thread reads from the socket itself (after "100 Continue",
            # or a coding this does not buffer): handed over after the head, its reads under
            # a deadline.
            conn.rk_stream = b"\nexpect:" in head
            if b"\ntransfer-encoding:" in head:
                conn.rk_stream = conn.rk_stream or not self._chunked_alone(head)
                if not conn.rk_stream:
                    conn.rk_chunk, conn.rk_data = end + 4, 0
                    conn.rk_need = _UNKNOWN
                    conn.rk_deadline = time.monotonic() + self._body_timeout_s
                    return self._chunks_whole(conn)
            body = 0 if conn.rk_stream else self._body_length(head)
            conn.rk_need = end + 4 + body
            conn.rk_chunk = -1
            if body:
                conn.rk_deadline = time.monotonic() + self._body_timeout_s
        elif conn.rk_chunk >= 0:
            return self._chunks_whole(conn)
        return len(buf) >= conn.rk_need

    def _chunks_whole(self, conn: Any) -> bool:
        """Whether a chunked body is in (or must be handed over as it is: malformed framing,
        for gunicorn's parser to refuse; data over the app's limit, for the app's 413). Only
        the chunks that came since the last look are walked."""
        verdict, conn.rk_chunk, conn.rk_data = scan_chunked(
            conn.rk_buf,
            conn.rk_chunk,
            conn.rk_data,
            cap=self._body_cap,
            line_cap=self._line_cap,
            trailer_cap=self._head_cap,
        )
        if verdict >= 0:
            conn.rk_need = verdict  # all of it in: the thread never reads the socket for it
        return verdict != CHUNKED_MORE

    @staticmethod
    def _chunked_alone(head: bytes) -> bool:
        """Whether a head (lower-cased) frames its body as gunicorn would read it chunked and
        nothing else: HTTP/1.1, one ``Transfer-Encoding: chunked``, no Content-Length. Other
        heads gunicorn refuses or reads differently; they are handed over as before."""
        start = head.find(b"\ntransfer-encoding:") + 20
        stop = head.find(b"\n", start)
        value = head[start : stop if stop >= 0 else len(head)].strip()
        return (
            value == b"chunked"
            and head.find(b"\ntransfer-encoding:", start) < 0
            and b"\ncontent-length:" not in head
            and head[: head.find(b"\n")].rstrip(b"\r").endswith(b" http/1.1")
        )

    def _body_length(self, head: bytes) -> int:
        """How many body bytes to buffer after the head (lower-cased, without its blank line)."""
        start = head.find(b"\ncontent-length:")
        if start < 0:
            return 0
        end = head.find(b"\n", start + 16)
        value = head[start + 16 : end if end >= 0 else len(head)].strip()
        if not value.isdigit() or len(value) > 18:
            return 0
        length = int(value)
        return length if length <= self._body_cap else 0

    def _hand_over(self, conn: Any) -> None:
        """Give a connection whose request is in to a request thread, the bytes in front."""
        if self._buffering.pop(conn):
            self.poller.unregister(conn.sock)
        buf = conn.rk_buf
        conn.rk_buf = None
        self._buffered -= len(buf)
        if conn.parser is None:
            # What TConn.init does for plain HTTP/1 (the only kind buffered), done here so the
            # buffered bytes can be put in front of the socket.
            conn.parser = http.get_parser(self.cfg, conn.sock, conn.client)
        if buf:
            conn.parser.unreader.unread(buf if type(buf) is bytes else bytes(buf))
        if conn.rk_need >= 0 and conn.rk_stream:
            conn.sock.rk_deadline = time.monotonic() + self._body_timeout_s
        elif conn.rk_need < 0 or len(buf) < conn.rk_need:
            # Handed over before it was whole (the client closed its side, a head over the
            # limit, the budget): the thread's reads keep the deadline it had here.
            conn.sock.rk_deadline = conn.rk_deadline
        conn.data_ready = True
        self._to_thread(conn)

    def _to_thread(self, conn: Any) -> None:
        """gthread's ``enqueue_req`` with a :class:`Task` for its ``Future`` (no lock)."""
        if type(self.tpool) is RequestThreads:
            then = partial(self.method_queue.defer, self.finish_request, conn)
            self.tpool.put(Task(self.handle, conn, then))
        else:
            super().enqueue_req(conn)

    def _drop(self, conn: Any, answer: bytes = b"") -> None:
        """Close a connection being buffered (after ``answer``, sent if the socket takes it)."""
        self._buffered -= len(conn.rk_buf or b"")
        conn.rk_buf = None
        if self._buffering.pop(conn, False):
            with contextlib.suppress(KeyError, ValueError, OSError):
                self.poller.unregister(conn.sock)
        if answer:
            with contextlib.suppress(OSError):
                conn.sock.send(answer)
        self.nr_conns -= 1
        util.close(conn.sock)

    def murder_pending(self) -> None:
        """gthread's sweep, then close connections whose request is past its deadline (and,
        once the worker stops, those that have sent nothing of a request)."""
        super().murder_pending()
        if not self._buffering:
            return
        now = time.monotonic()
        if now < self._next_sweep and self.alive:
            return
        self._next_sweep = now + SWEEP_INTERVAL_S
        expired = [
            c
            for c in self._buffering
            if min(c.rk_deadline, c.rk_idle) <= now or (not self.alive and not c.rk_buf)
        ]
        for conn in expired:
            self._drop(conn, self._body_timeout_answer() if conn.rk_need >= 0 else b"")

    def _body_timeout_answer(self) -> bytes:
        """The 400 of a body that did not arrive in time: what :func:`runnerkit.http.read_body`
        answers a body that stalls in a request thread. (A head that did not arrive in time
        is closed without an answer, as gunicorn does with one that stalls.)"""
        envelope = make_envelope(
            "VALIDATION_ERROR",
            "BODY_UNREADABLE",
            f"The request body did not arrive within {self._body_timeout_s:g} s "
            f"(or {TimedSocket.timeout_s:g} s passed without a byte)",
            service=self._service(),
        )
        payload = json.dumps({"success": False, "error": envelope}, separators=(",", ":"))
        head = (
            "HTTP/1.1 400 Bad Request\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
        )
        return (head + payload).encode("latin-1")

    # -- gthread's hooks ----------------------------------------------------------------

    def handle_error(self, req: Any, client: Any, addr: Any, exc: BaseException) -> None:
        super().handle_error(req, EnvelopeSocket(client, self._service()), addr, exc)

    def finish_request(self, conn: Any, fs: Any) -> None:
        sock = conn.sock
        if type(sock) is TimedSocket:
            sock.rk_deadline = None
            if sock.timed_out:
                # gthread would close "gracefully", waiting up to 2 s on its main loop for
                # the client to close first: a client that stopped talking would stall it.
                self.nr_conns -= 1
                util.close(sock)
                return
        super().finish_request(conn, fs)

    def _client_timeouts(self) -> tuple[float, float, float]:
        """The idle, head and body timeouts: the runner's settings, else the environment's."""
        extensions = getattr(getattr(self, "wsgi", None), "extensions", {}) or {}
        runner = extensions.get("runnerkit")
        if runner is not None:
            values = {name: getattr(runner.settings, name.lower()) for name in _TIMEOUTS}
        else:
            values = resolve(CLIENT_TIMEOUT_SETTINGS, PREFIX)
        return tuple(float(values[name]) for name in _TIMEOUTS)  # type: ignore[return-value]

    def _app_body_cap(self) -> int:
        """The app's body limit (Flask's MAX_CONTENT_LENGTH, the forge's own; else the
        runner's MAX_BODY_BYTES), beyond which a body is not buffered but refused by the app
        (413)."""
        app = getattr(self, "wsgi", None)
        config = getattr(app, "config", None) or {}
        limit = config.get("MAX_CONTENT_LENGTH")
        if isinstance(limit, int) and limit > 0:
            return int(limit)
        runner = (getattr(app, "extensions", None) or {}).get("runnerkit")
        if runner is not None:
            return int(runner.settings.max_body_bytes)
        return DEFAULT_BODY_CAP

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
