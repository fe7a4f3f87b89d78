"""HTTP to the runner under test: bounded in time and size, never following a redirect.

Whatever the runner does — hang, reset the connection, answer HTML or a gigabyte — becomes a
:class:`Reply` the checks can judge, never an exception out of the tool. Requests go to the
URL given and nowhere else: redirects are not followed and the environment's proxy and
``.netrc`` settings are not used (``trust_env`` off).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import requests

from runnerkit.service.signing import sign

#: The most of an answer body that is read; the rest is a finding, not memory spent.
MAX_BODY_BYTES = 4 * 1024 * 1024
CONNECT_TIMEOUT_S = 3.0


@dataclass
class Reply:
    """What the runner answered, or why there was no answer (``problem``)."""

    status: int = 0
    content_type: str = ""
    text: str = ""
    body: Any = None
    problem: str = ""
    json_problem: str = ""
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def answered(self) -> bool:
        return not self.problem

    def describe(self) -> str:
        """The reply in a few words, for a finding."""
        if self.problem:
            return self.problem
        snippet = " ".join(self.text[:80].split())
        return f"HTTP {self.status} {self.content_type or 'without Content-Type'}: {snippet!r}"


class Probe:
    """Sends requests to one runner base URL, signing them when a secret is given."""

    def __init__(self, base_url: str, *, timeout_s: float, signing_secret: str = "") -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.signing_secret = signing_secret
        self.session = requests.Session()
        self.session.trust_env = False

    def close(self) -> None:
        self.session.close()

    def get(self, path: str) -> Reply:
        return self.send("GET", path, None)

    def post_json(
        self,
        path: str,
        document: Any,
        *,
        signed: bool = True,
        timeout_s: float | None = None,
        headers: dict[str, str] | None = None,
    ) -> Reply:
        """POST a JSON document (signed with the suite's secret unless ``signed`` is False)."""
        return self.post_raw(
            path,
            json.dumps(document).encode(),
            signed=signed,
            timeout_s=timeout_s,
            headers=headers,
        )

    def post_raw(
        self,
        path: str,
        body: bytes,
        *,
        signed: bool = True,
        timeout_s: float | None = None,
        headers: dict[str, str] | None = None,
    ) -> Reply:
        all_headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if signed and self.signing_secret:
            all_headers.update(sign(body, self.signing_secret))
        all_headers.update(headers or {})
        return self.send("POST", path, body, all_headers, timeout_s)

    def send(
        self,
        method: str,
        path: str,
        body: bytes | None,
        headers: dict[str, str] | None = None,
        timeout_s: float | None = None,
    ) -> Reply:
        timeout = timeout_s if timeout_s is not None else self.timeout_s
        url = self.base_url + path
        try:
            response = self.session.request(
                method,
                url,
                data=body,
                headers=headers,
                timeout=(CONNECT_TIMEOUT_S, timeout),
                allow_redirects=False,
                stream=True,
            )
        except requests.Timeout:
            return Reply(problem=f"no answer to {method} {path} within {timeout:g} s")
        except requests.RequestException as exc:
            return Reply(problem=f"{method} {path} failed: {type(exc).__name__}: {exc}"[:300])
        with response:
            try:
                raw, complete = _read_bounded(response, time.monotonic() + timeout)
            except TimeoutError:
                return Reply(
                    status=response.status_code,
                    problem=f"the answer to {method} {path} took longer than {timeout:g} s",
                )
            except requests.RequestException as exc:
                return Reply(
                    status=response.status_code,
                    problem=f"{method} {path}: the answer broke off ({type(exc).__name__})",
                )
        reply = Reply(
            status=response.status_code,
            content_type=response.headers.get("Content-Type", ""),
            text=raw.decode("utf-8", "replace"),
            headers=dict(response.headers),
        )
        if not complete:
            reply.json_problem = f"the answer is larger than {MAX_BODY_BYTES} bytes"
            return reply
        try:
            reply.body = json.loads(raw, parse_constant=_refuse_constant)
        except ValueError as exc:
            reply.json_problem = f"not JSON ({exc})"
        return reply


def _read_bounded(response: requests.Response, deadline: float) -> tuple[bytes, bool]:
    """The body, at most :data:`MAX_BODY_BYTES` of it, read before ``deadline`` (a runner
    trickling bytes slower than the read timeout would otherwise hold the tool for ever)."""
    chunks = []
    size = 0
    for chunk in response.iter_content(64 * 1024):
        if time.monotonic() > deadline:
            raise TimeoutError
        chunks.append(chunk)
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            return b"".join(chunks)[:MAX_BODY_BYTES], False
    return b"".join(chunks), True


def _refuse_constant(name: str) -> Any:
    """NaN and Infinity are not JSON: a Zod peer's parser refuses them."""
    raise ValueError(f"{name} is not JSON")
