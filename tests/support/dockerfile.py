"""A Dockerfile's commands, read as Docker reads them, to run them outside a container.

No Docker engine runs where the tests run, so an image's commands are proven by parsing them
out of its Dockerfile and running them with the image's environment (the repository's image
and the one a generated project builds alike).
"""

from __future__ import annotations

import json
import re
import shlex
import signal
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path


def instruction(dockerfile: Path, name: str) -> str:
    """The text of the first ``name`` instruction, continuation lines joined."""
    return instructions(dockerfile, name)[0]


def instructions(dockerfile: Path, name: str) -> list[str]:
    """The text of every ``name`` instruction, in order, continuation lines joined."""
    text = dockerfile.read_text().replace("\\\n", " ")
    found = [m.group(1).strip() for m in re.finditer(rf"^{name}\s+(.*)$", text, re.MULTILINE)]
    assert found, f"{name} missing from {dockerfile}"
    return found


def exec_form(text: str) -> list[str]:
    """An exec-form (JSON array) command; shell form would not pass signals to gunicorn."""
    argv = json.loads(text)
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv)
    return argv


def image_env(dockerfile: Path) -> dict[str, str]:
    """Every ``ENV`` of the image, merged in order."""
    env: dict[str, str] = {}
    for text in instructions(dockerfile, "ENV"):
        env.update(pair.split("=", 1) for pair in shlex.split(text))
    return env


def healthcheck(dockerfile: Path) -> list[str]:
    health = instruction(dockerfile, "HEALTHCHECK")
    return exec_form(health[health.index("CMD") + 3 :].strip())


def serve_and_check(
    dockerfile: Path, *, cwd: Path, bin_dir: Path, env: Mapping[str, str], log: Path
) -> tuple[int, int, int]:
    """Run the image's CMD (its program taken from ``bin_dir``) and its HEALTHCHECK (with
    ``bin_dir``'s python) until it passes; then SIGTERM the server.

    Returns the health check's status while serving, the server's exit status, and the health
    check's status once it has stopped.
    """
    cmd = exec_form(instruction(dockerfile, "CMD"))
    cmd[0] = str(bin_dir / cmd[0])
    check = healthcheck(dockerfile)
    check[0] = str(bin_dir / "python")
    with log.open("wb") as out:
        server = subprocess.Popen(
            cmd,
            cwd=cwd,
            env=dict(env),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 30
            while True:
                serving = subprocess.run(check, env=dict(env), timeout=20, capture_output=True)
                if (
                    serving.returncode == 0
                    or time.monotonic() > deadline
                    or server.poll() is not None
                ):
                    break
                time.sleep(0.3)
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(30)
    stopped = subprocess.run(check, env=dict(env), timeout=20, capture_output=True)
    return serving.returncode, server.returncode, stopped.returncode
