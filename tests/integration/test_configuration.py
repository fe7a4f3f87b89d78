"""Settings a runner cannot use are refused at startup, and ones it ignores are named."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import requests

from runnerkit.cli.scaffold import create_project
from runnerkit.forge.settings import ForgeSettings
from runnerkit.runner.config import Settings, unknown_settings
from runnerkit.service.settings import ConfigError
from tests.support import REPO_ROOT


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("127.0.0.1:3002", "write it as http://127.0.0.1:3002"),
        ("localhost", "write it as http://localhost"),
        ("ftp://forge:21", "not an http(s) base URL"),
        ("http://", "not an http(s) base URL"),
        ("http://forge:99999", "not a usable URL"),
        ("http://forge:0", "port 0"),
    ],
)
def test_an_unusable_jobforge_url_is_a_configuration_error(url: str, says: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.load({}, {"RUNNERKIT_JOBFORGE_URL": url})
    assert "RUNNERKIT_JOBFORGE_URL" in str(info.value)
    assert says in str(info.value)


def test_usable_urls_load_without_their_trailing_slash() -> None:
    settings = Settings.load(
        {}, {"JOBFORGE_URL": "http://127.0.0.1:3002/", "RUNNERKIT_TRUTHCORE_URL": "https://tc"}
    )
    assert settings.jobforge_url == "http://127.0.0.1:3002"
    assert settings.truthcore_url == "https://tc"


def test_a_misspelled_setting_is_named_with_the_one_meant() -> None:
    lines = unknown_settings(
        {
            "RUNNERKIT_JOBFORGE_ULR": "http://x",
            "RUNNERKIT_SIGNING_SECRET": "s",  # a real setting: nothing to say
            "RUNNERKIT_FORGE_TOKEN": "t",  # the forge's own
            "RUNNERKIT_NONSENSE": "1",
            "PATH": "/bin",
        }
    )
    assert lines == [
        "RUNNERKIT_JOBFORGE_ULR is not a runnerkit setting and is ignored; "
        "did you mean RUNNERKIT_JOBFORGE_URL?",
        "RUNNERKIT_NONSENSE is not a runnerkit setting and is ignored (see docs/configuration.md)",
    ]


@pytest.mark.integration
def test_a_served_runner_says_it_runs_standalone_and_names_a_misspelled_url(
    start_gunicorn: Any,
) -> None:
    proc = start_gunicorn(workers=1, env={"RUNNERKIT_JOBFORGE_ULR": "http://127.0.0.1:3002"})
    assert requests.get(proc.url + "/health/live", timeout=5).status_code == 200
    log = proc.log_text()
    assert "running standalone" in log and "RUNNERKIT_JOBFORGE_URL=http://" in log
    assert "did you mean RUNNERKIT_JOBFORGE_URL?" in log


@pytest.mark.integration
def test_a_runner_given_a_url_without_a_scheme_does_not_start(start_gunicorn: Any) -> None:
    proc = start_gunicorn(workers=1, wait=False, env={"RUNNERKIT_JOBFORGE_URL": "127.0.0.1:3002"})
    assert proc.wait_exit(timeout=30) not in (None, 0)
    assert "write it as http://127.0.0.1:3002" in proc.log_text()


def _example_env(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        name, sep, value = line.partition("=")
        if sep and not name.startswith("#"):
            env[name.strip()] = value.strip()
    return env


@pytest.mark.parametrize(
    "example", [REPO_ROOT / "deploy" / "runnerkit.env.example", "generated"], ids=str
)
def test_an_env_file_copied_unchanged_from_the_example_does_not_start(
    example: Path | str, tmp_path: Path
) -> None:
    if example == "generated":
        create_project("demo", tmp_path / "demo", runnerkit_spec="runnerkit")
        example = tmp_path / "demo" / "deploy" / "runnerkit.env.example"
    env = _example_env(Path(example))
    assert {"RUNNERKIT_SIGNING_SECRET", "RUNNERKIT_FORGE_TOKEN", "RUNNERKIT_RUNNER_TOKEN"} <= set(
        env
    )
    for name, value in env.items():
        load = ForgeSettings.load if name.startswith("RUNNERKIT_FORGE_") else Settings.load
        with pytest.raises(ConfigError) as info:
            load({}, {name: value})
        assert name in str(info.value) and "placeholder" in str(info.value)
    # The forge reads the runner's signing secret too (one env file for both).
    with pytest.raises(ConfigError):
        ForgeSettings.load({}, {"RUNNERKIT_SIGNING_SECRET": env["RUNNERKIT_SIGNING_SECRET"]})
