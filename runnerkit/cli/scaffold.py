"""``runnerkit new``: a ready runner project whose own ``make test`` passes straight away."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from string import Template

from runnerkit._version import __version__

_SLUG_RE = re.compile(r"^[a-z][a-z0-9-]*$")

TEMPLATES: dict[str, str] = {
    "setup.cfg": """\
[metadata]
name = $name
version = 0.1.0
description = A ControlPlane runner built with runnerkit

[options]
py_modules = app
python_requires = >=3.11
install_requires =
    $runnerkit_spec

[options.extras_require]
dev =
    pytest>=8,<10
""",
    "pyproject.toml": """\
[build-system]
requires = ["setuptools>=68", "wheel"]
build-backend = "setuptools.build_meta"

[tool.pytest.ini_options]
testpaths = ["tests"]
pythonpath = ["."]
""",
    "app.py": '''\
"""$name: a ControlPlane runner. Serve it with `gunicorn app:app` (or `make run`)."""

from __future__ import annotations

from typing import Any

from marshmallow import Schema, fields, validate

from runnerkit import Capability, Context, Runner
from runnerkit.contracts import fields as strict


class Greet(Capability):
    """Greets someone, in one of a few languages."""

    id = "greet"
    version = "1.0.0"
    job_types = ["$name.greet"]
    max_concurrency = 4
    timeout_ms = 5_000
    examples = [{"input": {"name": "Ada"}, "output": {"greeting": "Hello, Ada!"}}]

    GREETINGS = {"en": "Hello", "fr": "Bonjour", "de": "Hallo"}

    class Input(Schema):
        name = strict.StrictString(required=True, validate=validate.Length(min=1, max=200))
        language = strict.StrictString(
            load_default="en", validate=validate.OneOf(["en", "fr", "de"])
        )

    class Output(Schema):
        greeting = fields.String(required=True)

    def run(self, payload: dict[str, Any], ctx: Context) -> dict[str, Any]:
        ctx.progress(100, "greeted")
        return {"greeting": f"{self.GREETINGS[payload['language']]}, {payload['name']}!"}


runner = Runner("$name", version="0.1.0", capabilities=[Greet()])
app = runner.create_app()
''',
    "tests/test_app.py": '''\
"""Contract tests for $name, with runnerkit's test kit (its pytest fixtures load by themselves)."""

from __future__ import annotations

from pathlib import Path

import pytest
from flask import Flask

from app import runner
from runnerkit.testing import ContractValidator, RunnerClient


@pytest.fixture
def runner_app(tmp_path: Path) -> Flask:
    return runner.create_app({"RUNNERKIT_STATE_DIR": str(tmp_path)})


def test_greets(runner_client: RunnerClient, contract_validator: ContractValidator) -> None:
    response = runner_client.execute("greet", {"name": "Ada", "language": "fr"})
    assert response.status_code == 200
    assert response.get_json()["data"] == {"greeting": "Bonjour, Ada!"}
    assert contract_validator.validate("RunnerExecutionResponse", response.get_json()).valid


def test_bad_input_is_a_validation_error(runner_client: RunnerClient) -> None:
    response = runner_client.execute("greet", {"name": 42})
    assert response.status_code == 400
    error = response.get_json()["error"]
    assert error["category"] == "VALIDATION_ERROR"
    assert error["details"][0]["path"] == ["payload", "name"]


def test_registration_document_is_valid(
    runner_client: RunnerClient, contract_validator: ContractValidator
) -> None:
    document = runner_client.get("/capabilities").get_json()
    assert contract_validator.validate("RunnerRegistrationRequest", document).valid
