"""A refused signature says why over real HTTP: missing, stale, from the future, or wrong.

A real runner (the example app under gunicorn, signing on) gets one request of each kind.
Each answer is a contract 401 whose code names the check (``SIGNATURE_MISSING``,
``TIMESTAMP_EXPIRED``, ``TIMESTAMP_IN_FUTURE``, ``SIGNATURE_INVALID``) and whose message says
what was wrong (by how much and against which window, for a timestamp) without giving away
the secret or the signature the runner expected.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Iterator

import pytest
import requests

from runnerkit.service.signing import sign
from tests.security.stack import QUICK, Stack, failure_envelope
from tests.support import GunicornProcess

pytestmark = pytest.mark.integration

SECRET = "refusal-test-secret"


@pytest.fixture(scope="module")
def signed_runner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GunicornProcess]:
    stack = Stack(tmp_path_factory.mktemp("refusals"))
    try:
        yield stack.runner(workers=1, env={"RUNNERKIT_SIGNING_SECRET": SECRET})
    finally:
        stack.stop()


def body() -> bytes:
    request = {
        "jobId": str(uuid.uuid4()),
        "moduleId": "signing",
        "capabilityId": "text-stats",
        "payload": {"text": "hello"},
    }
    return json.dumps(request).encode()


def now_ms() -> int:
    return int(time.time() * 1000)


def expected_signature(raw: bytes, stamp: str) -> str:
    return hmac.new(SECRET.encode(), stamp.encode() + b"." + raw, hashlib.sha256).hexdigest()


@pytest.mark.parametrize(
    ("case", "code", "says"),
    [
        ("missing", "SIGNATURE_MISSING", ["not signed", "no x-webhook-signature header"]),
        ("stale", "TIMESTAMP_EXPIRED", ["stale", "signed 400 s ago", "more than 300 s ago"]),
        ("future", "TIMESTAMP_IN_FUTURE", ["future", "120 s ahead", "at most 60 s ahead"]),
        ("wrong-secret", "SIGNATURE_INVALID", ["does not match", "another secret"]),
        ("altered-body", "SIGNATURE_INVALID", ["does not match", "body or timestamp changed"]),
    ],
)
def test_a_refused_signature_says_which_check_failed(
    signed_runner: GunicornProcess, case: str, code: str, says: list[str]
) -> None:
    raw = body()
    headers = {"Content-Type": "application/json"}
    sent = raw
    if case == "stale":
        headers.update(sign(raw, SECRET, timestamp_ms=now_ms() - 400_000))
    elif case == "future":
        # A few hundred ms pass before the runner reads it: still 119.x s ahead, shown as 119 s
        # or 120 s; 120_900 keeps the whole seconds at 120.
        headers.update(sign(raw, SECRET, timestamp_ms=now_ms() + 120_900))
    elif case == "wrong-secret":
        headers.update(sign(raw, "not-the-secret"))
    elif case == "altered-body":
        headers.update(sign(raw, SECRET))
        sent = raw.replace(b"hello", b"HELLO")

    response = requests.post(
        signed_runner.url + "/execute", data=sent, headers=headers, timeout=QUICK
    )

    assert response.status_code == 401, response.text
    error = failure_envelope(response)
    assert (error["category"], error["code"]) == ("AUTHENTICATION_ERROR", code)
    for words in says:
        assert words in error["message"], error["message"]
    assert SECRET not in response.text
    stamp = headers.get("x-webhook-timestamp")
    if stamp is not None:
        # The signature the runner would have wanted is never told.
        assert expected_signature(sent, stamp) not in response.text
