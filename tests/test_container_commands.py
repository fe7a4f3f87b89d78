"""The Dockerfile's CMD and HEALTHCHECK, run exactly as written, outside a container.

No Docker engine runs where the tests run, so this is how the image's two commands are
proven: parse them out of deploy/Dockerfile and run them with the image's environment.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import free_port
from tests.support.dockerfile import exec_form, healthcheck, image_env, instruction, serve_and_check

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"


def test_cmd_and_healthcheck_are_exec_form_and_need_no_extra_package() -> None:
    cmd = exec_form(instruction(DOCKERFILE, "CMD"))
    assert cmd[:3] == ["gunicorn", "-c", "deploy/gunicorn.conf.py"]
    argv = healthcheck(DOCKERFILE)
    assert argv[0] == "python" and "urllib.request" in argv[2]
    health = instruction(DOCKERFILE, "HEALTHCHECK")
    assert "curl" not in health and "wget" not in health


def test_the_image_runs_as_a_non_root_user() -> None:
    assert re.search(r"^USER\s+(?!root|0\b)\S+", DOCKERFILE.read_text(), re.MULTILINE)


@pytest.mark.integration
def test_cmd_serves_and_healthcheck_reports_it(tmp_path: Path) -> None:
    env = {
        **os.environ,
        **image_env(DOCKERFILE),
        "PORT": str(free_port()),
        "BIND_HOST": "127.0.0.1",
        "RUNNERKIT_STATE_DIR": str(tmp_path / "state"),
    }
    env.pop("RUNNERKIT_JOBFORGE_URL", None)
    log = tmp_path / "gunicorn.log"
    serving, exited, stopped = serve_and_check(
        DOCKERFILE, cwd=ROOT, bin_dir=Path(sys.executable).parent, env=env, log=log
    )
    assert serving == 0, log.read_text()[-3000:]
    assert exited == 0, "gunicorn did not stop cleanly on SIGTERM"
    assert stopped != 0


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

    from runnerkit.cli.scaffold import TEMPLATES

    for origin, text in (
        ("deploy/docker-compose.yml", (ROOT / "deploy" / "docker-compose.yml").read_text()),
        ("the project template", TEMPLATES["deploy/docker-compose.yml"]),
    ):
        services = yaml.safe_load(text)["services"]
        restart = {name: service.get("restart") for name, service in services.items()}
        assert restart == {"forge": "unless-stopped", "runner": "unless-stopped"}, origin


def test_the_postgresql_compose_file_runs_two_forges_on_one_database_behind_one_url_list() -> None:
    """deploy/docker-compose.postgres.yml: a ``postgres`` service, two forge instances on its
    database (each with local files of its own), and a runner given both forges' URLs."""
    import yaml

    from runnerkit.forge.settings import ForgeSettings

    single = yaml.safe_load((ROOT / "deploy" / "docker-compose.yml").read_text())["services"]
    text = (ROOT / "deploy" / "docker-compose.postgres.yml").read_text()
    services = yaml.safe_load(text)["services"]
    assert set(services) == {"postgres", "forge-a", "forge-b", "runner"}
    assert {s.get("restart") for s in services.values()} == {"unless-stopped"}
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    forges = [services["forge-a"], services["forge-b"]]
    urls = {f["environment"]["RUNNERKIT_FORGE_DB_URL"] for f in forges}
    assert len(urls) == 1, urls
    url = urls.pop().replace("${POSTGRES_PASSWORD:-runnerkit}", "runnerkit")
    assert url.startswith("postgresql://runnerkit:runnerkit@postgres:5432/"), url
    for forge in forges:
        # The same command and health check as the single forge's, on the shared database.
        assert forge["command"] == single["forge"]["command"]
        assert forge["healthcheck"]["test"] == single["forge"]["healthcheck"]["test"]
        assert forge["depends_on"]["postgres"]["condition"] == "service_healthy"
        environ = {**forge["environment"], "RUNNERKIT_FORGE_DB_URL": url}
        settings = ForgeSettings.load({}, environ=environ)
        assert settings.db_url == url
    assert len({f["ports"][0].split(":")[0] for f in forges}) == 2  # published apart
    assert len({f["volumes"][0].split(":")[0] for f in forges}) == 2  # local files apart
    runner = services["runner"]
    port = single["forge"]["command"][-1]
    assert runner["environment"]["RUNNERKIT_JOBFORGE_URL"] == (
        f"http://forge-a:{port},http://forge-b:{port}"
    )
    assert set(runner["depends_on"]) == {"forge-a", "forge-b"}
