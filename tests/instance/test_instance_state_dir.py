"""The default state directory (``$TMPDIR/runnerkit/<name>-<port>``) is this user's alone.

A runner under gunicorn creates it, its parent and the masters directory 0700 and its files
0600, so another local user (``nobody``) cannot read a stored job result; a directory another
user planted, or one others may write to, is refused at startup with a message naming it.
The suite runs as root here: the tests that need a second user skip with a reason otherwise.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from runnerkit import Runner
from runnerkit.service.settings import ConfigError
from tests.helpers import Echo
from tests.instance.instance_support import CLEAN_ENV, GUNICORN_CONF, call, job_request
from tests.support import GunicornProcess, JobForgeStub, free_port
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

NOBODY = 65534
needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="creating a directory owned by another user needs root"
)
#: The result a job stores in the ledger, looked for in what ``nobody`` can read.
SECRET_TEXT = "private-result-text-of-a-job"


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A temp dir others may enter (as /tmp is), unlike pytest's own 0700 tmp_path: what
    stops ``nobody`` must be the runner's modes, not the test's directory."""
    path = Path(tempfile.mkdtemp(prefix="runnerkit-perm-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def gunicorn(base: Path, port: int, **env: str | None) -> GunicornProcess:
    """``gunicorn app:app`` (2 workers, the product's config) with ``TMPDIR=base``."""
    merged: dict[str, str | None] = dict(CLEAN_ENV)
    merged.update(
        {
            "TMPDIR": str(base),
            "RUNNERKIT_STATE_DIR": None,
            "RUNNERKIT_JOBFORGE_URL": "",
            "GUNICORN_THREADS": "4",
        }
    )
    merged.update(env)
    return GunicornProcess(
        "app:app", log_dir=base / "logs", workers=2, port=port, config=GUNICORN_CONF, env=merged
    )


def as_nobody(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv,
        user=NOBODY,
        group=NOBODY,
        extra_groups=[],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )


@needs_root
def test_nobody_cannot_read_what_a_gunicorn_runner_stored(shared_tmp: Path) -> None:
    port = free_port()
    stub = JobForgeStub(free_port()).start()
    proc = gunicorn(shared_tmp, port, RUNNERKIT_JOBFORGE_URL=stub.url)
    try:
        proc.start()
        proc.wait_workers_serving(timeout=30)
        wait_until(lambda: stub.calls("POST", "/runners/register"), 15, proc.log_tail)
        reply = call(proc, "POST", "/execute", job_request("text-stats", {"text": SECRET_TEXT}))
        assert reply.status == 200, reply
        root = shared_tmp / "runnerkit"
        state = root / f"example-runner-{port}"
        ledger = state / "ledger.sqlite3"
        wait_until(lambda: (root / "masters").is_dir() and ledger.exists(), 10, proc.log_tail)

        wrong = []
        for path in [root, *root.rglob("*")]:
            if "metrics" in path.relative_to(root).parts[1:2]:
                continue  # prometheus-client's own files, inside the 0700 state directory
            mode = stat.S_IMODE(path.lstat().st_mode)
            want = 0o700 if path.is_dir() else 0o600
            if mode != want:
                wrong.append(f"{path} {mode:04o} (want {want:04o})")
        assert not wrong, "\n".join(wrong)
        for name in ("ledger.sqlite3", "ledger.sqlite3-wal", "identity.json", "instance.json"):
            assert (state / name).exists(), sorted(p.name for p in state.iterdir())

        # What the job stored is in the ledger (and its WAL) once the worker's journal is
        # folded, a few ms after the answer; nobody gets at any of them.
        def stored() -> bool:
            return b"private" in ledger.read_bytes() + (state / "ledger.sqlite3-wal").read_bytes()

        wait_until(stored, 10, "the answer folded into the ledger")
        for target in (ledger, state / "ledger.sqlite3-wal"):
            seen = as_nobody("cat", str(target))
            assert seen.returncode != 0 and "Permission denied" in seen.stderr, seen
            assert SECRET_TEXT not in seen.stdout
        listing = as_nobody("ls", str(root))
        assert listing.returncode != 0 and "Permission denied" in listing.stderr, listing
    finally:
        proc.stop()
        stub.stop()


@needs_root
def test_a_state_dir_planted_by_another_user_is_refused_at_startup(shared_tmp: Path) -> None:
    port = free_port()
    root = shared_tmp / "runnerkit"
    root.mkdir(mode=0o700)
    planted = root / f"example-runner-{port}"
    planted.mkdir()
    planted.chmod(0o777)
    os.chown(planted, NOBODY, NOBODY)
    proc = gunicorn(shared_tmp, port)
    try:
        proc.start()
        assert proc.wait_exit(30) is not None, "gunicorn served from a planted state directory"
        log = proc.log_text()
        assert "ConfigError" in log and str(planted) in log, proc.log_tail()
        assert "owned by uid 65534 (nobody)" in log and "mode 0777" in log, proc.log_tail()
        assert list(planted.iterdir()) == [], "the runner wrote into the planted directory"
    finally:
        proc.stop()


@needs_root
def test_a_runnerkit_temp_dir_of_another_user_is_refused(
    shared_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default state dir's parent decides who may swap the state dir itself."""
    root = shared_tmp / "runnerkit"
    root.mkdir(mode=0o755)
    os.chown(root, NOBODY, NOBODY)
    monkeypatch.setenv("TMPDIR", str(shared_tmp))
    monkeypatch.setattr(tempfile, "tempdir", None)  # gettempdir() reads TMPDIR again
    runner = Runner("perm-runner", capabilities=[Echo])
    with pytest.raises(ConfigError, match=r"owned by uid 65534 \(nobody\)"):
        runner.create_app({"RUNNERKIT_JOBFORGE_URL": ""})
    assert list(root.iterdir()) == []


@pytest.mark.parametrize("mode", [0o777, 0o775, 0o757])
def test_a_state_dir_others_may_write_to_is_refused(tmp_path: Path, mode: int) -> None:
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(mode)
    runner = Runner("perm-runner", capabilities=[Echo])
    with pytest.raises(ConfigError, match=rf"{state}.*writable by .*mode {mode:04o}.*chmod 700"):
        runner.create_app({"RUNNERKIT_JOBFORGE_URL": "", "RUNNERKIT_STATE_DIR": str(state)})
    assert list(state.iterdir()) == []


def test_an_own_state_dir_others_may_read_is_narrowed_to_0700(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(0o755)
    (state / "ledger.sqlite3").touch(mode=0o644)
    runner = Runner("perm-runner", capabilities=[Echo])
    client = runner.create_app(
        {"RUNNERKIT_JOBFORGE_URL": "", "RUNNERKIT_STATE_DIR": str(state)}
    ).test_client()
    assert client.post("/execute", json=job_request("echo", {"message": "x"})).status_code == 200
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert stat.S_IMODE((state / "ledger.sqlite3").stat().st_mode) == 0o600
    assert stat.S_IMODE((state / "ledger.sqlite3-wal").stat().st_mode) == 0o600
