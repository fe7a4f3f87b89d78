"""`runnerkit up` (and `make run`): the forge and a runner side by side, with sample jobs.

Both servers run under gunicorn in their own process groups, so a Ctrl-C reaches only this
process, which then stops the runner first (it drains and deregisters from a forge that is
still up) and the forge after it.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import IO, Any

import requests

from runnerkit.cli.forge_client import job_request, wait_for_job
from runnerkit.forge.serving import gunicorn_argv, no_control_socket


class Server:
    """One gunicorn process tree with its log file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        self._log: IO[bytes] = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            argv,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 70.0) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self._log.close()

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def wait_http(url: str, server: Server, timeout: float, ok: tuple[int, ...] = (200,)) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not server.alive():
            return False
        try:
            if requests.get(url, timeout=2).status_code in ok:
                return True
        except requests.RequestException:
            pass
        time.sleep(0.2)
    return False


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something already listens on ``host:port`` (bound as gunicorn binds it).

    gunicorn retries a busy port for a few seconds before giving up, and meanwhile whatever
    holds the port answers our health checks: a stranger's forge would be taken for ours.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def expected_status(sample: dict[str, Any]) -> str:
    """How a sample job is meant to end: ``"expect"`` in the samples file, else completed."""
    return str(sample.get("expect", "completed"))


def summarize(sample: dict[str, Any], job: dict[str, Any]) -> str:
    """One line per finished sample job; ``ok`` when it ended as the sample expects."""
    result = job.get("result") or {}
    status = job.get("status", "?")
    note = f" ({sample['note']})" if sample.get("note") else ""
    meta = result.get("metadata") or {}
    timing = f"{meta.get('durationMs', 0):.0f} ms, {meta.get('attempts', 1)} attempt(s)"
    mark = "ok  " if status == expected_status(sample) else "FAIL"
    if status == "completed":
        data = json.dumps(result.get("data"), ensure_ascii=False)
        if len(data) > 110:
            data = data[:107] + "..."
        return f"  {mark}  {sample['type']:<14} {status:<9} {timing}{note}\n        {data}"
    error = result.get("error") or job.get("error") or {}
    detail = "; ".join(
        f"{'.'.join(d.get('path', []))}: {d['message']}" for d in error.get("details", [])[:3]
    )
    return (
        f"  {mark}  {sample['type']:<14} {status:<9} {timing}{note}\n"
        f"        {error.get('category', '')} {error.get('code', '')}: "
        f"{error.get('message', '')}{' — ' + detail if detail else ''}"
    )