''',
    "Makefile": """\
PYTHON ?= $$(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $$(VENV)/bin
STAMP := $$(VENV)/.installed
PORT ?= 3000
FORGE_PORT ?= 3002

.PHONY: run test docker

$$(STAMP): setup.cfg pyproject.toml
\ttest -x $$(BIN)/python || $$(PYTHON) -m venv $$(VENV)
$make_vendor\t$$(BIN)/python -m pip install --quiet -e '.[dev]'
\ttouch $$(STAMP)

run: $$(STAMP)
\t$$(BIN)/runnerkit up app:app --runner-port $$(PORT) --forge-port $$(FORGE_PORT)

test: $$(STAMP)
\t$$(BIN)/runnerkit validate app:app
\t$$(BIN)/pytest -q

docker:
\tdocker build -f deploy/Dockerfile -t $name .
""",
    "gunicorn.conf.py": '''\
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
''',
    "deploy/gunicorn.conf.py": '''\
"""gunicorn settings: gthread workers, a timeout above the largest capability timeout."""

import os

bind = f"{os.environ.get('BIND_HOST', '127.0.0.1')}:{os.environ.get('PORT', '3000')}"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
worker_class = "runnerkit.gunicorn_worker.ThreadWorker"  # gthread, JSON error pages
logger_class = "runnerkit.gunicorn_logging.JsonLogger"  # gunicorn's own lines as JSON too
threads = int(os.environ.get("GUNICORN_THREADS", "8"))
timeout = int(os.environ.get("GUNICORN_TIMEOUT", "120"))
graceful_timeout = int(os.environ.get("GUNICORN_GRACEFUL_TIMEOUT", "60"))
# No control socket at ~/.gunicorn/gunicorn.ctl (gunicorn 25.1+; older ones ignore this).
control_socket_disable = True


def post_fork(server, worker):
    os.environ["RUNNERKIT_WORKER_THREADS"] = str(worker.cfg.threads)


def on_exit(server):
    from runnerkit.lifecycle import on_master_exit

    on_master_exit()
