"""gunicorn's own log lines as runnerkit's JSON lines.

With ``RUNNERKIT_LOG_FORMAT=json`` (the default) a runner writes one JSON object per line on
stderr; gunicorn's master and workers would still write their plain lines ("Booting worker",
"Handling signal", "WORKER TIMEOUT") between them, and a log pipeline would have to parse
two formats. :class:`JsonLogger` is gunicorn's logger with runnerkit's formatter on gunicorn's
own handlers: ``logger_class`` of ``deploy/gunicorn.conf.py`` and of new projects. Once the
app is loaded in a worker, its lines carry the runner's name as ``service``
(:func:`runnerkit.logs.configure_logging`).
"""

from __future__ import annotations

import os
from typing import Any

import gunicorn
from gunicorn import glogging

from runnerkit.service.logs import JsonFormatter


class JsonLogger(glogging.Logger):
    """gunicorn's logger, writing JSON lines unless ``RUNNERKIT_LOG_FORMAT`` is ``text``."""

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        if os.environ.get("RUNNERKIT_LOG_FORMAT", "json").strip().lower() != "json":
            return
        formatter = JsonFormatter("gunicorn", gunicorn.__version__)
        for log in (self.error_log, self.access_log):
            for handler in log.handlers:
                if getattr(handler, "_gunicorn", False):
                    handler.setFormatter(formatter)
