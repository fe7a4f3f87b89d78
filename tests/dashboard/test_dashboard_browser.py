"""The dashboard in a real headless Chromium, against a real forge and the example runner.

The forge (``gunicorn runnerkit.forge:app``) and the example runner (``gunicorn app:app -c
deploy/gunicorn.conf.py``) run on free loopback ports; jobs go in through ``POST /jobs``. While
two long ``demo.slow`` jobs run, Chromium (Debian's ``/usr/bin/chromium``, driven by Python
Playwright — never a downloaded browser) loads the dashboard, checks the runner and job rows,
clicks into jobs, waits for a page to refresh itself, and saves screenshots at desktop
(1280x800) and phone (390x844) sizes into ``test-artifacts/dashboard/``.

Chromium or Playwright missing is a test failure that says how to install them, not a skip.
"""

from __future__ import annotations

import re
import time
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
    clean_env,
    gunicorn_forge,
    new_page,
    shoot,
)
from tests.support import GunicornProcess
from tests.support.waiting import wait_until

if TYPE_CHECKING:
    from playwright.sync_api import Browser

__all__ = ["browser"]  # the module-scoped Chromium fixture (tests/dashboard/chromium.py)

pytestmark = pytest.mark.integration

#: A value under a secret-like key of one job's payload: it must never be on a page.
SECRET = "tok-SECRET-browser-9f3a"
#: The long jobs: 48 steps of 250 ms, so they are running for ~12 s after they start.
SLOW = {"steps": 48, "step_ms": 250}
GUNICORN_CONF = "deploy/gunicorn.conf.py"


# --------------------------------------------------------------------------- the servers


