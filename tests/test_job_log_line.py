"""The per-job log line's direct path writes exactly what ``logging`` would, and steps aside
for anything that must see the record (a filter, another handler)."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from runnerkit.service.logs import _HANDLER_MARK, JsonFormatter, emit, log_context
from tests.helpers import run_in_threads

FIELDS = {
    "jobId": "6f1c0f7e-7a4e-4b8e-9a3b-1e0b7b0c9d11",
    "capabilityId": "echo",
    "correlationId": "6f1c0f7e-7a4e-4b8e-9a3b-1e0b7b0c9d12",
    "outcome": "VALIDATION_ERROR",
    "status": 400,
    "durationMs": 1.25,
    "error": {"code": "PAYLOAD_INVALID", "category": "VALIDATION_ERROR"},
    "exception": "Traceback …\nValueError: ü",
}


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    """runnerkit's own JSON handler (as configure_logging makes it) writing into a buffer."""
    logger = logging.getLogger("runnerkit")
    saved = (logger.handlers[:], logger.propagate, logger.level)
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(JsonFormatter("svc", "1.2.3"))
    setattr(handler, _HANDLER_MARK, True)
    logger.handlers = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:
        yield buffer
    finally:
        logger.handlers, logger.propagate, logger.level = saved


def _without_timestamp(line: str) -> str:
    entry = json.loads(line)
    assert entry.pop("timestamp").endswith("Z")
    return json.dumps(entry)


def test_the_direct_line_is_the_line_logging_writes(stream: io.StringIO) -> None:
    job = logging.getLogger("runnerkit.job")
    with log_context(jobId="from-context", api_token="secret-value", step="load"):
        emit(job, logging.ERROR, "job failed", dict(FIELDS), trusted=True)
        emit(job, logging.ERROR, "job failed", dict(FIELDS))
    emit(job, logging.INFO, "job completed", {}, trusted=True)
    emit(job, logging.INFO, "job completed", {})

    direct, logged, bare_direct, bare_logged = stream.getvalue().splitlines()
    # Same keys, same order, same values: only the timestamps may differ.
    assert _without_timestamp(direct) == _without_timestamp(logged)
    assert _without_timestamp(bare_direct) == _without_timestamp(bare_logged)
    assert direct.split('"level"', 1)[1] == logged.split('"level"', 1)[1]
    entry = json.loads(direct)
    assert entry["api_token"] == "[REDACTED]"  # a log_context field is still redacted
    assert entry["jobId"] == FIELDS["jobId"]  # the line's own field wins over the context's
    assert entry["component"] == "runnerkit.job" and entry["level"] == "error"


def test_a_filter_or_another_handler_still_sees_the_record(stream: io.StringIO) -> None:
    job = logging.getLogger("runnerkit.job")
    seen: list[logging.LogRecord] = []

    def keep(record: logging.LogRecord) -> bool:
        seen.append(record)
        return False  # and drops it

    job.addFilter(keep)
    try:
        emit(job, logging.INFO, "job completed", dict(FIELDS), trusted=True)
    finally:
        job.removeFilter(keep)
    assert len(seen) == 1 and stream.getvalue() == ""

    other = io.StringIO()
    extra = logging.StreamHandler(other)
    extra.setFormatter(JsonFormatter("svc", "1.2.3"))
    job.addHandler(extra)
    try:
        emit(job, logging.INFO, "job completed", dict(FIELDS), trusted=True)
    finally:
        job.removeHandler(extra)
    assert len(other.getvalue().splitlines()) == 1
    assert len(stream.getvalue().splitlines()) == 1