''',
    "deploy/Dockerfile": """\
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 BIND_HOST=0.0.0.0 PORT=3000 \\
    RUNNERKIT_STATE_DIR=/var/lib/runnerkit
RUN groupadd --system --gid 10001 runner \\
    && useradd --system --uid 10001 --gid runner --home-dir /app runner \\
    && mkdir -p /var/lib/runnerkit && chown runner:runner /var/lib/runnerkit
WORKDIR /app
${docker_vendor}COPY setup.cfg pyproject.toml app.py ./
RUN pip install .
COPY deploy/gunicorn.conf.py deploy/gunicorn.conf.py
USER 10001:10001
EXPOSE 3000
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \\
    CMD ["python", "-c", "import os, sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:%s/health/live' % os.environ.get('PORT', '3000'), timeout=2).status == 200 else 1)"]
CMD ["gunicorn", "-c", "deploy/gunicorn.conf.py", "app:app"]
""",
    "deploy/docker-compose.yml": """\
services:
  forge:
    image: $name
    build: {context: .., dockerfile: deploy/Dockerfile}
    command: ["runnerkit", "forge", "--host", "0.0.0.0", "--port", "3002"]
    restart: unless-stopped
    environment: {RUNNERKIT_FORGE_DB_PATH: /var/lib/runnerkit/forge.sqlite3}
    env_file: runnerkit.env
    healthcheck:
      test: ["CMD", "python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:3002/health', timeout=2)"]
      interval: 10s
  runner:
    image: $name
    restart: unless-stopped
    environment:
      RUNNERKIT_JOBFORGE_URL: "http://forge:3002"
      RUNNERKIT_HOST: runner
      RUNNERKIT_ENVIRONMENT: production
    env_file: runnerkit.env
    ports: ["3000:3000"]
    depends_on: {forge: {condition: service_healthy}}
    # Above gunicorn's graceful timeout (60 s), so jobs in flight finish and it deregisters.
    stop_grace_period: 70s
""",
    "deploy/runnerkit.env.example": """\
# Copy to runnerkit.env and replace every change-me value (a placeholder refuses to start).
RUNNERKIT_SIGNING_SECRET=change-me-to-a-long-random-string
# The forge's token: every forge route but /health needs it; the runner registers with it.
# The forge refuses to listen beyond loopback without one.
RUNNERKIT_FORGE_TOKEN=change-me-to-another-long-random-string
RUNNERKIT_RUNNER_TOKEN=change-me-to-another-long-random-string
""",
    "deploy/sample-jobs.json": """\
[
  {"type": "$name.greet", "data": {"name": "Ada", "language": "fr"}},
  {"type": "$name.greet", "data": {"name": 42}, "expect": "failed", "note": "fails validation: name must be a string"}
]
""",
    ".gitignore": ".venv/\n__pycache__/\n*.egg-info/\nvar/\ndeploy/runnerkit.env\n",
    "README.md": """\
# $name

A ControlPlane runner built with runnerkit $version.

```sh
make run     # the runner beside a local control plane, with sample jobs
make test    # contract check (runnerkit validate) and the tests
```

Add capabilities in `app.py`: subclass `Capability`, declare `Input`/`Output` schemas, implement
`run(payload, ctx)`, add it to the `Runner`; `make run` submits `deploy/sample-jobs.json`. Ship
with `make docker`; for `docker compose -f deploy/docker-compose.yml up`, first copy
`deploy/runnerkit.env.example` to `deploy/runnerkit.env` and set a real secret. When `vendor/`
holds a runnerkit wheel, the Makefile and the Dockerfile install runnerkit from it: keep it with
the project (or replace the pin in `setup.cfg` with a published runnerkit and delete it).
""",
}


def checkout_root() -> Path | None:
    """The runnerkit checkout this module runs from, or None when it is installed."""
    root = Path(__file__).resolve().parents[2]  # <root>/runnerkit/cli/scaffold.py
    if (root / "setup.cfg").exists() and (root / "runnerkit" / "__init__.py").exists():
        return root
    return None


def vendor_wheel(directory: Path) -> Path | None:
    """A wheel of the running runnerkit in ``directory/vendor``, when it runs from a checkout.

    A project that depended on the checkout itself (a ``file:`` URL) could not be built into
    an image: ``docker build`` cannot see the path. The wheel travels with the project, so
    neither its image nor its virtualenv need a package index for runnerkit itself.
    """
    root = checkout_root()
    if root is None:
        return None
    vendor = directory / "vendor"
    vendor.mkdir(parents=True, exist_ok=True)
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "-w",
            str(vendor),
            str(root),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    wheels = sorted(vendor.glob(f"runnerkit-{__version__}-*.whl"))
    if built.returncode != 0 or not wheels:
        raise RuntimeError(
            "could not build a wheel of this runnerkit checkout for the project "
            f"(pip wheel: {(built.stderr or built.stdout).strip()[-300:]}); "
            "pass --runnerkit-spec to depend on a published runnerkit instead"
        )
    return wheels[-1]


def create_project(name: str, directory: Path, runnerkit_spec: str | None = None) -> list[Path]:
    """Write the project; refuses an existing non-empty directory. Returns the files written.

    Without ``runnerkit_spec`` the project depends on this very runnerkit: run from a checkout,
    a wheel of it is placed in ``vendor/`` and installed from there by the Makefile and the
    Dockerfile; installed, the project pins the installed release.
    """
    if not _SLUG_RE.match(name):
        raise ValueError(
            f"{name!r}: use lower-case letters, digits and '-', starting with a letter"
        )
    if directory.exists() and any(directory.iterdir()):
        raise FileExistsError(f"{directory} exists and is not empty; choose another --dir")
    wheel = None if runnerkit_spec else vendor_wheel(directory)
    make_vendor = docker_vendor = ""
    if wheel is not None:
        relative = f"vendor/{wheel.name}"
        make_vendor = f"\t$(BIN)/python -m pip install --quiet {relative}\n"
        docker_vendor = f"COPY {relative} {relative}\nRUN pip install {relative}\n"
    values = {
        "name": name,
        "version": __version__,
        "runnerkit_spec": runnerkit_spec or f"runnerkit=={__version__}",
        "make_vendor": make_vendor,
        "docker_vendor": docker_vendor,
    }
    written = [wheel] if wheel is not None else []
    for relative, template in TEMPLATES.items():
        path = directory / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(Template(template).substitute(values))
        written.append(path)
    return written
