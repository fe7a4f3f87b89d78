"""A few bytes of a file shared by mapping: what one process stores, another reads."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest

from runnerkit.service.shared_bytes import map_shared


def _store(path: str) -> None:
    mapped = map_shared(path, 8, writable=True)
    assert mapped is not None
    mapped[:8] = b"12345678"


def test_a_store_in_one_process_is_read_in_another(tmp_path: Path) -> None:
    path = str(tmp_path / "shared")
    reader = map_shared(path, 8)
    assert reader is not None
    assert reader[:8] == bytes(8), "a new file is made of zeros"
    assert Path(path).stat().st_size == 8
    child = multiprocessing.get_context("fork").Process(target=_store, args=(path,))
    child.start()
    child.join(20)
    assert child.exitcode == 0
    assert reader[:8] == b"12345678"
    with pytest.raises(TypeError):
        reader[:1] = b"x"  # a read-only mapping


def test_a_short_file_is_given_its_bytes_and_a_bad_path_none(tmp_path: Path) -> None:
    path = tmp_path / "short"
    path.write_bytes(b"ab")
    mapped = map_shared(str(path), 8, writable=True)
    assert mapped is not None and path.stat().st_size == 8
    (tmp_path / "dir").mkdir()
    assert map_shared(str(tmp_path / "dir"), 8) is None
    assert map_shared(str(tmp_path / "missing" / "file"), 8) is None
