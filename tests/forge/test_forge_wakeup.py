"""The dispatcher's wake-up channel: one listener per database, woken from any process."""

from __future__ import annotations

import multiprocessing
from pathlib import Path
from typing import Any

from runnerkit.forge.wakeup import Wakeup

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
