"""prometheus-client is imported late, from any thread: the first imports must not collide.

Each case is a fresh interpreter (prometheus-client not imported yet) in which six threads
touch the metrics at the same moment, as a request thread, the metrics publisher and a
scrape can. Before the imports were serialised, most such runs failed with "cannot import
name 'Counter' from partially initialized module".
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

_SCRIPT = """
import os, sys, tempfile, threading
from runnerkit.service import metrics as store
from runnerkit.service.metric_families import metrics
from runnerkit.service.metrics_exposition import exposition
from runnerkit.forge import metrics as forge
store.prepare_snapshot_dir(tempfile.mkdtemp(), (os.getpid(), 0.0))
assert "prometheus_client" not in sys.modules
calls = [metrics, store.publish, exposition,
         forge.forge_metrics, metrics, exposition]
barrier = threading.Barrier(len(calls))
errors = []
def call(function):
    barrier.wait()
    try:
        function()
    except Exception as exc:
        errors.append(repr(exc))
threads = [threading.Thread(target=call, args=(f,)) for f in calls]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(errors)
sys.exit(1 if errors else 0)
"""


@pytest.mark.parametrize("run", range(5))
def test_first_use_of_metrics_from_several_threads_at_once_imports_cleanly(run: int) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
