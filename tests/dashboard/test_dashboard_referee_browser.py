"""The referee's findings on the dashboard, in a real headless Chromium.

A real forge (gunicorn) and the plain-Flask runner that breaks the contracts on purpose
(gunicorn; it registers, then heartbeats and answers as ``runnerId: "unknown"``): the
runner's row says why its heartbeats are refused and how many violations it has, the list
opens with a click, a violation's job link leads to the job's page, which shows what that
job's answer broke; a registration from nobody the forge knows shows in a section of its own.
Screenshots go to ``test-artifacts/dashboard/`` (desktop and phone sizes).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import requests

from runnerkit.cli.forge_client import job_request
from tests.dashboard.chromium import (
    DESKTOP,
    PHONE,
    assert_fits,
    browser,
    gunicorn_forge,
    new_page,
    shoot,
)
from tests.support import GunicornProcess, free_port
from tests.support.waiting import wait_until

if TYPE_CHECKING:
    from playwright.sync_api import Browser

__all__ = ["browser"]  # the module-scoped Chromium fixture (tests/dashboard/chromium.py)

pytestmark = pytest.mark.integration

REFUSAL = "heartbeat refused: runnerId: not a valid UUID (got 'unknown')"


@pytest.fixture
def forge(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[GunicornProcess]:
    # The guide's runner keeps no runnerToken: the forge trusts the runnerId it sends.
    yield from gunicorn_forge(
        tmp_path, request, TRUST_RUNNER_IDS="1", HEARTBEAT_INTERVAL_MS="60000"
    )


@pytest.fixture
def sloppy_runner(
    forge: GunicornProcess, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[GunicornProcess]:
    port = free_port()
    proc = GunicornProcess(
        "tests.support.nonconforming_runner:app",
        log_dir=tmp_path,
        workers=1,
        port=port,
        name="runner",
        env={
            "NONCONFORMING_FORGE_URL": forge.url,
            "NONCONFORMING_HEALTH_URL": f"http://127.0.0.1:{port}/health",
            "NONCONFORMING_HEARTBEAT_S": "0.3",
        },
    )
    request.node.gunicorn_processes = [*getattr(request.node, "gunicorn_processes", []), proc]
    with proc:
        proc.wait_ready("/health", timeout=30)
        yield proc


def _runners(forge: GunicornProcess) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = requests.get(f"{forge.url}/runners", timeout=10).json()["items"]
    return items


def test_the_dashboard_shows_what_a_runner_broke(
    browser: Browser, forge: GunicornProcess, sloppy_runner: GunicornProcess
) -> None:
    from playwright.sync_api import expect

    wait_until(
        lambda: any(r.get("refusal") == REFUSAL for r in _runners(forge)),
        20,
        lambda: f"no refused heartbeat on the runner: {_runners(forge)}\n{forge.log_tail(3000)}",
    )
    job = job_request("math.add", {"a": 2, "b": 3}, timeout_ms=5_000)
    assert requests.post(f"{forge.url}/jobs", json=job, timeout=10).status_code == 202
    wait_until(
        lambda: (
            requests.get(f"{forge.url}/jobs/{job['id']}", timeout=10).json()["status"]
            == "completed"
        ),
        20,
        lambda: f"the job did not complete\n{forge.log_tail(3000)}",
    )
    ghost = requests.post(f"{forge.url}/runners/register", json={"name": "ghost"}, timeout=10)
    assert ghost.status_code == 400

    desk = new_page(browser, DESKTOP)
    console_errors: list[str] = []
    desk.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
    desk.goto(forge.url + "/?refresh=0")
    row = desk.get_by_test_id("runner-row")
    expect(row).to_have_count(1)
    expect(row.get_by_test_id("runner-refusal")).to_have_text(REFUSAL)
    expect(row.get_by_test_id("runner-violation-count")).to_have_text(re.compile(r"^[2-9]|\d\d"))
    listed = row.locator('[data-testid="violation"][data-path="runnerId"]')
    expect(listed.first).to_be_hidden()  # folded until asked for
    row.get_by_test_id("runner-violations").locator("summary").click()
    answer = row.locator(
        '[data-testid="violation"][data-contract="RunnerExecutionResponse"][data-path="runnerId"]'
    )
    expect(answer).to_have_count(1)
    expect(answer.get_by_test_id("violation-message")).to_have_text(
        "not a valid UUID (got 'unknown')"
    )
    expect(
        row.locator('[data-testid="violation"][data-contract="RunnerHeartbeat"]').first
    ).to_be_visible()
    unknown = desk.get_by_test_id("unattributed-violations")
    expect(unknown).to_contain_text("name 'ghost'")
    expect(unknown.locator('[data-testid="violation"][data-path="version"]')).to_have_count(1)
    assert_fits(desk, "the dashboard with violations")
    shoot(desk, "desktop-referee-runner")

    answer.get_by_role("link").click()
    expect(desk).to_have_url(re.compile(rf"/jobs/{job['id']}/view$"))
    found = desk.get_by_test_id("job-violations").get_by_test_id("violation")
    expect(found).to_have_count(1)
    expect(found).to_have_attribute("data-path", "runnerId")
    expect(found).to_contain_text("attempt 1")
    shoot(desk, "desktop-referee-job")

    phone = new_page(browser, PHONE, is_mobile=True, has_touch=True, device_scale_factor=2)
    phone.goto(forge.url + "/?refresh=0")
    expect(phone.get_by_test_id("runner-refusal")).to_have_text(REFUSAL)
    assert_fits(phone, "the phone dashboard with violations")
    shoot(phone, "phone-referee-runner")
    assert console_errors == [], console_errors
