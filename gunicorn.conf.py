"""gunicorn reads ``./gunicorn.conf.py`` when it is given no ``-c``: so plain ``gunicorn
app:app`` in this directory serves with ``deploy/gunicorn.conf.py`` (runnerkit's gthread worker
class, a timeout above the capabilities', threads kept for ``/health``, JSON logs, the
deregistration hook) instead of gunicorn's sync worker, which would kill a long job at 30 s.
"""

import os
import runpy

_DEPLOY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "deploy", "gunicorn.conf.py")
globals().update(
    (name, value) for name, value in runpy.run_path(_DEPLOY).items() if not name.startswith("__")
)
