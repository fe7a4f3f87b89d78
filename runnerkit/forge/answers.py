"""A runner's HTTP answer read by ``http.client`` without the ``email`` package.

``http.client.HTTPResponse.begin`` hands the header block to ``email.parser``: a general
RFC 5322 parser that cost the forge more CPU than the rest of an answer's reading. The
dispatcher reads one answer per job and needs two headers (``Content-Length``,
``Retry-After``) plus the framing ones, so :class:`Answer` reads the block itself: the same
line and count limits, the same framing decisions (chunked, Content-Length, keep-alive) as
``begin``, and a small case-insensitive :class:`AnswerHeaders` in place of ``HTTPMessage``.
"""

from __future__ import annotations

import http.client
from collections.abc import Iterator
from typing import Any

#: http.client's own limits on one header line and on the number of header lines.
MAX_LINE = 65536
MAX_HEADERS = 100


class AnswerHeaders:
    """Header fields by case-insensitive name; ``get`` and ``get_all`` as ``HTTPMessage``."""

    __slots__ = ("_fields",)

    def __init__(self) -> None:
        self._fields: dict[str, list[str]] = {}

    def get(self, name: str, default: Any = None) -> Any:
        values = self._fields.get(name.lower())
        return values[0] if values else default

    def get_all(self, name: str, default: Any = None) -> Any:
        values = self._fields.get(name.lower())
        return list(values) if values else default

    def items(self) -> list[tuple[str, str]]:
        return [(name, value) for name, values in self._fields.items() for value in values]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._fields

    def __iter__(self) -> Iterator[str]:
        return iter(self._fields)


def read_headers(fp: Any) -> AnswerHeaders:
    """The header block up to its empty line (folded continuation lines joined)."""
    headers = AnswerHeaders()
    last: list[str] | None = None
    for _ in range(MAX_HEADERS + 1):
        line = fp.readline(MAX_LINE + 1)
        if len(line) > MAX_LINE:
            raise http.client.LineTooLong("header line")
        if line in (b"\r\n", b"\n", b""):
            return headers
        text = line.decode("iso-8859-1")
        if text[0] in " \t" and last is not None:  # obs-fold: part of the previous value
            last[-1] = f"{last[-1]} {text.strip()}"
            continue
        name, colon, value = text.partition(":")
        if not colon:
            continue  # not a header field (email's parser drops it as a defect too)
        key = name.strip().lower()
        last = headers._fields.setdefault(key, [])
        last.append(value.strip())
    raise http.client.HTTPException(f"got more than {MAX_HEADERS} headers")


class Answer(http.client.HTTPResponse):
    """``HTTPResponse`` whose :meth:`begin` reads the headers with :func:`read_headers`."""

    def begin(self) -> None:
        if self.headers is not None:
            return
        while True:  # skip interim 100 Continue answers
            version, status, reason = self._read_status()
            if status != http.client.CONTINUE:
                break
            read_headers(self.fp)
        self.code = self.status = status
        self.reason = reason.strip()
        if version in ("HTTP/1.0", "HTTP/0.9"):
            self.version = 10
        elif version.startswith("HTTP/1."):
            self.version = 11
        else:
            raise http.client.UnknownProtocol(version)
        headers = read_headers(self.fp)
        self.headers = self.msg = headers
        encoding = headers.get("transfer-encoding")
        self.chunked = bool(encoding) and encoding.lower() == "chunked"
        self.chunk_left = None
        self.will_close = self._check_close()
        self.length = None
        length = headers.get("content-length")
        if length and not self.chunked:
            try:
                self.length = int(length)
            except ValueError:
                self.length = None
            else:
                if self.length < 0:
                    self.length = None
        if (
            status in (http.client.NO_CONTENT, http.client.NOT_MODIFIED)
            or 100 <= status < 200
            or self._method == "HEAD"
        ):
            self.length = 0
        if not self.will_close and not self.chunked and self.length is None:
            self.will_close = True
