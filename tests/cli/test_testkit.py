"""The test kit runner authors use: ContractValidator, documents, RunnerClient, pytest plugin."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from runnerkit.contracts import ErrorEnvelopeSchema
from runnerkit.testing import ContractValidator, RunnerClient, documents

ROOT = Path(__file__).resolve().parents[2]


def test_every_fixture_document_is_valid_for_its_contract() -> None:
    validator = ContractValidator()
    for name, document in (
        ("RunnerExecutionRequest", documents.execution_request()),
        ("RunnerRegistrationRequest", documents.registration()),
        ("JobRequest", documents.job_request()),
        ("TruthAssertion", documents.truth_assertion()),
        ("TruthQuery", documents.truth_query()),
    ):
        result = validator.validate(name, document)
        assert result.valid, (name, result.errors)
        assert result.warnings == []


def test_documents_are_fresh_copies() -> None:
    first, second = documents.job_request(), documents.job_request()
    assert first["id"] != second["id"]
    first["payload"]["data"]["foo"] = "changed"
    assert second["payload"]["data"]["foo"] == "bar"


def test_an_invalid_document_reports_each_problem_with_path_code_and_value() -> None:
    result = ContractValidator().validate(
        "JobRequest", {**documents.job_request(), "id": "test-job-1", "priority": 101}
    )
    assert not result.valid
    by_path = {tuple(p.path): p for p in result.errors}
    assert by_path[("id",)].value == "test-job-1"
    assert by_path[("priority",)].value == 101
    assert all(p.code for p in result.errors)


def test_unknown_keys_are_a_warning_not_an_error() -> None:
    request = {**documents.execution_request(), "extra": 1}
    request["metadata"]["typo"] = True
    result = ContractValidator().validate("RunnerExecutionRequest", request)
    assert result.valid
    assert sorted(tuple(w.path) for w in result.warnings) == [("extra",), ("metadata", "typo")]
    assert "extra" not in result.data


def test_validation_is_deterministic_and_never_mixes_two_schemas_answers() -> None:
    validator = ContractValidator()
    envelope_like = documents.execution_request()
    for _ in range(3):
        assert validator.validate("RunnerExecutionRequest", envelope_like).valid
        assert not validator.validate("ErrorEnvelope", envelope_like).valid
        assert not validator.validate(ErrorEnvelopeSchema, envelope_like).valid


def test_run_suite_returns_only_the_cases_that_disagree() -> None:
    validator = ContractValidator()
    failures = validator.run_suite(
        [
            ("JobRequest", documents.job_request(), True),
            ("JobRequest", {"id": "test-job-1"}, False),
            ("RunnerHeartbeat", {"runnerId": "runner-1"}, True),  # wrong expectation
        ]
    )
    assert [index for index, _, _ in failures] == [2]


def test_an_unknown_contract_name_is_a_clear_error() -> None:
    with pytest.raises(KeyError, match="unknown contract 'Nope'"):
        ContractValidator().validate("Nope", {})


def test_runner_client_signs_when_the_app_has_a_secret(tmp_path: Path) -> None:
    from tests.cli.apps.good import runner

    app = runner.create_app(
        {"RUNNERKIT_STATE_DIR": str(tmp_path), "RUNNERKIT_SIGNING_SECRET": "kit-secret"}
    )
    client = RunnerClient(app)
    ok = client.execute("upper", {"text": "hi"})
    assert ok.status_code == 200 and ok.get_json()["data"] == {"text": "HI"}
    refused = client.execute("upper", {"text": "hi"}, signed=False)
    assert refused.status_code == 401


def test_the_pytest_plugin_gives_authors_their_fixtures(tmp_path: Path) -> None:
    """Installed runnerkit registers the plugin (entry point ``pytest11``): no conftest needed."""
    test_file = tmp_path / "test_author.py"
    test_file.write_text(
        textwrap.dedent(
            """
            import requests
            import pytest
            from tests.cli.apps.good import runner

            @pytest.fixture
            def runner_app(tmp_path):
                return runner.create_app({"RUNNERKIT_STATE_DIR": str(tmp_path)})

            def test_client(runner_client, contract_validator):
                answer = runner_client.execute("upper", {"text": "a"}).get_json()
                assert contract_validator.validate("RunnerExecutionResponse", answer).valid

            def test_stub_records(jobforge_stub):
                requests.post(
                    jobforge_stub.url + "/runners/register", json={"name": "doc"}, timeout=5
                )
                assert len(jobforge_stub.registrations()) == 1
                assert jobforge_stub.registrations()[0]["name"] == "doc"
                assert jobforge_stub.registrations()[0].get("tags") is None

            def test_forge(forge_server):
                health = requests.get(forge_server + "/health", timeout=5)
                assert health.status_code == 200
                assert health.json()["service"] == "jobforge"
            """
        )
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            str(test_file),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**__import__("os").environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "3 passed" in result.stdout
