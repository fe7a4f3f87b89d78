"""Generated cases for the request path of real servers (hypothesis).

- **Split requests.** The runnerkit worker class buffers a request on its main loop until it
  is whole (a chunked body up to its last chunk and trailers) and hands the bytes to
  gunicorn's parser: whatever way a client splits its writes, however it frames a body
  (Content-Length, or chunked in several chunks with extensions and trailers), and however
  many requests it sends on one keep-alive connection (pipelined or not), every request is
  answered exactly as if it had come in one piece.
- **Replayed signed requests.** A copy of a captured signed request with any event id (new,
  empty, absent, odd) is the same request: it never runs the job again.
"""

from __future__ import annotations

import json
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runnerkit.service.signing import sign
from tests.security.stack import QUICK, Stack
from tests.support import GunicornProcess

pytestmark = pytest.mark.integration

SECRET = "fuzz-replay-secret"


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GunicornProcess]:
    """The example app, one worker of four threads (every request meets the same buffer)."""
    stack = Stack(tmp_path_factory.mktemp("split"))
    try:
        yield stack.runner("app:app", workers=1, env={"GUNICORN_THREADS": "4"})
    finally:
        stack.stop()


#: Chunk extensions gunicorn accepts (RFC 9112 7.1.1), and trailer lines.
_EXTENSIONS = (b"", b";a", b";name=value", b' ; q="a b"', b';e="x\\"y"', b"\t;k=v;k2=v2")
_TRAILERS = (b"X-Checksum: abc\r\n", b"X-Count: 3\r\n", b"X-Empty:\r\n")

#: A chunked framing: where the body is cut into chunks, each chunk's extension (the last
#: one's too), trailer lines, and whether sizes are written in upper-case hex.
Chunking = tuple[list[int], list[bytes], list[bytes], bool]
chunkings = st.tuples(
    st.lists(st.integers(1, 1000), max_size=5),
    st.lists(st.sampled_from(_EXTENSIONS), max_size=7),
    st.lists(st.sampled_from(_TRAILERS), max_size=3),
    st.booleans(),
)


def _chunked(body: bytes, chunking: Chunking) -> bytes:
    """``body`` framed as ``chunking`` says (see :data:`chunkings`)."""
    cuts, extensions, trailers, upper = chunking
    points = sorted({c for c in cuts if c < len(body)})
    pieces = [body[a:b] for a, b in zip([0, *points], [*points, len(body)], strict=True)]
    extensions = [*extensions, *[b""] * (len(pieces) + 1 - len(extensions))]
    size = "%X" if upper else "%x"
    framed = b"".join(
        (size % len(piece)).encode() + extension + b"\r\n" + piece + b"\r\n"
        for piece, extension in zip(pieces, extensions, strict=False)
    )
    return framed + b"0" + extensions[len(pieces)] + b"\r\n" + b"".join(trailers) + b"\r\n"


def _execute(text: str, *, chunking: Chunking | None) -> tuple[bytes, str]:
    job_id = str(uuid.uuid4())
    body = json.dumps(
        {
            "jobId": job_id,
            "moduleId": "fuzz",
            "capabilityId": "text-stats",
            "payload": {"text": text},
        }
    ).encode()
    head = b"POST /execute HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    if chunking is not None:
        return head + b"Transfer-Encoding: chunked\r\n\r\n" + _chunked(body, chunking), job_id
    return head + b"Content-Length: %d\r\n\r\n" % len(body) + body, job_id


_HEALTH = b"GET /health/live HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"p" * 40 + b"\r\n\r\n"

requests_strategy = st.lists(
    st.one_of(
        st.just(("health", None, "")),
        st.tuples(st.just("execute"), st.one_of(st.none(), chunkings), st.text(max_size=300)),
    ),
    min_size=1,
    max_size=3,
)