@pytest.fixture
def forge(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[GunicornProcess]:
    yield from gunicorn_forge(tmp_path, request, HEARTBEAT_INTERVAL_MS="1000")


@pytest.fixture
def runner(
    forge: GunicornProcess, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[GunicornProcess]:
    proc = GunicornProcess(
        "app:app",
        log_dir=tmp_path,
        workers=2,
        config=GUNICORN_CONF,
        name="runner",
        env=clean_env(
            RUNNERKIT_JOBFORGE_URL=forge.url,
            RUNNERKIT_TRUTHCORE_URL=forge.url,
            RUNNERKIT_STATE_DIR=str(tmp_path / "runner-state"),
            GUNICORN_GRACEFUL_TIMEOUT="5",
        ),
    )
    request.node.gunicorn_processes = [*getattr(request.node, "gunicorn_processes", []), proc]
    with proc:
        proc.wait_ready("/health/ready", timeout=45)  # ready = registered with the forge
        yield proc


def post_job(forge: GunicornProcess, job: dict[str, Any]) -> str:
    response = requests.post(f"{forge.url}/jobs", json=job, timeout=10)
    assert response.status_code == 202, response.text
    return str(job["id"])


def job_status(forge: GunicornProcess, job_id: str) -> str:
    response = requests.get(f"{forge.url}/jobs/{job_id}", timeout=10)
    assert response.status_code == 200, response.text
    return str(response.json()["status"])


# --------------------------------------------------------------------------- the test


def test_dashboard_in_chromium_while_jobs_run(
    browser: Browser, forge: GunicornProcess, runner: GunicornProcess
) -> None:
    started = time.monotonic()

    def logs() -> str:
        return f"{forge.log_tail(3000)}\n{runner.log_tail(3000)}"

    # -- jobs: three that succeed, one that fails validation, two long ones ---------------
    stats = []
    for i, text in enumerate(["Runners run jobs.", "JobForge queues them.", "Truth remembers."]):
        job = job_request("text.stats", {"text": text, "top": 2}, priority=40 + i)
        if i == 0:
            job["payload"]["options"] = {"api_token": SECRET}
        stats.append(post_job(forge, job))
    bad = post_job(forge, job_request("text.stats", {"text": 42}, priority=80))
    slow = [
        post_job(forge, job_request("demo.slow", SLOW, priority=60, timeout_ms=60_000))
        for _ in range(2)
    ]
    expected = {**dict.fromkeys(stats, "completed"), bad: "failed"}
    wait_until(
        lambda: (
            all(job_status(forge, j) == s for j, s in expected.items())
            and all(job_status(forge, j) == "running" for j in slow)
        ),
        30,
        lambda: (
            f"jobs did not settle: "
            f"{ {j: job_status(forge, j) for j in [*expected, *slow]} }\n{logs()}"
        ),
    )
    remaining = 12.0 - (time.monotonic() - started)
    assert remaining > 4, f"the slow jobs may finish before the pages are checked\n{logs()}"

    # -- the dashboard on a desktop --------------------------------------------------------
    from playwright.sync_api import expect

    desk = new_page(browser, DESKTOP)
    console_errors: list[str] = []  # e.g. a Content-Security-Policy violation
    desk.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
    response = desk.goto(forge.url + "/")
    assert response is not None and response.status == 200
    assert desk.locator('meta[http-equiv="refresh"]').get_attribute("content") == "5"

    runner_row = desk.get_by_test_id("runner-row")
    expect(runner_row).to_have_count(1)
    expect(runner_row.get_by_test_id("runner-name")).to_have_text("example-runner")
    expect(runner_row.get_by_test_id("runner-status")).to_have_text("healthy")
    expect(runner_row.get_by_test_id("runner-active-jobs")).to_have_text(re.compile(r"^[1-9]"))
    for job_type in ("text.stats", "data.checksum", "demo.slow"):
        expect(runner_row.get_by_test_id("runner-capabilities")).to_contain_text(job_type)

    rows = desk.get_by_test_id("job-row")
    expect(rows).to_have_count(6)
    for job_id, status in {**expected, **dict.fromkeys(slow, "running")}.items():
        row = desk.locator(f'[data-testid="job-row"][data-job-id="{job_id}"]')
        expect(row.get_by_test_id("job-status")).to_have_text(status)
    failed_row = desk.locator(f'[data-testid="job-row"][data-job-id="{bad}"]')
    expect(failed_row.get_by_test_id("job-outcome")).to_contain_text("VALIDATION_ERROR")
    running_counts = desk.locator('[data-testid="status-filter"][data-status="running"]')
    expect(running_counts.get_by_test_id("status-count")).to_have_text("2")
    assert SECRET not in response.text()
    assert_fits(desk, "the desktop dashboard")
    shoot(desk, "desktop-dashboard")

    # -- the same page on a phone: rows become cards, nothing scrolls sideways -------------
    phone = new_page(browser, PHONE, is_mobile=True, has_touch=True, device_scale_factor=2)
    phone.goto(forge.url + "/")
    expect(phone.get_by_test_id("job-row")).to_have_count(6)
    expect(phone.get_by_test_id("runner-row").get_by_test_id("runner-status")).to_have_text(
        "healthy"
    )
    assert_fits(phone, "the phone dashboard")
    shoot(phone, "phone-dashboard")

    # -- a real click into a running job ---------------------------------------------------
    desk.locator(f'[data-testid="job-row"][data-job-id="{slow[0]}"]').get_by_test_id(
        "job-link"
    ).click()
    expect(desk).to_have_url(re.compile(rf"/jobs/{slow[0]}/view$"))
    detail = desk.get_by_test_id("job-detail")
    expect(detail.get_by_test_id("job-status")).to_have_text("running")
    expect(desk.get_by_test_id("job-request")).to_contain_text('"type": "demo.slow"')
    expect(desk.get_by_test_id("job-request")).to_contain_text('"steps": 48')
    expect(desk.get_by_test_id("job-no-result")).to_be_visible()
    events = desk.get_by_test_id("event-row")
    expect(events.first).to_have_attribute("data-type", "job.created")
    expect(desk.locator('[data-testid="event-row"][data-type="job.started"]')).to_have_count(1)
    expect(
        desk.locator('[data-testid="assertion-row"][data-predicate="status"]').first
    ).to_be_visible()
    shoot(desk, "desktop-job-running")

    phone.goto(f"{forge.url}/jobs/{slow[0]}/view")
    expect(phone.get_by_test_id("job-status")).to_have_text("running")
    assert_fits(phone, "the phone job page")
    shoot(phone, "phone-job-running")

    # -- the page refreshes itself: the job completes on screen without a reload -----------
    expect(detail.get_by_test_id("job-status")).to_have_text("completed", timeout=40_000)
    expect(desk.get_by_test_id("job-result")).to_contain_text('"completed_steps": 48')
    expect(
        desk.locator('[data-testid="event-row"][data-type="job.progress"]').first
    ).to_be_visible()
    expect(desk.locator('[data-testid="event-row"][data-type="job.completed"]')).to_have_count(1)
    expect(
        desk.locator('[data-testid="assertion-row"][data-predicate="result"]').first
    ).to_be_visible()
    assert desk.locator('meta[http-equiv="refresh"]').count() == 0  # finished: no more reloads
    shoot(desk, "desktop-job-completed")

    # -- back to the list, filter by status with a click, open the failed job -------------
    desk.get_by_test_id("back").click()
    expect(desk).to_have_url(forge.url + "/")
    desk.locator('[data-testid="status-filter"][data-status="failed"]').click()
    expect(desk).to_have_url(forge.url + "/?status=failed")
    expect(desk.get_by_test_id("job-row")).to_have_count(1)
    desk.get_by_test_id("job-row").get_by_test_id("job-link").click()
    expect(desk).to_have_url(re.compile(rf"/jobs/{bad}/view$"))
    expect(desk.get_by_test_id("job-status")).to_have_text("failed")
    expect(desk.get_by_test_id("job-error-summary")).to_contain_text("VALIDATION_ERROR")
    expect(desk.get_by_test_id("job-result")).to_contain_text('"category": "VALIDATION_ERROR"')
    shoot(desk, "desktop-job-failed")
    phone.goto(f"{forge.url}/jobs/{bad}/view")
    assert_fits(phone, "the phone page of a failed job")
    shoot(phone, "phone-job-failed")

    # -- the completed stats job with the secret in its request ----------------------------
    response = desk.goto(f"{forge.url}/jobs/{stats[0]}/view")
    assert response is not None and SECRET not in response.text()
    expect(desk.get_by_test_id("job-result")).to_contain_text('"words": 3')
    expect(desk.get_by_test_id("job-request")).to_contain_text('"api_token": "[REDACTED]"')

    assert console_errors == [], console_errors

    # -- an unknown job: the friendly 404 ---------------------------------------------------
    missing = desk.goto(f"{forge.url}/jobs/00000000-0000-4000-8000-000000000000/view")
    assert missing is not None and missing.status == 404
    expect(desk.get_by_test_id("not-found")).to_contain_text("No such job")
    desk.context.close()
    phone.context.close()
