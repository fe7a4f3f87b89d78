"""Slowloris against a real runner: gunicorn with the runnerkit worker class, one worker of
four threads. Connections that trickle a request one byte every 2 s never trip the idle
timeout; they must cost no thread (``/health/live`` answers throughout) and be closed once
their head or body (Content-Length or chunked) is past its total deadline."""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
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


def test_clients_trickling_chunked_bodies_hold_no_thread(stack: Stack) -> None:
    # A chunked body is buffered on the worker's main loop up to its last chunk, as a
    # Content-Length one is: 40 of them, a byte a second each, against 4 threads. Handed to
    # threads after their heads, they held all four until the body deadline, and every probe
    # waited behind them past its 10 s read timeout.
    proc = stack.runner(workers=1, env={**SLOW_ENV, "RUNNERKIT_CLIENT_BODY_TIMEOUT_S": "12"})
    chunked = Tricklers(proc.host, proc.port, interval_s=1.0)
    answers: list[tuple[int, int]] = []

    def probe_while_they_trickle() -> None:
        for _ in range(10):
            try:
                status = requests.get(proc.url + "/health/live", timeout=QUICK).status_code
            except requests.RequestException:
                status = 0
            answers.append((status, chunked.open_count))
            time.sleep(0.4)

    try:
        chunked.open(40, body=True, chunked=True)
        chunked.tick()
        prober = threading.Thread(target=probe_while_they_trickle)
        prober.start()
        chunked.run_until_all_end(30.0)
        prober.join(30)
    finally:
        chunked.close()
    # Every probe answered, each while all 40 were still trickling.
    assert answers == [(200, 40)] * 10, answers
    assert [c.ended for c in chunked.conns] == ["400"] * 40, proc.log_tail()
    for conn in chunked.conns:
        status, error = conn.status_and_error()
        assert (status, error["code"]) == (400, "BODY_UNREADABLE")
        assert "12 s" in error["message"]  # the main loop's answer at the body's deadline
    assert requests.get(proc.url + "/health/live", timeout=QUICK).status_code == 200


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_client_that_waits_for_100_continue_gets_it_and_is_answered(
    stack: Stack, framing: str
) -> None:
    # Such a client sends its body only after "100 Continue", which gunicorn sends once a
    # thread takes the request: its body is not waited for on the main loop.
    proc = stack.runner(workers=1, env=SLOW_ENV)
    job_id = str(uuid.uuid4())
    body = json.dumps(
        {"jobId": job_id, "moduleId": "m", "capabilityId": "text-stats", "payload": {"text": "a"}}
    ).encode()
    if framing == "chunked":
        length, body = b"Transfer-Encoding: chunked", b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    else:
        length = b"Content-Length: %d" % len(body)
    head = (
        b"POST /execute HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Expect: 100-continue\r\nConnection: close\r\n" + length + b"\r\n\r\n"
    )
    with socket.create_connection((proc.host, proc.port), timeout=10) as sock:
        sock.sendall(head)
        interim = b""
        while b"\r\n\r\n" not in interim:
            data = sock.recv(1)
            assert data, interim
            interim += data
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(body)
        answer = b""
        while data := sock.recv(65536):
            answer += data
    head_, _, payload = answer.partition(b"\r\n\r\n")
    assert head_.startswith(b"HTTP/1.1 200 "), answer[:500]
    assert json.loads(payload)["jobId"] == job_id


def test_a_trickling_chunked_body_is_refused_at_its_deadline(stack: Stack) -> None:
    # A chunked body that trickles is closed at the body's total deadline, with the same 400
    # as a Content-Length one (the idle timeout alone would never end it).
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
