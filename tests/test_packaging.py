"""The distributions carry what the package metadata promises (the license text)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: What a build needs from the checkout (no .venv, caches or earlier build output).
_SKIP = shutil.ignore_patterns(
    ".venv", ".git", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", "var", "bench"
)


@pytest.fixture(scope="module")
def distributions(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = tmp_path_factory.mktemp("source") / "runnerkit"
    shutil.copytree(ROOT, source, ignore=_SKIP)
    out = tmp_path_factory.mktemp("dist")
    result = subprocess.run(
        [sys.executable, "-m", "build", "--sdist", "--wheel", "--outdir", str(out), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return out


def test_the_wheel_carries_the_license_text(distributions: Path) -> None:
    (wheel,) = distributions.glob("runnerkit-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        licenses = [n for n in archive.namelist() if n.endswith("/LICENSE")]
        assert licenses, archive.namelist()
        text = archive.read(licenses[0]).decode()
        metadata = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        assert "License-File: LICENSE" in archive.read(metadata).decode()
    assert text == (ROOT / "LICENSE").read_text()
    assert "MIT License" in text


def test_the_sdist_carries_the_license_text(distributions: Path) -> None:
    (sdist,) = distributions.glob("runnerkit-*.tar.gz")
    with tarfile.open(sdist) as archive:
        names = archive.getnames()
        (member,) = [n for n in names if n.count("/") == 1 and n.endswith("/LICENSE")]
        handle = archive.extractfile(member)
        assert handle is not None
        assert handle.read().decode() == (ROOT / "LICENSE").read_text()