def test_lines_from_many_threads_arrive_whole_through_a_pipe() -> None:
    """Six threads write lines short and long (beyond ``PIPE_BUF``, which a pipe does not keep
    whole by itself) into a pipe read slowly by a Python thread: every line arrives whole.
    A lock-free write of the short lines straight to the descriptor fails this: a short line
    lands inside a long one whenever the pipe is full."""
    read_fd, write_fd = os.pipe()
    pipe = open(write_fd, "w", encoding="utf-8", errors="backslashreplace", buffering=1)  # noqa: SIM115 - closed below
    received = bytearray()
    reader = threading.Thread(target=lambda: _drain(read_fd, received))
    reader.start()

    def write(worker: int) -> None:
        for index in range(200):
            size = 5000 if index % 50 == 0 else 10
            fields = {"jobId": f"{worker}-{index}", "pad": "é" * size}
            emit(job_log, logging.INFO, "job completed", fields, trusted=True)

    try:
        with _json_handler_on(pipe) as job_log:
            run_in_threads(write, 6)
    finally:
        pipe.close()
        reader.join()
    lines = received.decode().splitlines()
    ids = sorted(json.loads(line)["jobId"] for line in lines)  # every line parses whole
    assert ids == sorted(f"{w}-{i}" for w in range(6) for i in range(200))


def _drain(fd: int, into: bytearray) -> None:
    with open(fd, "rb", buffering=0) as source:
        while chunk := source.read(65536):
            into.extend(chunk)


class _CountingStream(io.TextIOWrapper):
    """A text stream that counts the lines written through it (not past it)."""

    writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


@contextlib.contextmanager
def _json_handler_on(stream: io.TextIOBase) -> Iterator[logging.Logger]:
    logger = logging.getLogger("runnerkit")
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter("svc", "1.0.0"))
    setattr(handler, _HANDLER_MARK, True)
    saved = logger.handlers[:], logger.propagate, logger.level
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:
        yield logging.getLogger("runnerkit.job")
    finally:
        logger.handlers[:], logger.propagate = saved[0], saved[1]
        logger.setLevel(saved[2])


def test_a_line_goes_past_the_stream_into_a_pipe_with_room_and_through_it_when_full() -> None:
    """With room in the pipe, a line is written to its descriptor directly (the stream's
    write, which gives the GIL up, is not called). When the pipe is full the line waits in
    the stream's write for the reader, and arrives whole, after what was there before."""
    read_fd, write_fd = os.pipe()
    pipe = _CountingStream(open(write_fd, "wb", buffering=0), encoding="utf-8", line_buffering=True)  # noqa: SIM115 - closed below
    try:
        with _json_handler_on(pipe) as job_log:
            emit(job_log, logging.INFO, "job completed", {"jobId": "roomy"}, trusted=True)
            assert pipe.writes == 0
            assert json.loads(os.read(read_fd, 65536))["jobId"] == "roomy"
            os.set_blocking(write_fd, False)
            filler = 0
            with contextlib.suppress(BlockingIOError):
                while True:
                    filler += os.write(write_fd, b"#" * 4096)
            os.set_blocking(write_fd, True)
            writer = threading.Thread(
                target=emit,
                args=(job_log, logging.INFO, "job completed", {"jobId": "waited"}),
                kwargs={"trusted": True},
            )
            writer.start()
            received = bytearray()
            while len(received) < filler or b"\n" not in received[filler:]:
                received += os.read(read_fd, 65536)
            writer.join(10)
            assert not writer.is_alive()
        assert pipe.writes == 1
        assert received[:filler] == b"#" * filler
        assert json.loads(received[filler:])["jobId"] == "waited"
    finally:
        pipe.close()
        os.close(read_fd)


def test_lines_past_the_stream_and_through_it_keep_their_order_in_a_file(
    tmp_path: Path,
) -> None:
    """Appended to a file directly or through ``logging`` (another component's record), the
    lines of one thread follow each other in order, whole, at the stream's offset."""
    path = tmp_path / "lines.log"
    with open(path, "w", encoding="utf-8") as stream:
        stream.write("before\n")  # still in the stream's buffer: written first
        with _json_handler_on(stream) as job_log:
            for index in range(50):
                emit(job_log, logging.INFO, "job completed", {"n": index}, trusted=True)
                if index % 10 == 0:
                    logging.getLogger("runnerkit.other").info("between", extra={"n": index})
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "before"
    entries = [json.loads(line) for line in lines[1:]]
    assert [(e["message"], e["n"]) for e in entries] == [
        pair
        for index in range(50)
        for pair in [("job completed", index)] + ([("between", index)] if index % 10 == 0 else [])
    ]
