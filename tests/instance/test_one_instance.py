"""One gunicorn instance is ONE runner, however many workers it forks (DESIGN.md §2).

Real ``gunicorn app:app`` processes report to a real HTTP JobForge stub on loopback; what is
checked is what JobForge sees: registrations, heartbeats and their bodies, against the wire
contracts. The stub answers registrations with a 1000 ms heartbeat interval.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import time
from collections.abc import Iterator

import psutil
import pytest

from runnerkit.contracts import (
    HealthCheckSchema,
    RunnerExecutionResponseSchema,
    RunnerHeartbeatSchema,
    RunnerRegistrationRequestSchema,
)
from tests.instance.instance_support import (
    INTERVAL_S,
    Instance,
    InstanceFactory,
    StubFactory,
    attach,
    call,
    job_request,
    launch_instance,
    pin_connections,
    stop_instances,
)
from tests.support import JobForgeStub, Recorded, free_port
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

#: Slack for one scheduling hiccup of a 2-core machine, on top of what the design promises.
SLACK_S = 0.5


def assert_heartbeats_valid(instance: Instance, beats: list[Recorded], runner_id: str) -> None:
    """Every heartbeat is a contract RunnerHeartbeat from ``runner_id`` that JobForge accepted."""
    for beat in beats:
        RunnerHeartbeatSchema().load(beat.body)
        assert beat.body["runnerId"] == runner_id, instance.explain(f"heartbeat {beat.body}")
        assert beat.status == 200, instance.explain(f"heartbeat answered {beat.status}")


def gaps(beats: list[Recorded]) -> list[float]:
    return [round(b.time - a.time, 3) for a, b in itertools.pairwise(beats)]


# -- 1. one registration and one heartbeat stream per instance -----------------------------

#: The fleet: worker counts, and 3 workers forked from a master that imported the app.
FLEET: dict[str, tuple[int, tuple[str, ...]]] = {
    "1 worker": (1, ()),
    "3 workers": (3, ()),
    "5 workers": (5, ()),
    "3 workers --preload": (3, ("--preload",)),
}
#: How long heartbeats are counted once every worker serves.
WINDOW_S = 4.5


@pytest.fixture(scope="class")
def fleet(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, tuple[Instance, float]]]:
    """The instances of :data:`FLEET`, each with its own stub, started side by side.

    Maps the name to ``(instance, monotonic time when all its workers served)``.
    """
    stubs: list[JobForgeStub] = []
    instances: dict[str, Instance] = {}
    try:
        for name, (workers, extra_args) in FLEET.items():
            stub = JobForgeStub(free_port()).start()
            stubs.append(stub)
            log_dir = tmp_path_factory.mktemp("fleet")
            instances[name] = launch_instance(
                log_dir, stub, workers=workers, extra_args=extra_args, wait=False
            )
        serving: dict[str, tuple[Instance, float]] = {}
        for name, instance in instances.items():
            instance.proc.wait_workers_serving(timeout=30.0)
            serving[name] = (instance, time.monotonic())
        yield serving
    finally:
        stop_instances(instances.values())
        for stub in stubs:
            stub.stop()


class TestOneRunnerPerInstance:
    @pytest.mark.parametrize("name", list(FLEET))
    def test_one_registration_and_heartbeats_at_the_interval(
        self,
        fleet: dict[str, tuple[Instance, float]],
        name: str,
        request: pytest.FixtureRequest,
    ) -> None:
        instance, serving_since = fleet[name]
        workers = FLEET[name][0]
        attach(request, instance)
        assert len(instance.proc.worker_pids()) == workers, instance.explain()
        # Count over a fixed window after every worker (and its scheduler) is up; the window
        # of the first instance checked also lets the others' windows pass.
        window_end = serving_since + WINDOW_S
        time.sleep(max(0.0, window_end - time.monotonic()) + 0.3)

        registrations = instance.registrations()
        assert len(registrations) == 1, instance.explain(
            f"{workers} workers registered {len(registrations)} times"
        )
        registration = registrations[0]
        assert registration.status == 201
        document = RunnerRegistrationRequestSchema().load(registration.body)
        assert document["name"] == "example-runner"
        # Where gunicorn listens, read in a worker (the master preloads before binding).
        assert document["healthCheckEndpoint"] == f"{instance.url}/health", document
        limits = {c["id"]: c["maxConcurrency"] for c in document["capabilities"]}
        assert limits == {"text-stats": 8, "checksum": 8, "slow-count": 4}
        runner_id = registration.response["runnerId"]

        in_window = [h for h in instance.heartbeats() if serving_since <= h.time <= window_end]
        # One heartbeat per interval: ~4 in 4.5 s, not 4 x workers (at least 2 however
        # loaded the machine: the upper bound is the point).
        assert 2 <= len(in_window) <= 6, instance.explain(
            f"{len(in_window)} heartbeats in {WINDOW_S}s with {workers} workers, "
            f"gaps {gaps(instance.heartbeats())}"
        )
        # Nor bursts: workers heartbeating on their own would send near-simultaneous pairs
        # (a late heartbeat is followed by one on the interval's grid, hence not 1.0, and on
        # a loaded machine a heartbeat can be most of an interval late).
        everything = instance.heartbeats()
        assert min(gaps(everything)) >= 0.1 * INTERVAL_S, instance.explain(
            f"heartbeats too close together: {gaps(everything)}"
        )
        assert_heartbeats_valid(instance, everything, runner_id)
        # Workers starting together may each start a sentinel; the ones that find the
        # instance watched exit, and must not stay behind as zombies of their worker.
        zombies = [
            child.pid
            for pid in instance.proc.worker_pids()
            for child in psutil.Process(pid).children()
            if child.status() == psutil.STATUS_ZOMBIE
        ]
        assert not zombies, instance.explain(f"zombie children of workers: {zombies}")
        # The instance is the master's: a worker leads, the sentinel watches the master.
        master = instance.proc.master_pid
        assert instance.leader_pid() != master
        published = json.loads((instance.state_dir / "instance.json").read_text())
        assert published["ownerPid"] == master, published
        watching = [p.cmdline()[-1] for p in instance.sentinels()]
        assert watching == [str(master)], instance.explain(f"sentinels watch {watching}")


# -- 2. the leader dies, another worker carries on as the same runner -----------------------


def test_killing_the_leader_worker_hands_over_without_registering_again(
    shared_instance_or_preloaded: Instance,
) -> None:
    instance = shared_instance_or_preloaded
    runner_id = instance.runner_id()
    registered = len(instance.registrations())
    leader = instance.leader_pid()
    assert leader in instance.proc.worker_pids()

    beat = instance.wait_heartbeat(since=time.monotonic(), where=lambda h: h.status == 200)
    time.sleep(0.5 * INTERVAL_S)
    killed_at = time.monotonic()
    os.kill(leader, signal.SIGKILL)
    wait_until(lambda: not psutil.pid_exists(leader), 5.0, f"worker {leader} still alive")

    first_after = instance.wait_heartbeat(since=killed_at, timeout=2 * INTERVAL_S + 2.0)
    last_before = [h for h in instance.heartbeats() if h.time < killed_at][-1]
    assert last_before.time >= beat.time
    gap = first_after.time - last_before.time
    assert gap <= 2 * INTERVAL_S + SLACK_S, instance.explain(
        f"heartbeats stopped for {gap:.2f}s after the leader {leader} was killed"
    )

    # Two more intervals: the same runner keeps heartbeating, nobody registers.
    time.sleep(2 * INTERVAL_S + 0.3)
    after = instance.heartbeats(since=killed_at)
    assert len(after) >= 2, instance.explain("heartbeats did not continue")
    assert_heartbeats_valid(instance, after, runner_id)
    assert max(gaps([last_before, *after])) <= 2 * INTERVAL_S + SLACK_S
    assert len(instance.registrations()) == registered, instance.explain("registered again")
    # Whichever worker took over (a survivor, or the one gunicorn forked in the dead one's
    # place), it is a live worker of the same master.
    new_leader = instance.leader_pid()
    assert new_leader != leader
    assert new_leader in instance.proc.worker_pids()


# -- 3. JobForge outages ------------------------------------------------------------------


def readiness(instance: Instance) -> tuple[int, dict]:
    reply = call(instance.proc, "GET", "/health/ready", timeout=5.0)
    HealthCheckSchema().load(reply.body)
    return reply.status, reply.body


def test_jobforge_down_at_start_registers_within_the_backoff_cap_once_it_is_up(
    make_stub: StubFactory, make_instance: InstanceFactory
) -> None:
    backoff_cap_s = 3.0
    down_for_s = 10.0
    stub = make_stub(start=False)  # its port is chosen, nothing listens on it yet
    started = time.monotonic()
    instance = make_instance(
        stub=stub, env={"RUNNERKIT_REGISTRATION_BACKOFF_MAX_MS": str(int(backoff_cap_s * 1000))}
    )

    # Not registered: every worker says it is not ready, and why.
    pinned = [conn for _, conns in pin_connections(instance.proc, [1, 1, 1]) for conn in conns]
    try:
        for conn in pinned:
            reply = conn.request("GET", "/health/ready")
            assert reply.status == 503, reply
            HealthCheckSchema().load(reply.body)
            checks = {c["name"]: c for c in reply.body["checks"]}
            assert checks["registration"]["status"] == "unhealthy", reply.body
            assert "not registered" in checks["registration"]["message"], reply.body
    finally:
        for conn in pinned:
            conn.close()

    time.sleep(max(0.0, started + down_for_s - time.monotonic()))
    status, _ = readiness(instance)
    assert status == 503
    assert "JobForge unreachable" in instance.proc.log_text(), instance.explain()
    stub.start()
    up = time.monotonic()

    # The next attempt comes at most one backoff cap after the last failed one, plus one
    # lifecycle tick (1 s before the interval is known), plus slack for a busy machine.
    bound = backoff_cap_s + 1.0 + 2 * SLACK_S
    registration = instance.wait_registered(timeout=bound + 5.0)
    waited = registration.time - up
    assert waited <= bound, instance.explain(f"registered {waited:.2f}s after JobForge came up")
    RunnerRegistrationRequestSchema().load(registration.body)

    wait_until(lambda: readiness(instance)[0] == 200, 2.0, "not ready after registering")
    status, body = readiness(instance)
    checks = {c["name"]: c for c in body["checks"]}
    assert checks["registration"]["status"] == "healthy", body
    runner_id = registration.response["runnerId"]
    beat = instance.wait_heartbeat(since=registration.time, timeout=INTERVAL_S + 2.0)
    assert_heartbeats_valid(instance, [beat], runner_id)
    assert len(instance.registrations()) == 1, instance.explain()


def test_jobforge_that_forgot_the_runner_gets_exactly_one_new_registration(
    shared_instance: Instance,
) -> None:
    instance = shared_instance
    old_id = instance.runner_id()
    restarted = time.monotonic()
    instance.stub.restart(forget=True)

    rejected = instance.wait_heartbeat(
        since=restarted, timeout=2 * INTERVAL_S + 2.0, where=lambda h: h.status == 404
    )
    assert rejected.body["runnerId"] == old_id
    registration = wait_until(
        lambda: instance.accepted_registrations(since=restarted),
        2 * INTERVAL_S + 2.0,
        lambda: instance.explain("no new registration after JobForge forgot the runner"),
    )[0]
    assert registration.time - restarted <= 2 * INTERVAL_S + SLACK_S, instance.explain()
    assert registration.time - rejected.time <= SLACK_S, instance.explain(
        "the 404 did not lead to an immediate registration"
    )
    RunnerRegistrationRequestSchema().load(registration.body)
    new_id = registration.response["runnerId"]
    assert new_id != old_id

    time.sleep(max(0.0, registration.time + 2 * INTERVAL_S + 0.3 - time.monotonic()))
    after = instance.heartbeats(since=registration.time)
    assert len(after) >= 2, instance.explain("heartbeats did not continue")
    assert_heartbeats_valid(instance, after, new_id)
    assert len(instance.registrations(since=restarted)) == 1, instance.explain()
    assert [h.status for h in instance.heartbeats(since=restarted)].count(404) == 1

    # Every worker now answers jobs as the new runner.
    pinned = [conn for _, conns in pin_connections(instance.proc, [1, 1, 1]) for conn in conns]
    try:
        for conn in pinned:
            reply = conn.execute(job_request("checksum", {"data": "runnerkit"}))
            assert reply.status == 200, reply
            assert RunnerExecutionResponseSchema().load(reply.body)["runnerId"] == new_id
    finally:
        for conn in pinned:
            conn.close()
