"""The dispatcher's wake-up channel: one listener per database, woken from any process."""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path
from typing import Any

from runnerkit.forge.wakeup import PENDING_S, Wakeup

_FORK = multiprocessing.get_context("fork")


def _in_child(target: Any, *args: Any) -> Any:
    """Run ``target(*args)`` in a forked process; its return value."""

    def child(queue: Any) -> None:
        queue.put(target(*args))

    queue: Any = _FORK.Queue()
    proc = _FORK.Process(target=child, args=(queue,))
    proc.start()
    result = queue.get(timeout=20)
    proc.join(10)
    return result


def _send(db_path: str) -> bool:
    Wakeup(db_path).send()
    return True


def _try_listen(db_path: str) -> bool:
    return Wakeup(db_path).listen()


def test_a_send_from_another_process_wakes_the_listener(tmp_path: Path) -> None:
    db_path = str(tmp_path / "forge.sqlite3")
    channel = Wakeup(db_path)
    assert channel.listen()
    try:
        assert not channel.wait(0.05), "woken without a send"
        assert _in_child(_send, db_path)
        assert channel.wait(10)
    finally:
        channel.close()


def test_one_wait_consumes_every_queued_wakeup(tmp_path: Path) -> None:
    channel = Wakeup(str(tmp_path / "forge.sqlite3"))
    assert channel.listen()
    try:
        for _ in range(5):
            channel.send()
        assert channel.wait(10)
        assert not channel.wait(0)
    finally:
        channel.close()


def test_only_one_process_listens_per_database_until_it_closes(tmp_path: Path) -> None:
    db_path = str(tmp_path / "forge.sqlite3")
    first = Wakeup(db_path)
    assert first.listen()
    assert not _in_child(_try_listen, db_path)
    assert _in_child(_try_listen, str(tmp_path / "other.sqlite3")), "another database is free"
    first.close()
    assert _in_child(_try_listen, db_path)


def test_sending_with_nobody_listening_is_harmless(tmp_path: Path) -> None:
    channel = Wakeup(str(tmp_path / "forge.sqlite3"))

    assert channel.send() is False, "nobody listens: the sender must know to tell others"

    assert not channel.wait(0), "a process that does not listen is never woken"


def test_send_says_whether_a_listener_took_it(tmp_path: Path) -> None:
    db_path = str(tmp_path / "forge.sqlite3")
    listener, sender = Wakeup(db_path), Wakeup(db_path)
    assert listener.listen()
    try:
        assert sender.send() is True
        # A queue already full of wake-ups counts too: the listener will wake.
        assert all(sender.send() for _ in range(2000))
        assert listener.wait(10)
    finally:
        listener.close()
    assert sender.send() is False, "the listener closed: nobody of this host dispatches"


def test_a_sender_reaches_the_listener_that_took_over(tmp_path: Path) -> None:
    """The sender stays connected to the listener it reached; once that one closes (the
    dispatcher lock moved) its next wake-up reaches whichever listens now."""
    db_path = str(tmp_path / "forge.sqlite3")
    sender, first = Wakeup(db_path), Wakeup(db_path)
    assert first.listen()
    assert sender.send() is True
    assert first.wait(10)
    first.close()
    second = Wakeup(db_path)
    assert second.listen()
    try:
        assert not second.wait(0)
        assert sender.send() is True
        assert second.wait(10), "the wake-up went to the closed listener"
        assert not second.wait(0)
    finally:
        second.close()
    assert sender.send() is False


def _queued(channel: Wakeup) -> int:
    """How many datagrams wait on the listener's socket (read, leaving the mark set)."""
    listener = channel._listener
    assert listener is not None
    count = 0
    while True:
        try:
            listener.recv(64)
        except BlockingIOError:
            return count
        count += 1


def _send_many(db_path: str, count: int) -> list[bool]:
    sender = Wakeup(db_path)
    return [sender.send() for _ in range(count)]


def test_a_pending_wakeup_spares_every_process_the_next_datagrams(tmp_path: Path) -> None:
    """Until the listener consumes a wake-up, further sends (from any process of the host)
    count as heard and send nothing: it will look at the database after that one anyway."""
    db_path = str(tmp_path / "forge.sqlite3")
    listener = Wakeup(db_path)
    assert listener.listen()
    try:
        assert Wakeup(db_path).send() is True
        assert _in_child(_send_many, db_path, 20) == [True] * 20
        assert _queued(listener) == 1, "one datagram for the 21 sends"
        # The mark stays until the listener's wait: the sends are still spared.
        assert _in_child(_send_many, db_path, 5) == [True] * 5
        assert _queued(listener) == 0
        listener.mark.clear()  # what the listener's wait does once it has drained them
        assert _in_child(_send_many, db_path, 3) == [True] * 3
        assert _queued(listener) == 1, "the first send after the wait goes out"
    finally:
        listener.close()


def test_a_consumed_wakeup_lets_the_next_send_through(tmp_path: Path) -> None:
    db_path = str(tmp_path / "forge.sqlite3")
    listener, sender = Wakeup(db_path), Wakeup(db_path)
    assert listener.listen()
    try:
        for _ in range(3):
            assert sender.send() is True
            assert listener.wait(10), "each send after a consumed wake-up wakes the listener"
            assert not listener.wait(0)
    finally:
        listener.close()


def _listen_send_and_die(db_path: str) -> bool:
    channel = Wakeup(db_path)
    assert channel.listen()
    channel.send()
    os._exit(0)  # killed before its wait: the mark stays set, nobody clears it


def test_a_mark_left_by_a_dead_listener_neither_deafens_its_successor_nor_lasts(
    tmp_path: Path,
) -> None:
    db_path = str(tmp_path / "forge.sqlite3")
    proc = _FORK.Process(target=_listen_send_and_die, args=(db_path,))
    proc.start()
    proc.join(20)
    assert Wakeup(db_path).mark.pending(), "the dead listener's mark is still set"
    successor = Wakeup(db_path)
    assert successor.listen()
    try:
        assert Wakeup(db_path).send() is True
        assert successor.wait(10), "the new listener clears the old mark when it binds"
    finally:
        successor.close()
    # With nobody listening, an old mark is believed for PENDING_S at most.
    proc = _FORK.Process(target=_listen_send_and_die, args=(db_path,))
    proc.start()
    proc.join(20)
    sender = Wakeup(db_path)
    assert sender.mark.pending()
    time.sleep(PENDING_S * 1.5)
    assert not sender.mark.pending()
    assert sender.send() is False, "nobody listens: the sender learns it and tells others"


def test_without_the_mark_file_every_send_goes_out(tmp_path: Path) -> None:
    """The mark is an economy: a forge that cannot write ``<DB_PATH>.wake`` (a full disk,
    a read-only directory) sends a datagram every time, as if no wake-up were pending."""
    db_path = str(tmp_path / "forge.sqlite3")
    Path(f"{db_path}.wake").mkdir()  # where the file would be: cannot be opened as one
    listener, sender = Wakeup(db_path), Wakeup(db_path)
    assert listener.listen()
    try:
        assert all(sender.send() for _ in range(4))
        assert not sender.mark.pending()
        assert _queued(listener) == 4
    finally:
        listener.close()
