"""Fixtures for tests that run real processes: gunicorn serving a runner, and a JobForge stub.

Every gunicorn a test uses is stopped (SIGTERM, then SIGKILL of the whole tree) when the test
or module ends, pass or fail, and a failing test's report gets a "gunicorn log" section with the
end of each of its servers' logs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from tests.support import GunicornProcess, JobForgeStub, free_port

#: The product's gunicorn settings (gthread workers, reserved health threads).
GUNICORN_CONF = "deploy/gunicorn.conf.py"

#: Environment of a runner that talks to no control plane.
STANDALONE_ENV: dict[str, str | None] = {
    "RUNNERKIT_JOBFORGE_URL": None,
    "JOBFORGE_URL": None,
    "RUNNERKIT_TRUTHCORE_URL": None,
    "TRUTHCORE_URL": None,
    "RUNNERKIT_RUNNER_TOKEN": None,
    "RUNNER_TOKEN": None,
}

GunicornFactory = Callable[..., GunicornProcess]


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Attach the gunicorn logs of the test's servers to its report when it fails."""
    report = yield
    if report.failed:
        procs = [
            v for v in getattr(item, "funcargs", {}).values() if isinstance(v, GunicornProcess)
        ]
        procs += getattr(item, "gunicorn_processes", [])
        for proc in dict.fromkeys(procs):
            report.sections.append((f"gunicorn log :{proc.port}", proc.log_text()[-5000:]))
    return report


def _launch(
    log_dir: Path,
    *,
    app_spec: str = "app:app",
    workers: int = 2,
    config: str | None = GUNICORN_CONF,
    env: Mapping[str, str | None] | None = None,
    extra_args: Iterable[str] = (),
    standalone: bool = True,
    wait: bool = True,
    ready_path: str = "/health/live",
    ready_timeout: float = 20.0,
    all_workers: bool = False,
    port: int | None = None,
    control_socket: bool = False,
) -> GunicornProcess:
    merged: dict[str, str | None] = dict(STANDALONE_ENV) if standalone else {}
    merged.setdefault("RUNNERKIT_STATE_DIR", str(log_dir / "state"))
    merged["GUNICORN_GRACEFUL_TIMEOUT"] = "5"
    merged.update(env or {})
    proc = GunicornProcess(
        app_spec,
        log_dir=log_dir,
        workers=workers,
        port=port,
        config=config,
        env=merged,
        extra_args=extra_args,
        control_socket=control_socket,
    )
    proc.start()
    try:
        if wait:
            proc.wait_ready(ready_path, timeout=ready_timeout)
            if all_workers:
                proc.wait_workers_serving(timeout=ready_timeout)
    except BaseException:
        proc.stop(timeout=5)
        raise
    return proc


@pytest.fixture
def start_gunicorn(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[GunicornFactory]:
    """``start_gunicorn(**options) -> GunicornProcess``: a started (and by default ready) server.

    Options: ``app_spec="app:app"``, ``workers=2``, ``config="deploy/gunicorn.conf.py"``
    (``None`` for none), ``env`` (overrides; ``None`` removes a variable), ``extra_args``,
    ``standalone=True`` (JobForge/TruthCore variables removed), ``wait=True``,
    ``ready_path="/health/live"``, ``ready_timeout=20``, ``all_workers=False`` (also wait until
    every worker has answered), ``port`` (default: a free one), ``control_socket=False``
    (True: the harness does not add ``--no-control-socket``). ``RUNNERKIT_STATE_DIR``
    defaults to a folder under ``tmp_path``; the graceful timeout is 5 s. Stopped at teardown.
    """
    started: list[GunicornProcess] = []
    request.node.gunicorn_processes = started

    def start(**options: Any) -> GunicornProcess:
        proc = _launch(tmp_path / f"gunicorn{len(started)}", **options)
        started.append(proc)
        return proc

    yield start
    for proc in reversed(started):
        proc.stop(timeout=10)


@pytest.fixture(scope="module")
def example_runner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GunicornProcess]:
    """The example app (``app:app``) under the product's gunicorn config: 2 workers, standalone.

    Shared by a module's tests; do not leave long jobs running in it.
    """
    proc = _launch(tmp_path_factory.mktemp("example-runner"), all_workers=True)
    try:
        yield proc
    finally:
        proc.stop(timeout=10)


@pytest.fixture
def jobforge_stub() -> Iterator[JobForgeStub]:
    """A running :class:`JobForgeStub` on a free loopback port, stopped at teardown."""
    stub = JobForgeStub(free_port()).start()
    try:
        yield stub
    finally:
        stub.stop()
