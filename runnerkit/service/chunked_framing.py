"""Finding where a chunked request body ends, as the worker's main loop buffers it.

The worker hands a connection to a request thread only once its request is whole; for a
chunked body that means walking the chunk-size lines as bytes arrive, each chunk once, and
stopping where gunicorn's own parser would refuse the framing, so the thread parses from
memory and never waits on the socket. Kept apart from the worker so the walk can be tested
against gunicorn's parser on its own (``tests/test_chunked_framing.py``).
"""

from __future__ import annotations

import re

#: A body of unknown limit is buffered up to this many bytes (a Flask app's default is none).
DEFAULT_BODY_CAP = 1_048_576

#: A chunk-size line (RFC 9112 7.1): hex digits, then optional extensions (whitespace only
#: before their ``;``, as gunicorn allows; their syntax is gunicorn's to judge), then CRLF.
_CHUNK_LINE = re.compile(rb"([0-9A-Fa-f]+)(?:[ \t]*;[^\r\n]*)?\r\n")
#: :func:`scan_chunked`'s verdicts other than "complete at offset N" (N >= 0).
CHUNKED_MORE = -1  # not whole yet: resume at the offset it gives
CHUNKED_MALFORMED = -2  # framing gunicorn's parser refuses (400)
CHUNKED_TOO_LARGE = -3  # its data exceed the cap (the app answers 413)


def scan_chunked(
    buf: bytes | bytearray,
    pos: int,
    data: int = 0,
    *,
    cap: int = DEFAULT_BODY_CAP,
    line_cap: int = 8190,
    trailer_cap: int = 8190 * 32,
) -> tuple[int, int, int]:
    """Walk a chunked body in ``buf`` from ``pos`` (the start of a chunk-size line), over as
    many whole chunks as are there: ``(verdict, pos, data)``.

    ``verdict`` is the offset just past the body (its last chunk, trailers and blank line)
    when it is whole, else :data:`CHUNKED_MORE` (call again from the ``pos`` returned, with
    the ``data`` returned, once more bytes are in: a chunk is walked once however many reads
    bring it), :data:`CHUNKED_MALFORMED` or :data:`CHUNKED_TOO_LARGE` (the chunks' ``data``
    bytes would exceed ``cap``). It checks framing only as far as it must to find the end,
    and never waits where gunicorn's parser would already refuse: a bad size, a missing CRLF
    after a chunk's data, a line over ``line_cap`` or trailers over ``trailer_cap``.
    """
    end = len(buf)
    while True:
        line = _CHUNK_LINE.match(buf, pos, pos + line_cap + 2)
        if line is None:
            # Not a whole line yet, or never a valid one (ended, too long, a bare LF).
            if (
                buf.find(b"\r\n", pos, pos + line_cap + 2) >= 0
                or end - pos > line_cap
                or buf.find(b"\n", pos) >= 0
            ):
                return CHUNKED_MALFORMED, pos, data
            return CHUNKED_MORE, pos, data
        size = int(line.group(1), 16)
        start = line.end()
        if size == 0:
            # Trailers: none (a blank line at once), or header lines up to a blank one.
            if buf.startswith(b"\r\n", start):
                return start + 2, pos, data
            stop = buf.find(b"\r\n\r\n", start)
            if stop >= 0:
                return stop + 4, pos, data
            if end - start > trailer_cap or buf.count(b"\n", start) != buf.count(b"\r\n", start):
                return CHUNKED_MALFORMED, pos, data
            return CHUNKED_MORE, pos, data
        if data + size > cap:
            return CHUNKED_TOO_LARGE, pos, data
        stop = start + size
        if end < stop + 2:
            return CHUNKED_MORE, pos, data
        if not buf.startswith(b"\r\n", stop):
            return CHUNKED_MALFORMED, pos, data
        pos = stop + 2
        data += size
