"""Request limits of a real gunicorn runner: body size, JSON depth and key count, media type.

The runner (tests/security/echo_app.py, 2 workers) runs with small limits so every edge is
cheap to reach: RUNNERKIT_MAX_BODY_BYTES=4096, RUNNERKIT_MAX_JSON_DEPTH=8,
RUNNERKIT_MAX_JSON_KEYS=50. Every refusal must be a contract envelope; the limit itself
(exactly at it) must still be accepted.
"""

from __future__ import annotations

import http.client
import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from tests.security.stack import QUICK, Stack, failure_envelope, strict_loads
from tests.support import GunicornProcess

pytestmark = pytest.mark.integration

MAX_BODY = 4096
MAX_DEPTH = 8
MAX_KEYS = 50
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GunicornProcess]:
    stack = Stack(tmp_path_factory.mktemp("limits"))
    try:
        yield stack.runner(
            "tests.security.echo_app:app",
            workers=2,
            env={
                "RUNNERKIT_MAX_BODY_BYTES": str(MAX_BODY),
                "RUNNERKIT_MAX_JSON_DEPTH": str(MAX_DEPTH),
                "RUNNERKIT_MAX_JSON_KEYS": str(MAX_KEYS),
            },
        )
    finally:
        stack.stop()


def body_with(payload: Any) -> dict[str, Any]:
    return {"jobId": str(uuid.uuid4()), "moduleId": "m", "capabilityId": "echo", "payload": payload}


