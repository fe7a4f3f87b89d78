"""The worker's poller (epoll, registrations keeping the GIL) and its main loop's reads:
the same answers as ``selectors.DefaultSelector`` and ``os.read`` (real descriptors)."""

from __future__ import annotations

import selectors
import socket
from collections.abc import Iterator

import pytest

from runnerkit.service import gil_selector
from runnerkit.service.gunicorn_worker import MethodQueue
from runnerkit.service.libc_calls import ReadBuffer

pytestmark = pytest.mark.skipif(not gil_selector.AVAILABLE, reason="Linux epoll only")


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    try:
        yield ours, theirs
    finally:
        ours.close()
        theirs.close()


def test_registered_sockets_report_their_events_and_unregistered_ones_do_not(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = pair
    selector = gil_selector.poller()
    assert isinstance(selector, gil_selector.GILEpollSelector)
    try:
        selector.register(ours, selectors.EVENT_READ, "mine")
        assert selector.select(0) == []
        theirs.sendall(b"x")
        [(key, events)] = selector.select(1)
        assert (key.fileobj, key.data, events) == (ours, "mine", selectors.EVENT_READ)
        selector.modify(ours, selectors.EVENT_WRITE, "writable")
        [(key, events)] = selector.select(1)
        assert (key.data, events) == ("writable", selectors.EVENT_WRITE)
        with pytest.raises(KeyError):
            selector.register(ours, selectors.EVENT_READ)  # the selector's own check
        with pytest.raises(FileExistsError):
            selector._selector.register(ours.fileno(), 1)  # the kernel's, as select.epoll
        selector.unregister(ours)
        assert selector.select(0) == []
        with pytest.raises(OSError):
            selector._selector.unregister(ours.fileno())
    finally:
        selector.close()


def test_the_read_buffer_reads_what_came_and_says_when_nothing_has(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = pair
    reads = ReadBuffer(8)
    with pytest.raises(BlockingIOError):
        reads.read(ours.fileno())
    theirs.sendall(b"0123456789")
    assert reads.read(ours.fileno()) == b"01234567"
    assert reads.read(ours.fileno(), 1) == b"8"
    assert reads.read(ours.fileno()) == b"9"
    theirs.close()
    assert reads.read(ours.fileno()) == b""
    with pytest.raises(OSError):
        reads.read(-1)


def test_the_method_queue_runs_what_was_deferred_once_woken() -> None:
    queue = MethodQueue()
    queue.init()
    try:
        ran: list[int] = []
        for index in range(3):
            queue.defer(ran.append, index)
        queue.run_callbacks(None)
        assert ran == [0, 1, 2]
        queue.run_callbacks(None)  # nothing left, nothing to read: returns
        assert ran == [0, 1, 2]
    finally:
        queue.close()