def _read_answers(sock: socket.socket, count: int) -> list[tuple[int, bytes]]:
    """``count`` answers (status, body) with a Content-Length each, read from ``sock``."""
    data = b""
    answers: list[tuple[int, bytes]] = []
    while len(answers) < count:
        end = data.find(b"\r\n\r\n")
        if end >= 0:
            head = data[:end]
            length = next(
                (
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                ),
                0,
            )
            if len(data) >= end + 4 + length:
                answers.append((int(head.split(b" ", 2)[1]), data[end + 4 : end + 4 + length]))
                data = data[end + 4 + length :]
                continue
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"closed after {len(answers)} of {count} answers: {data[:300]!r}")
        data += chunk
    return answers


@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(plan=requests_strategy, cuts=st.lists(st.integers(1, 4000), max_size=12))
def test_a_request_split_anywhere_is_answered_as_if_whole(
    example: GunicornProcess, plan: list[tuple[str, Chunking | None, str]], cuts: list[int]
) -> None:
    raw = b""
    expected: list[str] = []
    for kind, chunking, text in plan:
        if kind == "health":
            raw += _HEALTH
            expected.append("")
        else:
            piece, job_id = _execute(text, chunking=chunking)
            raw += piece
            expected.append(job_id)
    points = sorted({c for c in cuts if c < len(raw)})
    pieces = [raw[a:b] for a, b in zip([0, *points], [*points, len(raw)], strict=True)]
    with socket.create_connection((example.host, example.port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for piece in pieces:
            sock.sendall(piece)
            time.sleep(0.002)  # separate segments, read separately by the server
        answers = _read_answers(sock, len(expected))
    for (status, body), job_id in zip(answers, expected, strict=True):
        assert status == 200, body[:500]
        document = json.loads(body)
        if job_id:
            assert document["jobId"] == job_id and document["success"] is True, document
        else:
            assert document["status"] in ("healthy", "degraded"), document


# --------------------------------------------------------------------------- replays


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GunicornProcess, Path]]:
    """The end-to-end app (its capabilities log each start), signing on, two workers."""
    base = tmp_path_factory.mktemp("replay-fuzz")
    log = base / "executions.jsonl"
    stack = Stack(base)
    try:
        proc = stack.runner(
            "tests.e2e.apps.e2e_app:app",
            workers=2,
            env={"RUNNERKIT_SIGNING_SECRET": SECRET, "E2E_EXEC_LOG": str(log)},
        )
        yield proc, log
    finally:
        stack.stop()


event_ids = st.one_of(
    st.none(),
    st.just(""),
    st.uuids().map(str),
    st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=40),
)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(copies=st.lists(event_ids, min_size=1, max_size=3), token=st.text(max_size=20))
def test_a_replayed_signed_request_never_runs_again_whatever_its_event_id(
    signed: tuple[GunicornProcess, Path], copies: list[str | None], token: str
) -> None:
    proc, log = signed
    job_id = str(uuid.uuid4())
    raw = json.dumps(
        {
            "jobId": job_id,
            "moduleId": "fuzz",
            "capabilityId": "flaky",
            "payload": {"fail_times": 1000, "tag": token},
        }
    ).encode()
    headers = {**sign(raw, SECRET), "Content-Type": "application/json"}
    first = requests.post(proc.url + "/execute", data=raw, headers=headers, timeout=QUICK)
    assert first.status_code == 500, first.text
    for event_id in copies:
        copy = {k: v for k, v in headers.items() if k != "x-webhook-event-id"}
        if event_id is not None:
            copy["x-webhook-event-id"] = event_id
        again = requests.post(proc.url + "/execute", data=raw, headers=copy, timeout=QUICK)
        assert again.status_code == 401, again.text
        assert again.json()["error"]["code"] == "EVENT_REPLAYED"
    lines = [json.loads(line) for line in log.read_text().splitlines() if line]
    assert sum(1 for r in lines if r["job"] == job_id and r["event"] == "start") == 1
