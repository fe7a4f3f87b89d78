"""Fixtures for the one-instance tests: JobForge stubs and runner instances, always cleaned up.

Every instance is stopped (SIGTERM, then SIGKILL of the whole tree) when its scope ends, and its
sentinel, which lives in its own session, is waited for and killed if it lingers. A failing
test's report gets the end of the gunicorn log of every instance it used.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.instance.instance_support import (
    INTERVAL_S,
    Instance,
    InstanceFactory,
    StubFactory,
    attach,
    launch_instance,
    stop_instance,
    stop_instances,
)
from tests.support import JobForgeStub, free_port
from tests.support.waiting import wait_until


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Attach the gunicorn logs of the test's instances to its report when it fails."""
    report = yield
    if report.failed:
        instances = [v for v in getattr(item, "funcargs", {}).values() if isinstance(v, Instance)]
        instances += getattr(item, "runner_instances", [])
        unique = {id(i): i for i in instances}
        for instance in unique.values():
            log = instance.proc.log_text()[-6000:]
            report.sections.append((f"gunicorn log :{instance.proc.port}", log))
    return report


@pytest.fixture
def make_stub() -> Iterator[StubFactory]:
    """``make_stub(start=True, **options) -> JobForgeStub`` on a free port; stopped at teardown.

    With ``start=False`` the stub has its port but does not listen yet (JobForge is down).
    """
    stubs: list[JobForgeStub] = []

    def make(start: bool = True, **options: Any) -> JobForgeStub:
        stub = JobForgeStub(free_port(), **options)
        stubs.append(stub)
        return stub.start() if start else stub

    yield make
    for stub in stubs:
        stub.stop()


@pytest.fixture
def make_instance(
    request: pytest.FixtureRequest, tmp_path: Path, make_stub: StubFactory
) -> Iterator[InstanceFactory]:
    """``make_instance(stub=None, **launch_options) -> Instance``, stopped at teardown.

    Without ``stub`` a new running JobForge stub is made for the instance. Instances are
    stopped before their stubs, so a sentinel can still deregister.
    """
    instances: list[Instance] = []

    def make(stub: JobForgeStub | None = None, **options: Any) -> Instance:
        instance = launch_instance(
            tmp_path / f"instance{len(instances)}", stub or make_stub(), **options
        )
        instances.append(instance)
        attach(request, instance)
        return instance

    yield make
    stop_instances(instances)


@pytest.fixture(scope="module")
def module_instance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Instance]:
    """One registered 3-worker instance (deploy/gunicorn.conf.py) shared by a module's tests."""
    stub = JobForgeStub(free_port()).start()
    try:
        instance = launch_instance(tmp_path_factory.mktemp("shared"), stub, workers=3)
        try:
            instance.wait_registered()
            yield instance
        finally:
            stop_instance(instance)
    finally:
        stub.stop()


@pytest.fixture
def shared_instance(request: pytest.FixtureRequest, module_instance: Instance) -> Instance:
    """The module's instance, checked to be back at rest (see :func:`at_rest`)."""
    return at_rest(request, module_instance)


@pytest.fixture(params=["default", "--preload"])
def shared_instance_or_preloaded(request: pytest.FixtureRequest) -> Instance:
    """The module's instance; then, for a second run of the test, an instance of its own
    whose master imports the app before it forks (``--preload``), stopped after the test."""
    if request.param == "default":
        return at_rest(request, request.getfixturevalue("module_instance"))
    instance = request.getfixturevalue("make_instance")(workers=3, extra_args=["--preload"])
    instance.wait_registered()
    return at_rest(request, instance)


def at_rest(request: pytest.FixtureRequest, instance: Instance) -> Instance:
    """``instance`` checked to be back at rest: JobForge up, every worker serving, no slot
    held by an earlier test's job, and heartbeats being accepted."""
    attach(request, instance)
    assert instance.stub.running, "an earlier test left the JobForge stub stopped"
    instance.proc.wait_workers_serving(timeout=20.0)
    wait_until(
        lambda: not any(instance.held_slots().values()),
        20.0,
        lambda: instance.explain(f"slots still held: {instance.held_slots()}"),
    )
    instance.wait_heartbeat(
        since=time.monotonic(), timeout=2 * INTERVAL_S + 1.0, where=lambda h: h.status == 200
    )
    return instance
