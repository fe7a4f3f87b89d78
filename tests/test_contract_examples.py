"""The shared contract examples: each schema accepts or rejects each sample as labelled."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from marshmallow import ValidationError

from runnerkit.contracts import SCHEMAS

REPO_ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).parent / "fixtures/contracts"
SHARED_EXAMPLES = REPO_ROOT.parent / "shared/contracts/examples"
FIXTURE_FILES = sorted(FIXTURES.glob("*.json"))


def _example(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


def test_fixtures_present() -> None:
    assert len(FIXTURE_FILES) >= 19
    assert {_example(p)["accept"] for p in FIXTURE_FILES} == {True, False}


@pytest.mark.parametrize("path", FIXTURE_FILES, ids=lambda p: p.stem)
def test_example(path: Path) -> None:
    example = _example(path)
    assert example["schema"] in SCHEMAS, f"unknown schema name {example['schema']!r}"
    schema = SCHEMAS[example["schema"]]()
    if example["accept"]:
        loaded = schema.load(example["value"])
        # what we load, we can emit again, and a peer would accept it back unchanged
        assert schema.load(json.loads(json.dumps(schema.dump(loaded)))) == loaded
    else:
        with pytest.raises(ValidationError):
            schema.load(example["value"])


@pytest.mark.parametrize("path", FIXTURE_FILES, ids=lambda p: p.stem)
def test_file_name_matches_label(path: Path) -> None:
    example = _example(path)
    assert path.name.startswith("accept-" if example["accept"] else "reject-"), example["why"]


def test_fixtures_match_shared_examples() -> None:
    if not SHARED_EXAMPLES.is_dir():
        pytest.skip(f"{SHARED_EXAMPLES} is absent (only the workspace has it, not a clone)")
    shared = {p.name: p.read_bytes() for p in SHARED_EXAMPLES.glob("*.json")}
    ours = {p.name: p.read_bytes() for p in FIXTURE_FILES}
    assert sorted(ours) == sorted(shared)
    for name, content in shared.items():
        assert ours[name] == content, f"{name} differs from {SHARED_EXAMPLES / name}"
