"""Documentation that must not drift from the code."""

from __future__ import annotations

import re
from pathlib import Path

from runnerkit.runner.config import SETTINGS
from runnerkit.service.settings import settings_table

ROOT = Path(__file__).resolve().parents[1]


def section(text: str, name: str) -> str:
    match = re.search(rf"<!-- {name}:start -->\n(.*?)\n<!-- {name}:end -->", text, re.DOTALL)
    assert match, f"docs/configuration.md has no {name} section"
    return match.group(1)


def test_configuration_doc_lists_every_runner_setting_with_its_default() -> None:
    doc = (ROOT / "docs" / "configuration.md").read_text()
    assert section(doc, "runner-settings") == settings_table(SETTINGS, "RUNNERKIT_"), (
        "docs/configuration.md is out of date: run `make docs`"
    )


def test_configuration_doc_lists_every_forge_setting_with_its_default() -> None:
    from runnerkit.forge.settings import PREFIX
    from runnerkit.forge.settings import SETTINGS as FORGE_SETTINGS

    doc = (ROOT / "docs" / "configuration.md").read_text()
    assert section(doc, "forge-settings") == settings_table(FORGE_SETTINGS, PREFIX), (
        "docs/configuration.md is out of date: run `make docs`"
    )


def test_readme_starts_with_the_two_commands() -> None:
    head = (ROOT / "README.md").read_text().splitlines()[:12]
    assert any(line.startswith("make run") for line in head)
    assert any(line.startswith("make test") for line in head)


def test_readme_curl_example_is_a_valid_job_request() -> None:
    import json

    from runnerkit.testing import ContractValidator

    readme = (ROOT / "README.md").read_text()
    match = re.search(r"curl -s -X POST localhost:3002/jobs .*? -d '(\{.*?\})'", readme, re.DOTALL)
    assert match, "the README's corrected curl example is missing"
    result = ContractValidator().validate("JobRequest", json.loads(match.group(1)))
    assert result.valid, result.errors
