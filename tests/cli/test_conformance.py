"""`runnerkit conformance` against live runners: real gunicorn on 127.0.0.1, real HTTP.

The example runner passes every required check, alone, signed, and as the forge knows it; a
plain-Flask runner that breaks the contracts on purpose fails with exactly the findings one
expects of it, and a runner that hangs is a failed check, not a stuck tool.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from click.testing import CliRunner

from runnerkit.cli import main
from tests.support import GunicornProcess
from tests.support.nonconforming_runner import MANIFEST
from tests.support.waiting import wait_until

#: A runner that talks to no control plane.
STANDALONE: dict[str, str | None] = {
    "RUNNERKIT_JOBFORGE_URL": None,
    "JOBFORGE_URL": None,
    "RUNNERKIT_TRUTHCORE_URL": None,
    "TRUTHCORE_URL": None,
    "RUNNERKIT_RUNNER_TOKEN": None,
    "RUNNER_TOKEN": None,
    "RUNNERKIT_SIGNING_SECRET": None,
    "GUNICORN_GRACEFUL_TIMEOUT": "5",
}
SECRET = "conformance-test-secret"


def conformance(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["conformance", *args], env=env)
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout


def outcomes(junit: Path) -> dict[str, str]:
    """Each test case of a JUnit report: ``fail``, ``advisory`` or ``pass``."""
    suite = ET.parse(junit).getroot()
    result = {}
    for case in suite.iter("testcase"):
        if case.find("failure") is not None:
            result[case.get("name", "")] = "fail"
        elif case.find("system-out") is not None:
            result[case.get("name", "")] = "advisory"
        else:
            result[case.get("name", "")] = "pass"
    return result


def findings(report: dict[str, Any], prefix: str) -> list[str]:
    """The findings (``path: reason``) of the check whose name starts with ``prefix``."""
    [check] = [c for c in report["checks"] if c["name"].startswith(prefix)]
    return [f"{f['path']}: {f['reason']}" for f in check["findings"]]


def _serve(
    tmp: Path, app: str, *, config: str | None, env: dict[str, str | None]
) -> GunicornProcess:
    proc = GunicornProcess(
        app, log_dir=tmp, workers=1 if config is None else 2, config=config, env=env
    )
    proc.start()
    try:
        proc.wait_ready("/health" if config is None else "/health/live")
    except BaseException:
        proc.stop(timeout=5)
        raise
    return proc


@pytest.fixture(scope="module")
def example_runner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GunicornProcess]:
    tmp = tmp_path_factory.mktemp("example")
    env = {**STANDALONE, "RUNNERKIT_STATE_DIR": str(tmp / "state")}
    proc = _serve(tmp, "app:app", config="deploy/gunicorn.conf.py", env=env)
    yield proc
    proc.stop(timeout=10)


@pytest.fixture(scope="module")
def nonconforming(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GunicornProcess]:
    tmp = tmp_path_factory.mktemp("nonconforming")
    proc = _serve(tmp, "tests.support.nonconforming_runner:app", config=None, env={})
    yield proc
    proc.stop(timeout=10)


def test_the_example_runner_passes_every_check(
    example_runner: GunicornProcess, tmp_path: Path
) -> None:
    junit = tmp_path / "reports" / "conformance.xml"
    code, out = conformance(example_runner.url, "--junit", str(junit))
    assert code == 0, out
    assert "conforms" in out.splitlines()[-1]
    cases = outcomes(junit)
    assert set(cases.values()) == {"pass"}, cases
    for capability in ("text-stats", "checksum", "slow-count"):
        assert (
            cases[
                f"POST /execute {capability}: a valid request is answered with a "
                "RunnerExecutionResponse"
            ]
            == "pass"
        )
    assert cases["a redelivered jobId is answered with the first answer or 409"] == "pass"
    assert cases['timeoutMs as a string ("5000"): refused with VALIDATION_ERROR'] == "pass"
    assert cases["an unknown capabilityId: refused with RESOURCE_NOT_FOUND"] == "pass"


def test_given_samples_are_sent_as_they_are(
    example_runner: GunicornProcess, tmp_path: Path
) -> None:
    samples = tmp_path / "samples.json"
    samples.write_text(
        json.dumps(
            {
                "checksum": [
                    {"data": "YWJj", "encoding": "base64"},
                    {"data": "%%%", "encoding": "base64"},
                ]
            }
        )
    )
    code, out = conformance(example_runner.url, "--samples", str(samples), "--json")
    report = json.loads(out)
    assert code == 1
    assert findings(report, "POST /execute checksum: ") == []
    [refused] = findings(report, "POST /execute checksum (sample 2)")
    assert "VALIDATION_ERROR INVALID_BASE64" in refused


def test_a_signing_runner_passes_signed_and_fails_unsigned(tmp_path: Path) -> None:
    env = {
        **STANDALONE,
        "RUNNERKIT_STATE_DIR": str(tmp_path / "state"),
        "RUNNERKIT_SIGNING_SECRET": SECRET,
    }
    proc = _serve(tmp_path, "app:app", config="deploy/gunicorn.conf.py", env=env)
    try:
        code, out = conformance(proc.url, "--signing-secret", SECRET, "--json")
        report = json.loads(out)
        assert code == 0, out
        signed = [c for c in report["checks"] if "AUTHENTICATION_ERROR" in c["name"]]
        assert len(signed) == 4
        assert all(c["outcome"] == "pass" for c in signed)

        code, out = conformance(proc.url, "--json", env={"RUNNERKIT_SIGNING_SECRET": ""})
        report = json.loads(out)
        assert code == 1
        [hint] = findings(report, "signed requests")
        assert "--signing-secret" in hint
    finally:
        proc.stop(timeout=10)


def test_the_nonconforming_runner_fails_with_the_expected_findings(
    nonconforming: GunicornProcess, tmp_path: Path
) -> None:
    manifest = tmp_path / "runner.json"
    manifest.write_text(json.dumps(MANIFEST))
    junit = tmp_path / "conformance.xml"
    code, out = conformance(
        nonconforming.url, "--manifest", str(manifest), "--json", "--junit", str(junit)
    )
    report = json.loads(out)
    assert code == 1
    assert report["passed"] is False

    assert findings(report, "the advertised document") == []
    health = findings(report, "GET /health")
    assert any(f.startswith("status: ") for f in health), health
    assert any(f.startswith("service: ") for f in health), health

    execute = findings(report, "POST /execute add")
    assert [f for f in execute if f.startswith("runnerId: ")], execute
    assert all(not f.startswith("data: ") for f in execute), execute

    [html] = findings(report, "invalid JSON")
    assert "HTTP 500 text/html" in html and "not JSON" in html
    [coerced] = findings(report, 'timeoutMs as a string ("5000")')
    assert coerced.startswith("(status): answered HTTP 200")
    assert any(
        f.startswith("(status): answered HTTP 200")
        for f in findings(report, 'add: payload.a as a string ("0")')
    )
    assert "error.category: 'VALIDATION_ERROR'; expected RESOURCE_NOT_FOUND" in findings(
        report, "an unknown capabilityId"
    )
    # What it gets right passes: the suite tells the two apart.
    assert findings(report, "missing jobId") == []

    [redelivery] = [c for c in report["checks"] if c["name"].startswith("a redelivered jobId")]
    assert redelivery["required"] is False and redelivery["outcome"] == "advisory"
    assert "may have run twice" in redelivery["findings"][0]["reason"]

    cases = outcomes(junit)
    assert cases["a redelivered jobId is answered with the first answer or 409"] == "advisory"
    assert cases["invalid JSON: refused with VALIDATION_ERROR"] == "fail"
    assert cases["missing jobId: refused with VALIDATION_ERROR"] == "pass"


def test_the_text_report_has_one_line_per_check_and_a_summary(
    nonconforming: GunicornProcess, tmp_path: Path
) -> None:
    manifest = tmp_path / "runner.json"
    manifest.write_text(json.dumps(MANIFEST))
    code, out = conformance(nonconforming.url, "--manifest", str(manifest))
    assert code == 1
    lines = out.splitlines()
    assert "FAIL      invalid JSON: refused with VALIDATION_ERROR" in lines
    assert "pass      missing jobId: refused with VALIDATION_ERROR" in lines
    assert "advisory  a redelivered jobId is answered with the first answer or 409" in lines
    assert "          - runnerId: Not a valid UUID. (got 'unknown')" in lines
    assert lines[-1].startswith(f"{nonconforming.url}: DOES NOT CONFORM (")


def test_a_runner_that_hangs_is_a_failed_check(tmp_path: Path) -> None:
    proc = GunicornProcess(
        "tests.support.nonconforming_runner:app",
        log_dir=tmp_path,
        workers=1,
        env={"NONCONFORMING_HEALTH_DELAY_S": "3"},
        extra_args=["--threads", "4"],
    )
    proc.start()
    try:
        wait_until(lambda: _answers(proc.url + "/nothing"), timeout=20)
        manifest = tmp_path / "runner.json"
        manifest.write_text(json.dumps(MANIFEST))
        code, out = conformance(proc.url, "--manifest", str(manifest), "--timeout", "0.5", "--json")
        assert code == 1
        assert findings(json.loads(out), "GET /health") == [
            ": no answer to GET /health within 0.5 s"
        ]
    finally:
        proc.stop(timeout=10)


def _answers(url: str) -> bool:
    try:
        requests.get(url, timeout=2)
    except requests.RequestException:
        return False
    return True


def test_capabilities_come_from_the_forge_the_runner_registered_with(tmp_path: Path) -> None:
    forge = GunicornProcess(
        "runnerkit.forge:app",
        log_dir=tmp_path,
        workers=1,
        env={
            "RUNNERKIT_FORGE_DB_PATH": str(tmp_path / "forge.sqlite3"),
            "RUNNERKIT_FORGE_TOKEN": None,
        },
        extra_args=["--worker-class", "gthread", "--threads", "4"],
        name="forge",
    )
    forge.start()
    runner: GunicornProcess | None = None
    try:
        forge.wait_ready("/health")
        env = {
            **STANDALONE,
            "RUNNERKIT_STATE_DIR": str(tmp_path / "state"),
            "RUNNERKIT_JOBFORGE_URL": forge.url,
            "RUNNERKIT_HEARTBEAT_INTERVAL_MS": "500",
        }
        runner = _serve(tmp_path, "app:app", config="deploy/gunicorn.conf.py", env=env)
        wait_until(lambda: _registered(forge.url), timeout=20)
        code, out = conformance(runner.url, "--forge", forge.url, "--json")
        report = json.loads(out)
        assert code == 0, out
        assert report["checks"][0]["name"].startswith("the advertised document (runner ")
        assert len([c for c in report["checks"] if c["name"].startswith("POST /execute")]) == 3

        code, out = conformance("http://127.0.0.1:9", "--forge", forge.url)
        assert code == 2
    finally:
        if runner is not None:
            runner.stop(timeout=10)
        forge.stop(timeout=10)


def _registered(forge_url: str) -> bool:
    items = requests.get(forge_url + "/runners", timeout=5).json()["items"]
    return bool(items)


def test_the_suite_that_cannot_run_exits_2(tmp_path: Path) -> None:
    assert conformance("localhost:3000")[0] == 2
    manifest = tmp_path / "runner.json"
    manifest.write_text(json.dumps(MANIFEST))
    assert conformance("http://127.0.0.1:9", "--manifest", str(manifest), "--forge", "x")[0] == 2
    # Nothing listens on port 9 (discard): no GET /capabilities, and no other source given.
    result = CliRunner().invoke(main, ["conformance", "http://127.0.0.1:9"])
    assert result.exit_code == 2
    assert "--manifest FILE or --forge URL" in result.stderr
