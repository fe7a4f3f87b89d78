"""The HTTP client a runner uses to talk to JobForge (and TruthCore)."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

import requests

from runnerkit._version import __version__
from runnerkit.service.afterfork import renew_after_fork
from runnerkit.service.settings import split_base_urls

log = logging.getLogger("runnerkit.jobforge")

#: What makes a call move to the next base URL: the forge could not be reached. An HTTP
#: answer (4xx, 5xx) is the forge speaking and stays where it is.
UNREACHABLE = (requests.ConnectionError, requests.Timeout)


class JobForgeClient:
    """Calls to the control plane over one ``requests.Session`` per process.

    Sessions are not shared across ``fork``: a process that finds a session made by its
    parent makes its own. Every call has connect and read timeouts and, when a token is set,
    ``Authorization: Bearer <token>``.

    JobForge gives each runner a credential of its own at registration (``runnerToken``); the
    calls that speak for the runner (heartbeat, deregistration, results, events) carry it
    instead of the shared token. ``runner_token`` says where to find it (the instance's
    identity file); a JobForge that gave none gets the shared token as before.

    ``base_url`` may name several forges (a comma-separated string or a sequence) that
    share one database: a call goes to the URL that last answered and, when that one is
    unreachable (connection refused, timeout), to the next, with the same credentials (the
    runner's identity lives in the shared database). One line is logged when it moves.
    """

    def __init__(
        self,
        base_url: str | Sequence[str],
        *,
        token: str = "",
        connect_timeout_s: float = 3.0,
        read_timeout_s: float = 10.0,
    ) -> None:
        urls = (
            split_base_urls(base_url)
            if isinstance(base_url, str)
            else [url.rstrip("/") for url in base_url]
        )
        #: Every base URL, in the configured order ([""] without any).
        self.base_urls: list[str] = urls or [""]
        self._current = 0
        #: The last call found no base URL reachable (reset by the next answer).
        self.unreachable = False
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

    @property
    def base_url(self) -> str:
        """The base URL calls go to first: the one that last answered."""
        return self.base_urls[self._current]

    def url_for(self, path: str) -> str:
        """``path`` under the current base URL (what the outbox stores; it is sent to the
        base URL current at delivery, see :meth:`post`)."""
        return self.base_url + path

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """``method`` on ``path`` under the base URL that last answered, moving on to the
        next while one is unreachable; raises the last error when none is reachable."""
        kwargs.setdefault("timeout", self.timeout)
        session = self.session
        start = self._current
        count = len(self.base_urls)
        for step in range(count):
            index = (start + step) % count
            try:
                response = session.request(method, self.base_urls[index] + path, **kwargs)
            except UNREACHABLE as exc:
                if step == count - 1:
                    self.unreachable = True
                    raise
                log.debug("%s unreachable (%s)", self.base_urls[index], type(exc).__name__)
                continue
            self.unreachable = False
            if index != start:
                self._move(start, index)
            return response
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

    def _move(self, start: int, index: int) -> None:
        with self._lock:
            if self._current == index:
                return  # another thread moved already (and said so)
            self._current = index
        log.warning(
            "JobForge at %s unreachable; now using %s",
            self.base_urls[start],
            self.base_urls[index],
        )

    def post(self, url: str, **kwargs: Any) -> requests.Response:
        """POST to a full URL; one under any of the base URLs goes through :meth:`request`
        (and so fails over), any other (a TruthCore of its own) is sent as it is."""
        for base in self.base_urls:
            if base and (url == base or url.startswith(base + "/")):
                return self.request("POST", url[len(base) :], **kwargs)
        kwargs.setdefault("timeout", self.timeout)
        return self.session.post(url, **kwargs)

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
