"""A runner whose state directory cannot be written boots, serves and is not ready until it can.

gunicorn halts the whole runner when a worker fails to boot, so nothing a worker writes at
start may raise out of the app's creation (a full disk, an I/O error, a file in the way).
"""

from __future__ import annotations

from pathlib import Path

from runnerkit import Runner
from tests.helpers import Echo


def test_a_runner_serves_unready_while_its_state_directory_cannot_be_made(
    tmp_path: Path,
) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the state directory's parent should be")
    runner = Runner("no-state-dir", capabilities=[Echo])
    app = runner.create_app(
        {"RUNNERKIT_STATE_DIR": str(blocker / "state"), "RUNNERKIT_JOBFORGE_URL": ""}
    )
    client = app.test_client()

    assert client.get("/health/live").status_code == 200
    ready = client.get("/health/ready")
    assert ready.status_code == 503
    storage = next(c for c in ready.get_json()["checks"] if c["name"] == "storage")
    assert storage["status"] == "unhealthy"
    assert "the state directory" in storage["message"], storage

    blocker.unlink()  # the way is clear again: the next readiness check makes the directory
    ready = client.get("/health/ready")
    assert ready.status_code == 200, ready.get_json()
    assert (blocker / "state" / "slots").is_dir()
