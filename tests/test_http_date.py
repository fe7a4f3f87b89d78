"""The Date header's text, formatted once a second (``runnerkit.service.http_date``)."""

from __future__ import annotations

import email.utils

import pytest

from runnerkit.service import http_date as module
from runnerkit.service.http_date import http_date


def test_the_current_second_is_formatted_as_gunicorn_formats_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [1_800_000_000.25]
    monkeypatch.setattr(module.time, "time", lambda: now[0])
    first = http_date()
    assert first == email.utils.formatdate(1_800_000_000, localtime=False, usegmt=True)
    assert first == "Fri, 15 Jan 2027 08:00:00 GMT"
    now[0] = 1_800_000_000.75  # the same second: the same text
    assert http_date() is first
    now[0] = 1_800_000_001.0  # the next one
    assert http_date() == "Fri, 15 Jan 2027 08:00:01 GMT"


def test_a_given_time_is_formatted_as_asked() -> None:
    assert http_date(0) == "Thu, 01 Jan 1970 00:00:00 GMT"
    assert http_date(1_800_000_000.9) == email.utils.formatdate(
        1_800_000_000.9, localtime=False, usegmt=True
    )
