"""A real runner answers what its advertised outputSchema says: no coercion, no silent drops.

The runner is ``tests/security/echo_app.py`` under gunicorn (2 workers). Its ``leak``
capability returns ``{payload.field: payload.secret_value}``, so a test chooses exactly
which key and value ``run`` hands back. The ``outputSchema`` it registers (``GET
/capabilities``) says ``count`` is an integer and no other keys are allowed; the answers
over HTTP must agree: ``"640"`` for ``count`` and an undeclared key are 500
``SCHEMA_MISMATCH`` naming the field, and 640 is answered as 640.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from tests.security.stack import QUICK, Stack, failure_envelope
from tests.support import GunicornProcess

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def leak_runner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GunicornProcess]:
    stack = Stack(tmp_path_factory.mktemp("output-check"))
    try:
        yield stack.runner("tests.security.echo_app:app", workers=2)
    finally:
        stack.stop()


def returned(runner: GunicornProcess, field: str, value: Any) -> requests.Response:
    """The answer to a job whose ``run`` returns ``{field: value}``."""
    body = {
        "jobId": str(uuid.uuid4()),
        "moduleId": "output-check",
        "capabilityId": "leak",
        "payload": {"field": field, "secret_value": value},
    }
    return requests.post(runner.url + "/execute", json=body, timeout=QUICK)


def test_the_advertised_schema_is_what_the_answers_follow(leak_runner: GunicornProcess) -> None:
    document = requests.get(leak_runner.url + "/capabilities", timeout=QUICK).json()
    (leak,) = [c for c in document["capabilities"] if c["id"] == "leak"]
    schema = leak["outputSchema"]
    assert schema["additionalProperties"] is False
    assert schema["properties"]["count"]["type"] == "integer"

    fine = returned(leak_runner, "count", 640)
    assert fine.status_code == 200, fine.text
    assert fine.json()["data"] == {"count": 640}


@pytest.mark.parametrize(
    ("field", "value", "message", "path"),
    [
        ("count", "640", "Not a valid integer.", ["data", "count"]),
        ("count", 6.4, "Not a valid integer.", ["data", "count"]),
        ("undeclared", 640, "Unknown field.", ["data", "undeclared"]),
    ],
)
def test_a_value_of_another_type_or_an_undeclared_key_is_schema_mismatch(
    leak_runner: GunicornProcess, field: str, value: Any, message: str, path: list[str]
) -> None:
    response = returned(leak_runner, field, value)

    assert response.status_code == 500, response.text
    error = failure_envelope(response)
    assert (error["category"], error["code"]) == ("SCHEMA_MISMATCH", "OUTPUT_SCHEMA_MISMATCH")
    assert error["retryable"] is False
    assert field in error["message"]
    assert [(d["path"], d["message"]) for d in error["details"]] == [(path, message)]
