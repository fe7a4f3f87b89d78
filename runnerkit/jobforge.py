"""The HTTP client a runner uses to talk to JobForge (and TruthCore)."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

import requests

from runnerkit._version import __version__
from runnerkit.state import renew_after_fork


class JobForgeClient:
    """Calls to the control plane over one ``requests.Session`` per process.

    Sessions are not shared across ``fork``: a process that finds a session made by its
    parent makes its own. Every call has connect and read timeouts and, when a token is set,
    ``Authorization: Bearer <token>``.

    JobForge gives each runner a credential of its own at registration (``runnerToken``); the
    calls that speak for the runner (heartbeat, deregistration, results, events) carry it
    instead of the shared token. ``runner_token`` says where to find it (the instance's
    identity file); a JobForge that gave none gets the shared token as before.
    """

    def __init__(
        self,
        base_url: str,
        *,
        token: str = "",
        connect_timeout_s: float = 3.0,
        read_timeout_s: float = 10.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout = (connect_timeout_s, read_timeout_s)
        self._session: requests.Session | None = None
        self._pid = 0
        self._lock = threading.Lock()
        #: The current runnerToken ('' when JobForge gave none), read at each call.
        self.runner_token: Callable[[], str] = lambda: ""
        renew_after_fork(self)

    def renew_after_fork(self) -> None:
        """A forked child makes its own session (the parent's connections stay the parent's)."""
        self._lock = threading.Lock()
        self._session, self._pid = None, 0

    @property
    def session(self) -> requests.Session:
        with self._lock:
            if self._session is None or self._pid != os.getpid():
                session = requests.Session()
                session.headers["User-Agent"] = f"runnerkit/{__version__}"
                if self.token:
                    session.headers["Authorization"] = f"Bearer {self.token}"
                self._session, self._pid = session, os.getpid()
            return self._session

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", self.timeout)
        return self.session.request(method, self.base_url + path, **kwargs)

    def register(self, document: dict[str, Any]) -> requests.Response:
        return self.request("POST", "/runners/register", json=document)

    def runner_headers(self, runner_token: str | None = None) -> dict[str, str]:
        """``Authorization`` with the runner's own credential; {} keeps the shared token."""
        token = self.runner_token() if runner_token is None else runner_token
        return {"Authorization": f"Bearer {token}"} if token else {}

    def heartbeat(
        self, heartbeat: dict[str, Any], runner_token: str | None = None
    ) -> requests.Response:
        return self.request(
            "POST",
            "/runners/heartbeat",
            json=heartbeat,
            headers=self.runner_headers(runner_token),
        )

    def deregister(self, runner_id: str, runner_token: str | None = None) -> requests.Response:
        return self.request(
            "DELETE", f"/runners/{runner_id}", headers=self.runner_headers(runner_token)
        )
