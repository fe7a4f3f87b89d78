"""The forge reads a runner's HTTP answer without the email package (``forge.answers``).

A server on loopback writes each answer byte for byte, so framing the runner's gunicorn
would never produce is covered too: header names in any case, repeated and folded fields,
chunked bodies, an interim 100 Continue, HTTP/1.0, and header blocks past http.client's
limits.
"""

from __future__ import annotations

import http.client
import socket
import threading
from collections.abc import Iterator

import pytest

from runnerkit.forge import connections, sending
from runnerkit.forge.answers import MAX_HEADERS, MAX_LINE, Answer


class CannedServer:
    """Accepts connections on loopback and answers every request with the next canned bytes."""

    def __init__(self, answers: list[bytes]) -> None:
        self.answers = list(answers)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.requests = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while self.answers:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                while self.answers:
                    head = b""
                    while b"\r\n\r\n" not in head:
                        chunk = conn.recv(65536)
                        if not chunk:
                            break
                        head += chunk
                    if not head:
                        break
                    # Read the request's body too: a socket closed with unread bytes resets.
                    head, _, body = head.partition(b"\r\n\r\n")
                    length = next(
                        (
                            int(line.split(b":", 1)[1])
                            for line in head.split(b"\r\n")
                            if line.lower().startswith(b"content-length:")
                        ),
                        0,
                    )
                    while len(body) < length:
                        body += conn.recv(65536)
                    self.requests += 1
                    conn.sendall(self.answers.pop(0))

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def serve() -> Iterator[list[CannedServer]]:
    servers: list[CannedServer] = []
    yield servers
    for server in servers:
        server.close()


def _exchange(
    servers: list[CannedServer], *answers: bytes
) -> tuple[http.client.HTTPConnection, list[tuple[http.client.HTTPResponse, bytes]]]:
    """Send one request per canned answer on one dispatcher connection: (response, body)."""
    server = CannedServer(list(answers))
    servers.append(server)
    conn = connections._connection(server.url, 5.0)
    read = []
    for _ in answers:
        conn.request("POST", "/execute", b"{}", {"Content-Type": "application/json"})
        response = conn.getresponse()
        read.append((response, response.read()))
    return conn, read


def test_the_dispatchers_connections_read_answers_with_the_forges_class() -> None:
    assert connections._connection("http://127.0.0.1:1", 1.0).response_class is Answer
    assert connections._connection("https://127.0.0.1:1", 1.0).response_class is Answer


def test_header_names_in_any_case_repeated_and_folded_fields(serve: list[CannedServer]) -> None:
    body = b'{"success":true}'
    answer = (
        b"HTTP/1.1 429 Too Many Requests\r\n"
        b"content-TYPE: application/json\r\n"
        b"RETRY-AFTER:   7  \r\n"
        b"X-Note: first\r\n"
        b"X-Note: second\r\n"
        b"X-Folded: one\r\n"
        b"\ttwo\r\n"
        b"not a header line\r\n" + f"Content-Length: {len(body)}\r\n\r\n".encode() + body
    )
    conn, [(response, read)] = _exchange(serve, answer)

    assert (response.status, response.reason, response.version) == (429, "Too Many Requests", 11)
    assert read == body
    assert response.headers.get("retry-after") == "7"
    assert response.getheader("Content-Type") == "application/json"
    assert response.getheader("x-note") == "first, second"
    assert response.headers.get_all("X-Note") == ["first", "second"]
    assert response.getheader("X-Folded") == "one two"
    assert response.getheader("Missing", "none") == "none"
    assert "x-note" in response.headers and "not a header line" not in response.headers
    assert not response.will_close
    assert sending._retry_after_header(response.headers) == 7.0
    conn.close()


def test_keep_alive_answers_chunked_and_after_100_continue(serve: list[CannedServer]) -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked\r\n\r\n"
        b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    )
    interim = b"HTTP/1.1 100 Continue\r\nX-Ignored: yes\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n"
    sized = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    conn, read = _exchange(serve, chunked, interim, sized)

    assert [(r.status, body) for r, body in read] == [
        (200, b"hello world"),
        (204, b""),
        (200, b"ok"),
    ]
    assert read[1][0].getheader("X-Ignored") is None
    assert not any(r.will_close for r, _body in read)
    assert serve[0].requests == 3  # one connection carried all three
    conn.close()


def test_answers_that_end_the_connection(serve: list[CannedServer]) -> None:
    old = b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok"
    closing = b"HTTP/1.1 500 Internal Server Error\r\nConnection: close\r\n\r\nbroken"
    _, [(first, first_body)] = _exchange(serve, old)
    _, [(second, second_body)] = _exchange(serve, closing)

    assert (first.version, first.will_close, first_body) == (10, True, b"ok")
    assert (second.status, second.will_close, second_body) == (500, True, b"broken")


@pytest.mark.parametrize(
    ("block", "error"),
    [
        (b"".join(b"X-%d: v\r\n" % i for i in range(MAX_HEADERS + 1)), http.client.HTTPException),
        (b"X-Long: " + b"a" * MAX_LINE + b"\r\n", http.client.LineTooLong),
    ],
    ids=["too many header lines", "a header line too long"],
)
def test_header_blocks_past_http_clients_limits_are_refused(
    serve: list[CannedServer], block: bytes, error: type[Exception]
) -> None:
    server = CannedServer([b"HTTP/1.1 200 OK\r\n" + block + b"Content-Length: 0\r\n\r\n"])
    serve.append(server)
    conn = connections._connection(server.url, 5.0)
    conn.request("POST", "/execute", b"{}")
    with pytest.raises(error):
        conn.getresponse()
    conn.close()


def test_a_status_line_of_another_protocol_is_refused(serve: list[CannedServer]) -> None:
    server = CannedServer([b"HTTP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n"])
    serve.append(server)
    conn = connections._connection(server.url, 5.0)
    conn.request("POST", "/execute", b"{}")
    with pytest.raises(http.client.HTTPException):
        conn.getresponse()
    conn.close()