def depth(value: Any) -> int:
    """Nesting depth as the runner counts it: the body is level 1, every value one deeper."""
    if isinstance(value, dict):
        return 1 + max((depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((depth(v) for v in value), default=0)
    return 1


def keys(value: Any) -> int:
    if isinstance(value, dict):
        return len(value) + sum(keys(v) for v in value.values())
    if isinstance(value, list):
        return sum(keys(v) for v in value)
    return 0


def nested_payload(total_depth: int) -> dict[str, Any]:
    """A body whose depth is exactly ``total_depth`` (payload is level 2)."""
    payload: Any = "leaf"
    for _ in range(total_depth - 2):
        payload = {"n": payload}
    body = body_with(payload)
    assert depth(body) == total_depth
    return body


def post(proc: GunicornProcess, data: bytes, headers: dict[str, str]) -> requests.Response:
    return requests.post(proc.url + "/execute", data=data, headers=headers, timeout=QUICK)


def padded(size: int) -> bytes:
    """A valid request of exactly ``size`` bytes."""
    skeleton = json.dumps(body_with({"pad": ""})).encode()
    raw = json.dumps(body_with({"pad": "x" * (size - len(skeleton))})).encode()
    assert len(raw) == size
    return raw


def test_a_body_at_the_limit_runs_and_one_byte_more_is_413(limited: GunicornProcess) -> None:
    with requests.Session() as session:
        at_limit = session.post(
            limited.url + "/execute", data=padded(MAX_BODY), headers=JSON, timeout=QUICK
        )
        assert at_limit.status_code == 200, at_limit.text
        over = session.post(
            limited.url + "/execute", data=padded(MAX_BODY + 1), headers=JSON, timeout=QUICK
        )
        assert over.status_code == 413, over.text
        error = failure_envelope(over)
        assert (error["category"], error["code"]) == ("VALIDATION_ERROR", "PAYLOAD_TOO_LARGE")
        assert str(MAX_BODY) in error["message"]
        # The runner asks for "Connection: close", but gunicorn drops hop-by-hop headers of
        # the app and keeps the connection (draining the unread body): the next request on
        # the same connection must still be answered correctly.
        again = session.post(
            limited.url + "/execute", data=padded(MAX_BODY), headers=JSON, timeout=QUICK
        )
        assert again.status_code == 200, again.text


def test_a_much_larger_body_is_413_and_the_server_stays_healthy(limited: GunicornProcess) -> None:
    for _ in range(5):
        response = post(limited, padded(200_000), JSON)
        assert response.status_code == 413
        failure_envelope(response)
    assert requests.get(limited.url + "/health", timeout=QUICK).status_code == 200


def _chunked(raw: bytes) -> Iterator[bytes]:
    for start in range(0, len(raw), 1000):
        yield raw[start : start + 1000]


@pytest.mark.parametrize("tail", ["truncated-json", "valid-json-then-spaces"])
def test_a_chunked_body_over_the_limit_is_413(limited: GunicornProcess, tail: str) -> None:
    if tail == "truncated-json":
        raw = padded(MAX_BODY * 3)
    else:
        raw = padded(MAX_BODY - 100) + b" " * (MAX_BODY * 2)
    response = requests.post(
        limited.url + "/execute", data=_chunked(raw), headers=JSON, timeout=QUICK
    )
    assert response.request.headers.get("Transfer-Encoding") == "chunked"
    assert response.status_code == 413, response.text


def test_a_chunked_body_within_the_limit_runs(limited: GunicornProcess) -> None:
    response = requests.post(
        limited.url + "/execute", data=_chunked(padded(3000)), headers=JSON, timeout=QUICK
    )
    assert response.status_code == 200, response.text


def test_nesting_at_the_depth_limit_runs_and_one_level_more_is_400(
    limited: GunicornProcess,
) -> None:
    ok = post(limited, json.dumps(nested_payload(MAX_DEPTH)).encode(), JSON)
    assert ok.status_code == 200, ok.text
    deep = post(limited, json.dumps(nested_payload(MAX_DEPTH + 1)).encode(), JSON)
    assert deep.status_code == 400, deep.text
    error = failure_envelope(deep)
    assert (error["category"], error["code"]) == ("VALIDATION_ERROR", "BODY_TOO_DEEP")


@pytest.mark.parametrize("kind", ["arrays", "objects"])
def test_nesting_far_beyond_the_parsers_recursion_is_a_clean_400(
    limited: GunicornProcess, kind: str
) -> None:
    """2,000 levels (within the size limit): the parser's own recursion guard answers 400."""
    opening, closing = ("[", "]") if kind == "arrays" else ('{"a":', "}")
    levels = (MAX_BODY - 100) // (len(opening) + len(closing))
    raw = ('{"payload":' + opening * levels + "1" + closing * levels + "}").encode()
    assert len(raw) <= MAX_BODY
    response = post(limited, raw, JSON)
    assert response.status_code == 400, response.text
    assert failure_envelope(response)["category"] == "VALIDATION_ERROR"


def test_keys_at_the_limit_run_and_one_more_is_400(limited: GunicornProcess) -> None:
    def with_keys(total: int) -> bytes:
        body = body_with({})
        body["payload"] = {f"k{i}": i for i in range(total - keys(body))}
        assert keys(body) == total
        return json.dumps(body).encode()

    ok = post(limited, with_keys(MAX_KEYS), JSON)
    assert ok.status_code == 200, ok.text
    many = post(limited, with_keys(MAX_KEYS + 1), JSON)
    assert many.status_code == 400, many.text
    error = failure_envelope(many)
    assert (error["category"], error["code"]) == ("VALIDATION_ERROR", "BODY_TOO_MANY_KEYS")
    # Keys in nested objects count too.
    spread = body_with({f"o{i}": {"a": 1, "b": 2} for i in range(20)})
    response = post(limited, json.dumps(spread).encode(), JSON)
    assert keys(spread) > MAX_KEYS and response.status_code == 400
    assert failure_envelope(response)["code"] == "BODY_TOO_MANY_KEYS"


@pytest.mark.parametrize(
    "content_type",
    [
        None,
        "text/plain",
        "application/xml",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/jsonx",
        "json",
    ],
)
def test_a_body_that_is_not_declared_json_is_415(
    limited: GunicornProcess, content_type: str | None
) -> None:
    raw = json.dumps(body_with({"a": 1})).encode()
    conn = http.client.HTTPConnection(limited.host, limited.port, timeout=10)
    try:
        headers = {"Content-Length": str(len(raw))}
        if content_type is not None:
            headers["Content-Type"] = content_type
        conn.request("POST", "/execute", body=raw, headers=headers)
        response = conn.getresponse()
        text = response.read()
    finally:
        conn.close()
    assert response.status == 415, text
    body = strict_loads(text)
    assert body["success"] is False
    assert body["error"]["code"] == "UNSUPPORTED_MEDIA_TYPE" or body["error"]["category"] == (
        "VALIDATION_ERROR"
    )
    assert response.getheader("Content-Type", "").startswith("application/json")


@pytest.mark.parametrize(
    "raw",
    [b"", b"\xff\xfe{}", b"{", b"[]", b'"text"', b"null", b'{"a": NaN}', b'{"a": 1e400}'],
    ids=["empty", "not-utf8", "truncated", "array", "string", "null", "nan", "overflow"],
)
def test_declared_json_that_is_not_a_json_object_is_400(
    limited: GunicornProcess, raw: bytes
) -> None:
    response = post(limited, raw, JSON)
    assert response.status_code == 400, response.text
    assert failure_envelope(response)["category"] == "VALIDATION_ERROR"
