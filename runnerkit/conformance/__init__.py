"""``runnerkit conformance``: a black-box check of a live runner over HTTP, whatever it is
written in (checks in ``checks.py``, sample inputs in ``samples.py``, the report in
``report.py``, the command in ``command.py``)."""

from runnerkit.conformance.checks import Suite
from runnerkit.conformance.probe import Probe
from runnerkit.conformance.report import Check, Finding, Report
from runnerkit.conformance.sources import Advertised, SourceError

__all__ = ["Advertised", "Check", "Finding", "Probe", "Report", "SourceError", "Suite"]
