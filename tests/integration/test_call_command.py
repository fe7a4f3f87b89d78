"""`runnerkit call`: one signed POST /execute sent by hand, as JobForge would sign it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support import REPO_ROOT

pytestmark = pytest.mark.integration

SECRET = "call-command-secret-0123456789abcdef"


def call(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("RUNNERKIT_")}
    return subprocess.run(
        [sys.executable, "-m", "runnerkit", "call", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**base, **(env or {})},
    )


def test_call_signs_with_the_stack_secret_and_prints_the_answer(
    start_gunicorn: Any, tmp_path: Path
) -> None:
    proc = start_gunicorn(workers=1, env={"RUNNERKIT_SIGNING_SECRET": SECRET})
    secret_file = tmp_path / "signing-secret"
    secret_file.write_text(SECRET + "\n")

    signed = call(
        "text-stats",
        "--data",
        '{"text": "a b a", "top": 1}',
        "--url",
        proc.url,
        "--secret-file",
        str(secret_file),
    )
    assert signed.returncode == 0, signed.stdout + signed.stderr
    answer = json.loads(signed.stdout)
    assert answer["success"] is True and answer["data"]["words"] == 3, answer

    unsigned = call("text-stats", "--data", '{"text": "x"}', "--url", proc.url)
    assert unsigned.returncode == 1
    assert "sending unsigned" in unsigned.stderr
    error = json.loads(unsigned.stdout)["error"]
    assert error["code"] == "SIGNATURE_MISSING"


def test_call_without_a_runner_says_it_cannot_reach_it() -> None:
    result = call(
        "text-stats", "--url", "http://127.0.0.1:1", env={"RUNNERKIT_SIGNING_SECRET": "s"}
    )
    assert result.returncode == 1
    assert "cannot reach http://127.0.0.1:1" in result.stderr
