"""The forge's ``/metrics`` next to a runner in one process.

Metric families are process-global: a forge and a runner app in one process (tests, ``flask
run``, an embedding app) must not trip over duplicate registrations, and a scrape must stay
a valid exposition (each family once). Each case runs in a fresh interpreter, so the first
app picks the metrics directory; prometheus-client imported before any app exists (which
once switched its single-process mode on) changes nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.security.stack import samples
from tests.support import REPO_ROOT

SCRIPT = textwrap.dedent(
    """
    import json, sys
    if sys.argv[2] == "single":
        import prometheus_client  # imported first: single-process mode
    from marshmallow import Schema, fields
    from runnerkit import Capability, Runner
    from runnerkit.forge import create_app

    class Words(Capability):
        id = "words"
        job_types = ["text.words"]

        class Input(Schema):
            text = fields.String(required=True)

        class Output(Schema):
            words = fields.Integer(required=True)

        def run(self, payload, ctx):
            return {"words": len(payload["text"].split())}

    base = sys.argv[1]
    first = sys.argv[3]
    def forge():
        return create_app({"DB_PATH": base + "/forge.sqlite3", "DISPATCHER": False})
    def runner():
        return Runner("side-runner", capabilities=[Words()]).create_app(
            {"RUNNERKIT_STATE_DIR": base + "/state", "RUNNERKIT_JOBFORGE_URL": ""}
        )
    apps = [forge(), runner()] if first == "forge" else [runner(), forge()]
    forge_app = apps[0] if first == "forge" else apps[1]
    runner_app = apps[1] if first == "forge" else apps[0]
    forge_client, runner_client = forge_app.test_client(), runner_app.test_client()
    forge_client.post("/jobs", json={"nope": 1})
    runner_client.post("/execute", json={
        "jobId": "550e8400-e29b-41d4-a716-446655440000", "moduleId": "m",
        "capabilityId": "words", "payload": {"text": "a b"}})
    second_forge = forge()  # a second forge app in the same process
    out = {
        "forge": forge_client.get("/metrics").get_data(as_text=True),
        "runner": runner_client.get("/metrics").get_data(as_text=True),
        "second": second_forge.test_client().get("/metrics").status_code,
        "mode": __import__("runnerkit.service.metrics").service.metrics.snapshot_dir() or "",
        "mmap": __import__("os").environ.get("PROMETHEUS_MULTIPROC_DIR", ""),
    }
    print("RESULT" + json.dumps(out))
    """
)


@pytest.mark.parametrize("first", ["forge", "runner"])
@pytest.mark.parametrize("mode", ["multi", "single"])
def test_a_forge_and_a_runner_share_one_process(tmp_path: Path, mode: str, first: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    env.pop("SERVER_SOFTWARE", None)
    completed = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path), mode, first],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    line = next(x for x in completed.stdout.splitlines() if x.startswith("RESULT"))
    out = json.loads(line.removeprefix("RESULT"))
    # The first app chose the directory: the forge's next to its DB, or the runner's; and
    # nothing switched prometheus-client's (memory-mapped) multiprocess mode on.
    expected = "forge.sqlite3.metrics" if first == "forge" else "state"
    assert expected in out["mode"], out["mode"]
    assert out["mmap"] == ""
    assert out["second"] == 200
    for name in ("forge", "runner"):
        text = out[name]
        types = [x for x in text.splitlines() if x.startswith("# TYPE ")]
        assert len(types) == len(set(types)), f"a family appears twice in the {name} scrape"
        scrape = samples(text)
        assert scrape, text
    forge_scrape = samples(out["forge"])
    assert forge_scrape[("forge_jobs", (("status", "queued"),))] == 0
    assert forge_scrape[("forge_runners", (("status", "healthy"),))] == 0
    bad_job = (("method", "POST"), ("path", "/jobs"), ("status", "400"))
    assert forge_scrape[("http_requests_total", bad_job)] == 1
    runner_scrape = samples(out["runner"])
    received = (("capability", "words"), ("priority", "unknown"))
    assert runner_scrape[("jobs_received_total", received)] == 1
