"""The worker's client socket: its blocking mode kept in the object, the descriptor never
switched, and every wait still bounded (a real socket pair, real threads)."""

from __future__ import annotations

import fcntl
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from runnerkit.service.client_sockets import TimedSocket


@pytest.fixture
def pair(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[TimedSocket, socket.socket]]:
    """(the worker's side as TimedSocket, the client's side); idle timeout 0.3 s."""
    monkeypatch.setattr(TimedSocket, "timeout_s", 0.3)
    ours, theirs = socket.socketpair()
    timed = TimedSocket.adopt(ours)
    try:
        yield timed, theirs
    finally:
        timed.close()
        theirs.close()


@pytest.fixture
def blocking(pair: tuple[TimedSocket, socket.socket]) -> tuple[TimedSocket, socket.socket]:
    """The pair, the worker's side in blocking mode (idle timeout 0.3 s)."""
    pair[0].setblocking(True)
    return pair


def _reading(sock: socket.socket, size: int) -> tuple[threading.Thread, bytearray]:
    """A started thread that reads ``size`` bytes from ``sock`` into the bytearray."""
    received = bytearray()

    def read() -> None:
        while len(received) < size:
            received.extend(sock.recv(1 << 16))

    reader = threading.Thread(target=read)
    reader.start()
    return reader, received


def _read_times_out(timed: TimedSocket) -> None:
    with pytest.raises(TimeoutError):
        timed.recv(10)
    assert timed.timed_out


def _nonblocking(sock: socket.socket) -> bool:
    return bool(fcntl.fcntl(sock.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK)


def test_the_mode_changes_in_the_object_and_the_descriptor_stays_nonblocking(
    pair: tuple[TimedSocket, socket.socket],
) -> None:
    timed, _ = pair
    assert timed.gettimeout() == 0.0 and not timed.getblocking()
    timed.setblocking(True)
    assert timed.gettimeout() == 0.3 and timed.getblocking()
    timed.settimeout(None)
    assert timed.gettimeout() is None
    timed.settimeout(2)
    assert timed.gettimeout() == 2.0
    with pytest.raises(ValueError):
        timed.settimeout(-1)
    assert _nonblocking(timed)


def test_nonblocking_reads_and_writes_raise_at_once(
    pair: tuple[TimedSocket, socket.socket],
) -> None:
    timed, theirs = pair
    with pytest.raises(BlockingIOError):
        timed.recv(10)
    theirs.sendall(b"ping")
    assert timed.recv(10) == b"ping"


def test_a_blocking_read_waits_for_data_and_times_out_without_it(
    blocking: tuple[TimedSocket, socket.socket],
) -> None:
    timed, theirs = blocking
    later = threading.Timer(0.1, theirs.sendall, args=(b"late",))
    later.start()
    assert timed.recv(10) == b"late"
    later.join()
    assert not timed.timed_out
    buffer = bytearray(4)
    threading.Timer(0.1, theirs.sendall, args=(b"into",)).start()
    assert timed.recv_into(buffer) == 4 and bytes(buffer) == b"into"
    _read_times_out(timed)


def test_a_read_past_the_requests_deadline_times_out_even_with_data_waiting(
    blocking: tuple[TimedSocket, socket.socket],
) -> None:
    timed, theirs = blocking
    timed.settimeout(None)  # no idle timeout: only the deadline ends the wait
    timed.rk_deadline = time.monotonic() + 0.2
    raised: list[BaseException] = []

    def read() -> None:
        try:
            timed.recv(10)
        except BaseException as exc:  # noqa: BLE001 - what the read raised, for the test
            raised.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(30)
    assert not reader.is_alive() and isinstance(raised[0], TimeoutError)
    theirs.sendall(b"too late")
    _read_times_out(timed)


def test_sendall_larger_than_the_buffers_arrives_whole_and_a_stalled_reader_times_it_out(
    blocking: tuple[TimedSocket, socket.socket],
) -> None:
    timed, theirs = blocking
    payload = os.urandom(8 << 20)  # far beyond both sockets' buffers
    reader, received = _reading(theirs, len(payload))
    timed.sendall(payload)
    reader.join(30)
    assert bytes(received) == payload
    with pytest.raises(TimeoutError):
        timed.sendall(payload)  # nobody reads: the wait for room is bounded


def test_a_closed_peer_is_a_broken_pipe_not_a_signal(
    blocking: tuple[TimedSocket, socket.socket],
) -> None:
    timed, theirs = blocking
    theirs.close()
    with pytest.raises((BrokenPipeError, ConnectionResetError)):
        for _ in range(3):
            timed.sendall(b"x" * 65536)


def test_sendfile_goes_through_the_nonblocking_descriptor(
    blocking: tuple[TimedSocket, socket.socket], tmp_path: Path
) -> None:
    timed, theirs = blocking
    data = os.urandom(3 << 20)
    path = tmp_path / "body"
    path.write_bytes(data)
    reader, received = _reading(theirs, len(data))
    with path.open("rb") as body:
        assert timed.sendfile(body) == len(data)
    reader.join(30)
    assert bytes(received) == data