def run_stack(
    app: str,
    samples_path: str,
    forge_port: int,
    runner_port: int,
    state_dir: str,
    exit_after_samples: bool = False,
) -> int:
    for port, what, option in (
        (forge_port, "forge", "--forge-port (make run FORGE_PORT=...)"),
        (runner_port, "runner", "--runner-port (make run PORT=...)"),
    ):
        if port_in_use(port):
            print(
                f"port {port} for the {what} is already in use (another runnerkit up, forge or "
                f"runner?): stop it, or choose a free port with {option}",
                file=sys.stderr,
            )
            return 2
    state = Path(state_dir).resolve()
    state.mkdir(parents=True, exist_ok=True)
    forge_url = f"http://127.0.0.1:{forge_port}"
    runner_url = f"http://127.0.0.1:{runner_port}"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("SERVER_SOFTWARE", None)
    # One secret for this stack: the forge signs every execution request, the runner checks.
    # It is kept (owner-only) so `runnerkit call` can sign a request by hand too.
    secret = env.get("RUNNERKIT_SIGNING_SECRET") or secrets.token_urlsafe(32)
    secret_path = state / "signing-secret"
    secret_fd = os.open(secret_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(secret_fd, "w") as handle:
        os.fchmod(handle.fileno(), 0o600)
        handle.write(secret + "\n")

    forge_env = dict(
        env,
        RUNNERKIT_FORGE_DB_PATH=str(state / "forge.sqlite3"),
        RUNNERKIT_FORGE_SIGNING_SECRET=secret,
    )
    forge = Server(
        "forge",
        gunicorn_argv(f"127.0.0.1:{forge_port}"),
        forge_env,
        state / "forge.log",
    )
    servers = [forge]
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        print(f"forge    starting on {forge_url}  (log: {forge.log_path})", flush=True)
        if not wait_http(f"{forge_url}/health", forge, 30):
            print(f"the forge did not start:\n{forge.tail()}", file=sys.stderr)
            return 1
        conf = ["-c", "deploy/gunicorn.conf.py"] if Path("deploy/gunicorn.conf.py").exists() else []
        runner_env = dict(
            env,
            PORT=str(runner_port),
            RUNNERKIT_PORT=str(runner_port),
            RUNNERKIT_JOBFORGE_URL=forge_url,
            RUNNERKIT_TRUTHCORE_URL=forge_url,
            RUNNERKIT_STATE_DIR=str(state / "runner"),
            RUNNERKIT_SIGNING_SECRET=secret,
            RUNNERKIT_HEARTBEAT_INTERVAL_MS=env.get("RUNNERKIT_HEARTBEAT_INTERVAL_MS", "30000"),
        )
        runner = Server(
            "runner",
            [
                sys.executable,
                "-m",
                "gunicorn",
                *conf,
                app,
                "--bind",
                f"127.0.0.1:{runner_port}",
                "--workers",
                "2",
                *no_control_socket(),
            ],
            runner_env,
            state / "runner.log",
        )
        servers.insert(0, runner)
        print(f"runner   starting on {runner_url}  (log: {runner.log_path})", flush=True)
        if not wait_http(f"{runner_url}/health/ready", runner, 60):
            print(f"the runner did not register:\n{runner.tail()}", file=sys.stderr)
            return 1
        print("runner   registered with the forge\n", flush=True)
        unexpected = run_samples(forge_url, samples_path)
        print(f"\ndashboard: {forge_url}/", flush=True)
        print(
            f"call the runner yourself: runnerkit call <capability> --data '{{...}}' "
            f"--url {runner_url} --secret-file {secret_path}",
            flush=True,
        )
        if unexpected:
            print(
                f"{unexpected} sample job(s) did not end as expected (see FAIL above)",
                file=sys.stderr,
                flush=True,
            )
        status = 1 if unexpected else 0
        if exit_after_samples:
            return status
        print("Ctrl-C stops both (the runner deregisters first).", flush=True)
        while not stop.wait(0.5):
            for server in servers:
                if not server.alive():
                    print(f"the {server.name} exited:\n{server.tail()}", file=sys.stderr)
                    return 1
        return status
    finally:
        for server in servers:
            print(f"stopping the {server.name} ...", flush=True)
            server.stop()
        print("stopped.", flush=True)


def run_samples(forge_url: str, samples_path: str) -> int:
    """Submit each sample job, print each result as it finishes; how many did not end as
    their sample expects (``"expect": "failed"`` marks one meant to fail)."""
    try:
        samples: list[dict[str, Any]] = json.loads(Path(samples_path).read_text())
    except (OSError, ValueError) as exc:
        print(f"no sample jobs ({samples_path}: {exc})")
        return 0
    submitted = []
    for sample in samples:
        job = job_request(
            sample["type"],
            sample.get("data", {}),
            priority=sample.get("priority", 50),
            timeout_ms=sample.get("timeoutMs", 30_000),
            source="runnerkit-up",
        )
        response = requests.post(f"{forge_url}/jobs", json=job, timeout=10)
        print(f"submitted {sample['type']:<14} -> {response.status_code} {job['id']}", flush=True)
        submitted.append((sample, job["id"]))
    print("\nresults:", flush=True)
    unexpected = 0
    for sample, job_id in submitted:
        timeout = sample.get("timeoutMs", 30_000) / 1000.0 + 30
        job = wait_for_job(forge_url, job_id, timeout)
        unexpected += job.get("status") != expected_status(sample)
        print(summarize(sample, job), flush=True)
    return unexpected
