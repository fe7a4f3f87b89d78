"""Slowloris against a real runner: gunicorn with the runnerkit worker class, one worker of
four threads. Connections that trickle a request one byte every 2 s never trip the idle
timeout; they must cost no thread (``/health/live`` answers throughout) and be closed once
their head or body is past its total deadline."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import requests

from runnerkit.forge.serving import OPTIONS
from tests.security.slow_clients import Tricklers
from tests.security.stack import QUICK, Stack
from tests.support import GunicornProcess

pytestmark = pytest.mark.integration

#: Short deadlines, so the test is quick; the idle timeout is above the trickle's interval.
SLOW_ENV = {
    "GUNICORN_THREADS": "4",
    "RUNNERKIT_CLIENT_IDLE_TIMEOUT_S": "5",
    "RUNNERKIT_CLIENT_HEADER_TIMEOUT_S": "6",
    "RUNNERKIT_CLIENT_BODY_TIMEOUT_S": "6",
}


def probe(proc: GunicornProcess, count: int, answers: list[int]) -> None:
    """``count`` GET /health/live, one every 0.4 s; each status (0 when unanswered)."""
    for _ in range(count):
        try:
            answers.append(requests.get(proc.url + "/health/live", timeout=QUICK).status_code)
        except requests.RequestException:
            answers.append(0)
        time.sleep(0.4)


def test_trickling_clients_hold_no_thread_and_are_closed_at_their_deadline(
    stack: Stack,
) -> None:
    proc = stack.runner(workers=1, env=SLOW_ENV)
    heads = Tricklers(proc.host, proc.port, interval_s=2.0)
    bodies = Tricklers(proc.host, proc.port, interval_s=2.0)
    answers: list[int] = []
    try:
        heads.open(40, body=False)
        bodies.open(10, body=True)
        heads.tick()
        bodies.tick()
        prober = threading.Thread(target=probe, args=(proc, 10, answers))
        prober.start()
        # Both sets trickle on the same clock; bounded well past the deadlines.
        heads.run_until_all_end(25.0, on_tick=bodies.tick)
        bodies.run_until_all_end(10.0)
        prober.join(30)
    finally:
        heads.close()
        bodies.close()
    assert answers == [200] * 10
    assert [c.ended for c in heads.conns] == ["closed"] * 40, proc.log_tail()
    assert [c.ended for c in bodies.conns] == ["400"] * 10, proc.log_tail()
    for conn in bodies.conns:
        status, error = conn.status_and_error()
        assert (status, error["code"]) == (400, "BODY_UNREADABLE")
    # Still serving.
    assert requests.get(proc.url + "/health/live", timeout=QUICK).status_code == 200


def test_a_trickling_chunked_body_is_refused_at_its_deadline(stack: Stack) -> None:
    # A chunked body is read by a request thread (its end is known only from the chunks):
    # its reads share the body's total deadline instead of each having the idle timeout.
    proc = stack.runner(workers=1, env=SLOW_ENV)
    chunked = Tricklers(proc.host, proc.port, interval_s=1.0)
    try:
        chunked.open(2, body=True, chunked=True)
        chunked.run_until_all_end(25.0)
    finally:
        chunked.close()
    assert [c.ended for c in chunked.conns] == ["400", "400"], proc.log_tail()
    for conn in chunked.conns:
        status, error = conn.status_and_error()
        assert (status, error["code"]) == (400, "BODY_UNREADABLE")


def test_the_forge_served_as_runnerkit_forge_serves_it_is_protected_too(
    stack: Stack, tmp_path: Path
) -> None:
    # `runnerkit forge` serves with the same worker class; its timeouts come from the
    # environment (RUNNERKIT_CLIENT_*), its body limit from its own settings.
    proc = GunicornProcess(
        "runnerkit.forge:app",
        log_dir=tmp_path / "forge",
        workers=1,
        env={
            "RUNNERKIT_FORGE_DB_PATH": str(tmp_path / "forge.sqlite3"),
            "RUNNERKIT_SIGNING_SECRET": None,
            "PROMETHEUS_MULTIPROC_DIR": None,
            **{k: v for k, v in SLOW_ENV.items() if k.startswith("RUNNERKIT_")},
        },
        extra_args=[*OPTIONS, "--threads", "4"],
        name="forge",
    )
    stack.procs.append(proc)
    proc.start()
    proc.wait_ready("/health", timeout=30)
    heads = Tricklers(proc.host, proc.port, interval_s=2.0)
    probes: list[int] = []

    def tick() -> None:
        try:
            probes.append(requests.get(proc.url + "/health", timeout=QUICK).status_code)
        except requests.RequestException:
            probes.append(0)

    try:
        heads.open(20, body=False)
        heads.run_until_all_end(25.0, on_tick=tick)
    finally:
        heads.close()
    assert probes and set(probes) == {200}, probes
    assert [c.ended for c in heads.conns] == ["closed"] * 20, proc.log_tail()
