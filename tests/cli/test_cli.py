"""The `runnerkit` command: new, manifest, validate, submit, runners, jobs."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from click.testing import CliRunner

from runnerkit.cli import main
from runnerkit.testing import ContractValidator
from tests.support import free_port
from tests.support.dockerfile import image_env, instruction, instructions, serve_and_check

ROOT = Path(__file__).resolve().parents[2]
APPS = "tests.cli.apps"


@pytest.fixture(autouse=True)
def _isolated_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNNERKIT_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delenv("RUNNERKIT_JOBFORGE_URL", raising=False)
    monkeypatch.chdir(ROOT)


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


# --------------------------------------------------------------------------- help


@pytest.mark.parametrize(
    "command",
    [
        "new",
        "manifest",
        "validate",
        "conformance",
        "forge",
        "submit",
        "call",
        "runners",
        "jobs",
        "up",
    ],
)
def test_every_command_has_help_with_an_example(command: str) -> None:
    code, out, _ = run(command, "--help")
    assert code == 0
    assert "Example: runnerkit" in out


# --------------------------------------------------------------------------- manifest


def test_manifest_prints_a_valid_registration_document() -> None:
    code, out, _ = run("manifest", f"{APPS}.good:app")
    assert code == 0
    document = json.loads(out)
    assert ContractValidator().validate("RunnerRegistrationRequest", document).valid
    assert [c["id"] for c in document["capabilities"]] == ["upper"]


@pytest.mark.parametrize("command", ["validate", "manifest"])
def test_commands_that_serve_nothing_do_not_warn_about_serving(command: str) -> None:
    """The example app has no signing secret; ``validate`` and ``manifest`` serve no port."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNNERKIT_SIGNING")}
    env.pop("SERVER_SOFTWARE", None)
    result = subprocess.run(
        [sys.executable, "-m", "runnerkit", command, "app:app"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "SIGNING IS OFF" not in result.stdout + result.stderr


# --------------------------------------------------------------------------- validate


def test_validate_a_good_app_exits_0() -> None:
    code, out, _ = run("validate", f"{APPS}.good:app")
    assert code == 0, out
    assert "good-runner: valid" in out
    assert "upper: example 1 runs and matches Output" in out


@pytest.mark.parametrize(
    ("target", "named"),
    [
        ("defects:duplicate_job_types", "'shared.type' is handled by both 'one' and 'two'"),
        ("defects:bad_example_input", "input does not pass Input"),
        ("defects:wrong_example_output", "differs from the expected"),
        ("defects:broken_schema", "inputSchema:"),
        ("defects:bad_health_url", "healthCheckEndpoint"),
        ("bad_semver:runner", "Broken.version: 'one' is not a semantic version"),
    ],
)
def test_validate_names_each_kind_of_defect_and_exits_1(target: str, named: str) -> None:
    code, out, _ = run("validate", f"{APPS}.{target}")
    assert code == 1, out
    assert named in out
    assert "INVALID" in out


def test_validate_exits_2_when_the_app_cannot_be_loaded() -> None:
    code, _, err = run("validate", f"{APPS}.import_error:app")
    assert code == 2
    assert err.startswith("error: cannot load") and "a_module_that_does_not_exist" in err
    assert len(err.strip().splitlines()) == 1


def test_validate_exits_2_without_a_traceback_when_the_app_refuses_to_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The example app in production without a signing secret raises ConfigError at import.
    monkeypatch.setenv("RUNNERKIT_ENVIRONMENT", "production")
    monkeypatch.delenv("RUNNERKIT_SIGNING_SECRET", raising=False)
    monkeypatch.delitem(sys.modules, "app", raising=False)
    code, _, err = run("validate", "app:app")
    assert code == 2
    assert err.startswith("error: cannot load app:app: ConfigError")
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    monkeypatch.delitem(sys.modules, "app", raising=False)
    code, _, err = run("manifest", "app:app")
    assert code == 1 and "cannot load app:app: ConfigError" in err and "Traceback" not in err


def test_validate_json_and_junit_outputs_parse(tmp_path: Path) -> None:
    junit = tmp_path / "reports" / "contract.xml"
    code, out, _ = run(
        "validate", f"{APPS}.defects:duplicate_job_types", "--json", "--junit", str(junit)
    )
    assert code == 1
    report = json.loads(out)
    assert report["valid"] is False
    failed = [c for c in report["checks"] if not c["ok"]]
    assert len(failed) == 1 and "shared.type" in failed[0]["problems"][0]
    suite = ET.parse(junit).getroot()
    assert suite.tag == "testsuite"
    assert int(suite.get("tests", "0")) == len(report["checks"])
    assert int(suite.get("failures", "0")) == 1
    assert len(suite.findall("testcase/failure")) == 1


# --------------------------------------------------------------------------- new


def test_new_refuses_a_non_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    code, _, err = run("new", "my-runner", "--dir", str(tmp_path / "taken"))
    assert code == 1
    assert "is not empty" in err


def test_new_refuses_a_bad_name(tmp_path: Path) -> None:
    code, _, err = run("new", "My Runner!", "--dir", str(tmp_path / "x"))
    assert code == 1
    assert "lower-case" in err


@pytest.mark.integration
def test_a_new_project_passes_its_own_make_test(tmp_path: Path) -> None:
    project = tmp_path / "hello-runner"
    code, out, _ = run("new", "hello-runner", "--dir", str(project))
    assert code == 0, out
    for expected in (
        "setup.cfg",
        "app.py",
        "tests/test_app.py",
        "deploy/Dockerfile",
        "deploy/docker-compose.yml",
        "Makefile",
        "README.md",
    ):
        assert (project / expected).is_file(), expected
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    lint = subprocess.run(
        [hadolint, str(project / "deploy" / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert lint.returncode == 0, lint.stdout + lint.stderr
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RUNNERKIT_", "PYTEST"))}
    env["PYTHON"] = sys.executable
    result = subprocess.run(
        ["make", "test", f"PYTHON={sys.executable}"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "hello-runner: valid" in result.stdout
    assert "3 passed" in result.stdout
    # The project's README: `make run` (runnerkit up) submits its sample jobs.
    assert not (project / "deploy" / "runnerkit.env").exists()  # a secret is never generated
    up = subprocess.run(
        [
            str(project / ".venv" / "bin" / "runnerkit"),
            "up",
            "app:app",
            "--forge-port",
            str(free_port()),
            "--runner-port",
            str(free_port()),
            "--exit-after-samples",
        ],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert up.returncode == 0, (up.stdout + up.stderr)[-4000:]
    assert '"greeting": "Bonjour, Ada!"' in up.stdout
    assert "fails validation" in up.stdout and "VALIDATION_ERROR" in up.stdout
    assert_the_project_ships(project, env, tmp_path)


FIXED_JOB_TEST = """\


def test_a_fixed_job_id_runs_on_every_test_run(runner_client: RunnerClient) -> None:
    response = runner_client.execute(
        "greet", {"name": "Ada"}, jobId="0b1c2d3e-4f50-4a6b-8c7d-9e0f1a2b3c4d"
    )
    assert response.status_code == 200, response.get_json()
    assert "Idempotent-Replayed" not in response.headers
"""


def test_a_new_projects_tests_pass_run_after_run(tmp_path: Path) -> None:
    """Its test fixture's app keeps its ledger in the test's tmp_path, not in the state
    directory of the app that ``app.py`` made at import: a fixed jobId is new every run."""
    from runnerkit.cli.scaffold import create_project

    project = tmp_path / "hello-runner"
    create_project("hello-runner", project, runnerkit_spec="runnerkit")
    generated = project / "tests" / "test_app.py"
    generated.write_text(generated.read_text() + FIXED_JOB_TEST)  # beside its runner_app
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RUNNERKIT_", "PYTEST"))}
    (tmp_path / "tmp").mkdir()
    env["TMPDIR"] = str(tmp_path / "tmp")  # app.py's own default state dir lives here

    for run_number in (1, 2):
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
            cwd=project,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, (run_number, (result.stdout + result.stderr)[-4000:])
        assert "4 passed" in result.stdout, result.stdout[-2000:]


def assert_the_project_ships(project: Path, env: dict[str, str], tmp_path: Path) -> None:
    """What `make docker` would build needs no package index for runnerkit, and the image's
    commands serve, as the repository's own image does."""
    dockerfile = project / "deploy" / "Dockerfile"
    (wheel,) = (project / "vendor").glob("runnerkit-*.whl")
    runs = instructions(dockerfile, "RUN")
    assert f"pip install vendor/{wheel.name}" in runs
    assert f"vendor/{wheel.name}" in instruction(dockerfile, "COPY")
    # The wheel installs with no index at all (its own dependencies aside).
    offline = subprocess.run(
        [
            *(sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--quiet"),
            *("--target", str(tmp_path / "offline"), str(wheel)),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert offline.returncode == 0, offline.stderr
    assert (tmp_path / "offline" / "runnerkit" / "forge" / "templates").is_dir()

    image = {
        **env,
        **image_env(dockerfile),
        "PORT": str(free_port()),
        "BIND_HOST": "127.0.0.1",
        "RUNNERKIT_STATE_DIR": str(tmp_path / "image-state"),
    }
    log = tmp_path / "image.log"
    serving, exited, stopped = serve_and_check(
        dockerfile, cwd=project, bin_dir=project / ".venv" / "bin", env=image, log=log
    )
    assert (serving, exited) == (0, 0), log.read_text()[-3000:]
    assert stopped != 0

    compose = (project / "deploy" / "docker-compose.yml").read_text()
    assert "RUNNERKIT_ENVIRONMENT: production" in compose
    assert "stop_grace_period: 70s" in compose  # above gunicorn's 60 s graceful timeout


def test_the_documented_url_and_token_variables_reach_the_forge(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from runnerkit.cli import forge_client as cli

    monkeypatch.setenv("JOBFORGE_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("RUNNERKIT_JOBFORGE_URL", "http://127.0.0.1:2/")
    assert cli.forge_url(None) == "http://127.0.0.1:2"  # the prefixed name wins
    # A runner's failover list: the CLI calls the first forge of it.
    monkeypatch.setenv("RUNNERKIT_JOBFORGE_URL", " http://127.0.0.1:2/ ,http://127.0.0.1:3")
    assert cli.forge_url(None) == "http://127.0.0.1:2"
    seen: dict[str, object] = {}

    def fake_request(method: str, url: str, **kwargs: object) -> object:
        seen.update(kwargs)
        return object()

    monkeypatch.setattr(cli.requests, "request", fake_request)
    monkeypatch.delenv("RUNNERKIT_FORGE_TOKEN", raising=False)
    monkeypatch.setenv("RUNNERKIT_RUNNER_TOKEN", "sekrit")
    cli.forge_call("GET", "http://127.0.0.1:2/runners")
    assert seen["headers"] == {"Authorization": "Bearer sekrit"}


def test_submit_reads_data_from_a_file_or_stdin_beyond_the_argument_limit(
    forge_server: str, tmp_path: Path
) -> None:
    # One argument may hold at most 128 KiB on Linux: this payload could not be passed inline.
    payload = {"text": "x" * 300_000, "n": 7}
    path = tmp_path / "payload.json"
    path.write_text(json.dumps(payload))

    from_file = CliRunner().invoke(
        main, ["submit", "--type", "no.runner", "--data", f"@{path}", "--url", forge_server]
    )
    from_stdin = CliRunner().invoke(
        main,
        ["submit", "--type", "no.runner", "--data", "-", "--url", forge_server],
        input=json.dumps(payload),
    )

    for result in (from_file, from_stdin):
        assert result.exit_code == 0, result.output[-2000:]
        assert json.loads(result.stdout)["request"]["payload"]["data"] == payload


@pytest.mark.parametrize(
    ("data", "says"),
    [("@/nonexistent/payload.json", "cannot read"), ("-", "must be a JSON object")],
)
def test_submit_names_an_unreadable_data_source(data: str, says: str) -> None:
    result = CliRunner().invoke(
        main, ["submit", "--type", "t", "--data", data, "--url", "http://127.0.0.1:1"], input="[1]"
    )
    assert result.exit_code == 2
    assert "--data" in result.output and says in result.output


def _up(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "runnerkit", "up", *args, "--exit-after-samples"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={k: v for k, v in os.environ.items() if not k.startswith("RUNNERKIT_")},
    )


@pytest.mark.parametrize("which", ["--forge-port", "--runner-port"])
def test_up_stops_at_once_on_a_busy_port_naming_it(which: str, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        other = "--runner-port" if which == "--forge-port" else "--forge-port"
        up = _up("app:app", which, str(port), other, str(free_port()), "--state", str(tmp_path))
    assert up.returncode == 2, up.stdout + up.stderr
    assert f"port {port}" in up.stderr and which in up.stderr
    assert "starting" not in up.stdout  # nothing was started, nothing to attach to


@pytest.mark.integration
def test_up_exits_non_zero_when_a_sample_does_not_end_as_expected(tmp_path: Path) -> None:
    samples = tmp_path / "samples.json"
    samples.write_text(
        json.dumps(
            [
                {"type": "data.checksum", "data": {"data": "x", "algorithm": "sha256"}},
                {"type": "text.stats", "data": {"text": 42}, "expect": "failed"},
                {"type": "text.stats", "data": {"text": 43}},  # fails, and is not meant to
            ]
        )
    )
    up = _up(
        "app:app",
        "--samples",
        str(samples),
        "--forge-port",
        str(free_port()),
        "--runner-port",
        str(free_port()),
        "--state",
        str(tmp_path / "state"),
    )
    assert up.returncode == 1, (up.stdout + up.stderr)[-3000:]
    lines = [line for line in up.stdout.splitlines() if line.startswith("  ok") or "FAIL" in line]
    assert [line.split()[0] for line in lines] == ["ok", "ok", "FAIL"], up.stdout
    assert "1 sample job(s) did not end as expected" in up.stderr
    # The stack's secret is kept for `runnerkit call`, readable by its owner only.
    secret = tmp_path / "state" / "signing-secret"
    assert (secret.stat().st_mode & 0o777) == 0o600
    assert f"--secret-file {secret}" in up.stdout


def test_submit_says_when_no_runner_lists_the_job_type(forge_server: str) -> None:
    result = CliRunner().invoke(
        main,
        [
            *("submit", "--type", "nothing.here", "--wait", "--wait-timeout", "1"),
            "--url",
            forge_server,
        ],
    )
    assert result.exit_code == 1
    assert "no registered runner lists job type 'nothing.here' (types runners list: none)" in (
        result.stderr
    )
    assert "is still queued after 1 s" in result.stderr
