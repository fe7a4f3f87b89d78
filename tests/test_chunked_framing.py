"""The worker's chunked-body scanner (:func:`runnerkit.gunicorn_worker.scan_chunked`), against
gunicorn's own parser: the main loop must find a chunked body's end exactly where gunicorn's
parser will (so the request thread never reads the socket for it), wait while it is not in,
and stop waiting at framing gunicorn refuses or data over the cap."""

from __future__ import annotations

import pytest
from gunicorn.config import Config
from gunicorn.http.parser import RequestParser
from hypothesis import given
from hypothesis import strategies as st

from runnerkit.service.chunked_framing import (
    CHUNKED_MALFORMED,
    CHUNKED_MORE,
    CHUNKED_TOO_LARGE,
    scan_chunked,
)

HEAD = b"POST /execute HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
#: Whatever follows the body on the connection (a pipelined request).
NEXT = b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n"

#: Extensions gunicorn accepts (RFC 9112 7.1.1: token names, token or quoted values).
extensions = st.lists(
    st.sampled_from([b";a", b";name=value", b' ; q="a b"', b';e="x\\"y"', b"\t;k=v;k2=v2"]),
    max_size=2,
).map(b"".join)
trailers = st.lists(
    st.sampled_from([b"X-Checksum: abc\r\n", b"X-Count: 3\r\n", b"X-Empty:\r\n"]), max_size=3
).map(b"".join)


@st.composite
def chunked_bodies(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """(the chunked framing of some data, the data)."""
    data = draw(st.binary(min_size=0, max_size=400))
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(data) - 1)), max_size=6))))
    pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    out = b""
    for piece in (p for p in pieces if p):
        size = b"%x" % len(piece)
        size = size.upper() if draw(st.booleans()) else size
        size = b"0" * draw(st.integers(0, 2)) + size
        out += size + draw(extensions) + b"\r\n" + piece + b"\r\n"
    return out + b"0" + draw(extensions) + b"\r\n" + draw(trailers) + b"\r\n", data


def gunicorn_reads(raw: bytes) -> tuple[bytes, bytes]:
    """(the body gunicorn's parser reads from ``HEAD + raw``, what it leaves after it)."""
    parser = RequestParser(Config(), iter([HEAD + raw]), ("127.0.0.1", 1))
    request = next(parser)
    body = request.body.read()
    return body, parser.unreader.read() or b""


def scan(buf: bytes, pos: int = 0, data: int = 0, cap: int = 1 << 20) -> tuple[int, int, int]:
    return scan_chunked(buf, pos, data, cap=cap, line_cap=8190, trailer_cap=8190 * 32)


@given(chunked_bodies())
def test_the_end_is_found_where_gunicorns_parser_ends_the_body(framed: tuple[bytes, bytes]) -> None:
    raw, data = framed
    verdict, _, seen = scan(raw + NEXT)
    assert (verdict, seen) == (len(raw), len(data))
    assert gunicorn_reads(raw + NEXT) == (data, NEXT)


@given(chunked_bodies(), st.lists(st.integers(1, 2000), max_size=8))
def test_a_body_in_pieces_is_waited_for_and_each_byte_is_walked_once(
    framed: tuple[bytes, bytes], cuts: list[int]
) -> None:
    raw, data = framed
    for short in range(len(raw)):
        assert scan(raw[:short])[0] == CHUNKED_MORE, raw[:short]
    # Resuming where the last look stopped ends where one look at the whole does.
    pos = seen = 0
    verdict = CHUNKED_MORE
    for cut in [*sorted(c for c in set(cuts) if c < len(raw)), len(raw)]:
        assert verdict == CHUNKED_MORE
        verdict, pos, seen = scan(raw[:cut], pos, seen)
    assert verdict == len(raw)
    assert seen == len(data)


@pytest.mark.parametrize(
    "raw",
    [
        b"zz\r\nabc\r\n0\r\n\r\n",  # not hex
        b"\r\nabc\r\n0\r\n\r\n",  # no size
        b"0x3\r\nabc\r\n0\r\n\r\n",  # int() would take it; the grammar does not
        b"+3\r\nabc\r\n0\r\n\r\n",
        b"3 \r\nabc\r\n0\r\n\r\n",  # whitespace without an extension
        b"3\nabc\r\n0\r\n\r\n",  # bare LF ending the size line
        b"3;a\rb\r\nabc\r\n0\r\n\r\n",  # bare CR in an extension
        b"3\r\nabcd\r\n0\r\n\r\n",  # data longer than its size
        b"3\r\nabc0\r\n\r\n",  # no CRLF after the data
        b"3" * 9000,  # a size line over the limit, still without its end
        b"0\r\nX-Bad: bare-lf\n",  # trailers with a bare LF, not yet ended
    ],
)
def test_framing_gunicorn_refuses_is_not_waited_for(raw: bytes) -> None:
    assert scan(raw)[0] == CHUNKED_MALFORMED
    with pytest.raises(Exception):  # noqa: B017 - whichever of gunicorn's parse errors
        gunicorn_reads(raw)


def test_data_over_the_cap_is_not_waited_for() -> None:
    # The cap applies to the data, whatever the framing, before the chunk's bytes are in.
    assert scan(b"5\r\nabcde\r\n", cap=4)[0] == CHUNKED_TOO_LARGE
    assert scan(b"2\r\nab\r\n2\r\ncd\r\n1\r\n", cap=4)[0] == CHUNKED_TOO_LARGE
    whole = b"2\r\nab\r\n2\r\ncd\r\n0\r\n\r\n"
    assert scan(whole, cap=4)[0] == len(whole)
    assert scan(b"fffffffffffffffffffff\r\n")[0] == CHUNKED_TOO_LARGE
