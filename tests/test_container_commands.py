"""The Dockerfile's CMD and HEALTHCHECK, run exactly as written, outside a container.

No Docker engine runs where the tests run, so this is how the image's two commands are
proven: parse them out of deploy/Dockerfile and run them with the image's environment.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import free_port

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"


def instruction(name: str) -> str:
    """The text of one Dockerfile instruction, continuation lines joined."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    match = re.search(rf"^{name}\s+(.*)$", text, re.MULTILINE)
    assert match, f"{name} missing from {DOCKERFILE}"
    return match.group(1).strip()


def exec_form(text: str) -> list[str]:
    """An exec-form (JSON array) command; shell form would not pass signals to gunicorn."""
    argv = json.loads(text)
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv)
    return argv


def image_env() -> dict[str, str]:
    pairs = shlex.split(instruction("ENV"))
    return dict(pair.split("=", 1) for pair in pairs)


def test_cmd_and_healthcheck_are_exec_form_and_need_no_extra_package() -> None:
    cmd = exec_form(instruction("CMD"))
    assert cmd[:3] == ["gunicorn", "-c", "deploy/gunicorn.conf.py"]
    health = instruction("HEALTHCHECK")
    argv = exec_form(health[health.index("CMD") + 3 :].strip())
    assert argv[0] == "python" and "urllib.request" in argv[2]
    assert "curl" not in health and "wget" not in health


def test_the_image_runs_as_a_non_root_user() -> None:
    assert re.search(r"^USER\s+(?!root|0\b)\S+", DOCKERFILE.read_text(), re.MULTILINE)


@pytest.mark.integration
def test_cmd_serves_and_healthcheck_reports_it(tmp_path: Path) -> None:
    port = free_port()
    env = {
        **os.environ,
        **image_env(),
        "PORT": str(port),
        "BIND_HOST": "127.0.0.1",
        "RUNNERKIT_STATE_DIR": str(tmp_path / "state"),
    }
    env.pop("RUNNERKIT_JOBFORGE_URL", None)
    cmd = exec_form(instruction("CMD"))
    # The same argv, with gunicorn's script taken from this interpreter's environment.
    cmd[0] = str(Path(sys.executable).with_name("gunicorn"))
    health = instruction("HEALTHCHECK")
    check = exec_form(health[health.index("CMD") + 3 :].strip())
    check[0] = sys.executable
    log = (tmp_path / "gunicorn.log").open("wb")
    server = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            ok = subprocess.run(check, env=env, timeout=20, capture_output=True)
            if ok.returncode == 0 or time.monotonic() > deadline or server.poll() is not None:
                break
            time.sleep(0.3)
        assert ok.returncode == 0, (tmp_path / "gunicorn.log").read_text()[-3000:]
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)
        log.close()
    assert server.returncode == 0, "gunicorn did not stop cleanly on SIGTERM"
    down = subprocess.run(check, env=env, timeout=20, capture_output=True)
    assert down.returncode != 0


_POST_FORK_PROBE = """
import runpy, sys, types
conf = runpy.run_path("deploy/gunicorn.conf.py")
before = set(sys.modules)
worker = types.SimpleNamespace(cfg=types.SimpleNamespace(threads=8), age=1)
conf["post_fork"](None, worker)
print(sorted(m for m in set(sys.modules) - before))
"""


def test_post_fork_imports_nothing_so_no_early_sigterm_is_lost() -> None:
    # post_fork runs in the new worker before gunicorn installs the worker's signal
    # handlers: a SIGTERM arriving during slow work there is lost, and the worker outlives
    # the shutdown (seen when imports ran there).
    done = subprocess.run(
        [sys.executable, "-c", _POST_FORK_PROBE],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "GUNICORN_PIN_WORKERS": "1"},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", done.stdout


def test_compose_files_restart_a_service_that_exits() -> None:
    """gunicorn halts when its workers cannot boot; compose must start it again (the repo's
    compose file and the one ``runnerkit new`` writes)."""
    import yaml

    from runnerkit.scaffold import TEMPLATES

    for origin, text in (
        ("deploy/docker-compose.yml", (ROOT / "deploy" / "docker-compose.yml").read_text()),
        ("the project template", TEMPLATES["deploy/docker-compose.yml"]),
    ):
        services = yaml.safe_load(text)["services"]
        restart = {name: service.get("restart") for name, service in services.items()}
        assert restart == {"forge": "unless-stopped", "runner": "unless-stopped"}, origin
