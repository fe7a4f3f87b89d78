"""What the dashboard's browser tests share: Chromium under Playwright, pages, screenshots,
and a forge under gunicorn for the browser to look at.

Chromium is Debian's ``/usr/bin/chromium`` (``CHROMIUM_PATH`` overrides it), driven by Python
Playwright, never a downloaded browser; either missing is a test failure that says how to
install it, not a skip. Screenshots go to ``test-artifacts/dashboard/``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.support import REPO_ROOT, GunicornProcess

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page, ViewportSize

#: Debian's Chromium; CHROMIUM_PATH overrides it.
CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = REPO_ROOT / "test-artifacts" / "dashboard"
DESKTOP: ViewportSize = {"width": 1280, "height": 800}
PHONE: ViewportSize = {"width": 390, "height": 844}


def clean_env(**values: str) -> dict[str, str | None]:
    """Drop every RUNNERKIT_* / JobForge / TruthCore variable of the caller, then set ``values``."""
    prefixes = ("RUNNERKIT_", "JOBFORGE_", "TRUTHCORE_")
    env: dict[str, str | None] = {k: None for k in os.environ if k.startswith(prefixes)}
    env.update({"RUNNER_TOKEN": None, "WEB_CONCURRENCY": None, "SERVER_SOFTWARE": None})
    env.update(values)
    return env


# --------------------------------------------------------------------------- the browser


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Chromium from /usr/bin/chromium under Playwright; a clear failure when either is absent."""
    try:
        from playwright.sync_api import Error as PlaywrightError
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        missing: ImportError | None = exc
    else:
        missing = None
    if missing is not None:
        pytest.fail(
            f"Python Playwright is not installed ({missing}); install the dev extra "
            "(pip install -e '.[dev]', which has playwright>=1.40,<2). Do not run "
            "'playwright install': the test uses Debian's chromium.",
            pytrace=False,
        )
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        pytest.fail(
            f"Chromium is not installed at {CHROMIUM}; install Debian's package "
            "(apt-get install -y chromium) or point CHROMIUM_PATH at a Chromium binary.",
            pytrace=False,
        )
    with sync_playwright() as playwright:
        try:
            browser = playwright.chromium.launch(
                executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=60_000
            )
        except PlaywrightError as exc:
            pytest.fail(f"Chromium at {CHROMIUM} did not start: {exc}", pytrace=False)
        try:
            yield browser
        finally:
            browser.close()


def new_page(browser: Browser, viewport: ViewportSize, **options: Any) -> Page:
    context = browser.new_context(viewport=viewport, **options)
    page = context.new_page()
    page.set_default_timeout(15_000)
    return page


def shoot(page: Page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.wait_for_load_state("load")
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def assert_fits(page: Page, what: str) -> None:
    """Nothing is wider than the viewport: the body does not scroll sideways."""
    sizes = page.evaluate(
        "() => ({body: document.body.scrollWidth, doc: document.documentElement.scrollWidth,"
        " viewport: window.innerWidth})"
    )
    assert sizes["body"] <= sizes["viewport"] + 1, f"{what} overflows sideways: {sizes}"
    assert sizes["doc"] <= sizes["viewport"] + 1, f"{what} overflows sideways: {sizes}"


# --------------------------------------------------------------------------- the forge


def gunicorn_forge(
    tmp_path: Path, request: pytest.FixtureRequest, **settings: str
) -> Iterator[GunicornProcess]:
    """A forge under gunicorn (2 workers) on its own SQLite file, ``RUNNERKIT_FORGE_<k>=<v>``
    for each of ``settings``; its log goes with a failing test's report. For a fixture to
    ``yield from``."""
    env = {f"RUNNERKIT_FORGE_{k}": v for k, v in settings.items()}
    proc = GunicornProcess(
        "runnerkit.forge:app",
        log_dir=tmp_path,
        workers=2,
        name="forge",
        env=clean_env(
            RUNNERKIT_FORGE_DB_PATH=str(tmp_path / "forge" / "forge.sqlite3"),
            RUNNERKIT_FORGE_POLL_INTERVAL_MS="50",
            **env,
        ),
        extra_args=["--worker-class", "gthread", "--threads", "8", "--graceful-timeout", "5"],
    )
    request.node.gunicorn_processes = [*getattr(request.node, "gunicorn_processes", []), proc]
    with proc:
        proc.wait_ready("/health", timeout=30)
        yield proc
