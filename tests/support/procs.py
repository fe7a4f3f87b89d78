"""Real server processes for integration tests: free ports and a managed gunicorn.

Every wait here is bounded and every process started is killed on the way out (the whole tree,
SIGKILL if SIGTERM was not enough), so a broken server fails a test instead of hanging it.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal as signals
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import psutil
import requests

from runnerkit.forge.serving import no_control_socket

#: The repository root: gunicorn runs here so ``app:app`` and ``deploy/...`` resolve.
REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on right now (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def running(pid: int) -> bool:
    """Whether ``pid`` runs: a zombie (dead, waiting for its parent to reap it) does not."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _tcp_connections(proc: psutil.Process) -> list[Any]:
    method = getattr(proc, "net_connections", None) or proc.connections
    return list(method(kind="tcp"))


class GunicornProcess:
    """One ``python -m gunicorn`` master and its workers, on a loopback port.

    ``env`` entries override ``os.environ`` (a value of ``None`` removes the variable);
    ``PYTHONUNBUFFERED=1`` is always set, and with a ``config`` file ``PORT``/``BIND_HOST`` are
    set to this process's port/host unless ``env`` says otherwise. ``--bind`` and ``--workers``
    are always passed on the command line, which wins over the config file. stdout and stderr
    go to ``<log_dir>/<name>-<port>.log``; read them with :meth:`log_text`.

    Use as a context manager, or call :meth:`start` and, always, :meth:`stop`.
    """

    def __init__(
        self,
        app_spec: str = "app:app",
        *,
        log_dir: str | os.PathLike[str],
        workers: int = 2,
        port: int | None = None,
        host: str = "127.0.0.1",
        config: str | os.PathLike[str] | None = None,
        env: Mapping[str, str | None] | None = None,
        extra_args: Iterable[str] = (),
        cwd: str | os.PathLike[str] = REPO_ROOT,
        control_socket: bool = False,
        name: str = "gunicorn",
    ) -> None:
        self.app_spec = app_spec
        self.workers = workers
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.config = None if config is None else str(config)
        self.cwd = Path(cwd)
        self.env_overrides = dict(env or {})
        self.extra_args = list(extra_args)
        self.control_socket = control_socket
        self.log_path = Path(log_dir) / f"{name}-{self.port}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None
        #: Every process of the tree ever seen, so stop() also finds orphaned workers.
        self._seen: dict[int, psutil.Process] = {}

    # -- lifecycle ----------------------------------------------------------------------

    @property
    def url(self) -> str:
        """Base URL, without a trailing slash."""
        return f"http://{self.host}:{self.port}"

    @property
    def master_pid(self) -> int:
        if self.process is None:
            raise RuntimeError("gunicorn was not started")
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def command(self) -> list[str]:
        """The argv this process is (or will be) started with."""
        cmd = [sys.executable, "-m", "gunicorn", self.app_spec]
        if self.config is not None:
            cmd += ["-c", self.config]
        cmd += ["--bind", f"{self.host}:{self.port}", "--workers", str(self.workers)]
        if not self.control_socket:
            cmd += no_control_socket()
        return cmd + self.extra_args

    def environment(self) -> dict[str, str]:
        """The environment the process is started with."""
        env = dict(os.environ)
        if self.config is not None:
            env["PORT"] = str(self.port)
            env["BIND_HOST"] = self.host
        for key, value in self.env_overrides.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def start(self) -> GunicornProcess:
        """Start the master; returns at once (see :meth:`wait_ready`)."""
        if self.process is not None:
            raise RuntimeError("gunicorn was already started")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            self.command(),
            cwd=self.cwd,
            env=self.environment(),
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    def wait_ready(self, path: str = "/health/live", timeout: float = 20.0) -> None:
        """Wait until ``GET path`` answers 200; raise with the log if it exits or times out."""
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        while time.monotonic() < deadline:
            if self.returncode is not None:
                raise RuntimeError(
                    f"gunicorn exited with {self.returncode} before it was ready\n{self.log_tail()}"
                )
            try:
                response = requests.get(self.url + path, timeout=(1.0, 2.0))
            except requests.RequestException as exc:
                last = f"{type(exc).__name__}: {exc}"
            else:
                if response.status_code == 200:
                    return
                last = f"HTTP {response.status_code}: {response.text[:200]}"
            time.sleep(0.1)
        raise TimeoutError(
            f"gunicorn not ready on {self.url}{path} after {timeout}s ({last})\n{self.log_tail()}"
        )

    def wait_workers_serving(
        self, timeout: float = 20.0, path: str = "/health/live", *, leaving_out: int = 0
    ) -> set[int]:
        """Wait until every one of the ``workers`` workers has answered a request.

        A worker only accepts connections once its app is loaded, so this is the moment every
        worker can take work. Returns the worker pids seen. ``leaving_out``: workers that take
        no new connections (the forge's dispatching one, with siblings): that many fewer
        answering is enough.
        """
        deadline = time.monotonic() + timeout
        seen: set[int] = set()
        while time.monotonic() < deadline:
            if self.returncode is not None:
                raise RuntimeError(f"gunicorn exited with {self.returncode}\n{self.log_tail()}")
            expected = set(self.worker_pids())
            if len(expected) == self.workers and expected <= seen:
                return seen
            if (
                leaving_out
                and len(expected) == self.workers
                and len(seen & expected) >= max(1, self.workers - leaving_out)
            ):
                return seen
            try:
                status, pid = self.answered_on_new_connection(path, timeout=2.0)
            except OSError:
                time.sleep(0.1)
                continue
            if status == 200 and pid is not None:
                seen.add(pid)
        raise TimeoutError(
            f"only workers {sorted(seen)} of {self.worker_pids()} answered within {timeout}s\n"
            f"{self.log_tail()}"
        )

    def answered_on_new_connection(
        self, path: str, timeout: float = 10.0
    ) -> tuple[int, int | None]:
        """``GET path`` on a new connection: the status, and the worker that held the
        connection (kept alive, so its worker still holds it when asked)."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            conn.connect()
            client_port = conn.sock.getsockname()[1]
            conn.request("GET", path)
            response = conn.getresponse()
            response.read()
            return response.status, self.worker_for_client_port(client_port)
        finally:
            conn.close()

    def worker_pids(self) -> list[int]:
        """Pids of the master's live child processes (the workers)."""
        try:
            children = psutil.Process(self.master_pid).children()
        except psutil.NoSuchProcess:
            return []
        self._remember(children)
        return sorted(c.pid for c in children if c.is_running())

    def worker_for_client_port(self, client_port: int) -> int | None:
        """The worker holding the server end of the loopback connection from ``client_port``."""
        for pid in self.worker_pids():
            try:
                connections = _tcp_connections(psutil.Process(pid))
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            for c in connections:
                if (
                    c.laddr
                    and c.laddr.port == self.port
                    and c.raddr
                    and c.raddr.port == client_port
                ):
                    return pid
        return None

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the master."""
        os.kill(self.master_pid, sig)

    def wait_exit(self, timeout: float) -> int | None:
        """The master's exit status, or ``None`` if it is still running after ``timeout``."""
        if self.process is None:
            return None
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM the master, wait up to ``timeout``, then SIGKILL whatever is left of the tree.

        Safe to call more than once; returns the master's exit status.
        """
        if self.process is None:
            return None
        self._tree()
        try:
            if self.process.poll() is None:
                self.signal(signals.SIGTERM)
                self.wait_exit(timeout)
        finally:
            self._kill(self._tree())
            if self._log_file is not None:
                self._log_file.close()
                self._log_file = None
        return self.process.returncode

    def kill(self, also: Callable[[], Iterable[psutil.Process]] | None = None) -> None:
        """SIGKILL the master and every descendant at once.

        ``also()`` lists processes outside the tree to kill with it (a runner's sentinel runs
        in a session of its own); it is called once the tree is frozen, so a worker still
        starting cannot start another one after the list was made.
        """
        if self.process is not None:
            self._kill(self._tree(), also)

    def _tree(self) -> list[psutil.Process]:
        try:
            master = psutil.Process(self.master_pid)
            self._remember([master, *master.children(recursive=True)])
        except psutil.NoSuchProcess:
            pass
        return list(self._seen.values())

    def _remember(self, procs: Iterable[psutil.Process]) -> None:
        for proc in procs:
            self._seen.setdefault(proc.pid, proc)

    def _kill(
        self,
        procs: list[psutil.Process],
        also: Callable[[], Iterable[psutil.Process]] | None = None,
    ) -> None:
        # Freeze them all first: killed one by one, a process still running could react to
        # another's death in between (a runner's sentinel deregisters once the master is gone).
        for proc in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.suspend()  # SIGSTOP; psutil checks the pid still names the same process
        # Children started while the list was made, then what lives outside the tree.
        listed = {p.pid for p in procs}
        late = [p for p in self._tree() if p.pid not in listed]
        late += list(also()) if also is not None else []
        for proc in late:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.suspend()
        procs = [*procs, *late]
        for proc in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        if self.process is not None:
            # The master is our child: Popen reaps it and keeps its exit status.
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=5)
        psutil.wait_procs([p for p in procs if p.pid != self.master_pid], timeout=5)

    def __enter__(self) -> GunicornProcess:
        if self.process is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- logs ---------------------------------------------------------------------------

    def log_text(self) -> str:
        """Everything gunicorn and the app wrote so far."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, chars: int = 3000) -> str:
        """The end of the log, labelled, for assertion messages."""
        return f"--- gunicorn log ({self.log_path}) ---\n{self.log_text()[-chars:]}"
