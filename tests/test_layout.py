"""The package's plan: layers that import only downwards, no loops, rooms of a readable size.

``docs/ARCHITECTURE.md`` draws the same plan; these tests keep the code and the drawing the
same shape. Each failure names the module and the rule it broke.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

from tests.support.imports import PACKAGE, cycles, graph, modules

ROOT = PACKAGE.parent
MAX_LINES = 500

# Each layer by the prefixes of its modules, lowest first, with the layers it may import.
LAYERS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "bottom": (("runnerkit._version", "runnerkit.contracts", "runnerkit.errors"), ("bottom",)),
    "service": (("runnerkit.service",), ("bottom", "service")),
    "runner": (("runnerkit.runner",), ("bottom", "service", "runner")),
    "forge": (("runnerkit.forge",), ("bottom", "service", "forge")),
    "tools": (
        ("runnerkit.cli", "runnerkit.conformance", "runnerkit.testing"),
        ("bottom", "service", "runner", "forge", "tools"),
    ),
}
# Above every layer: the package's public face and the kept import paths (re-exports only).
TOP = {
    "runnerkit",
    "runnerkit.__main__",
    "runnerkit.affinity",
    "runnerkit.capability",
    "runnerkit.config",
    "runnerkit.gunicorn_logging",
    "runnerkit.gunicorn_settings",
    "runnerkit.gunicorn_worker",
    "runnerkit.lifecycle",
    "runnerkit.sentinel",
    "runnerkit.signing",
}


def layer_of(module: str) -> str:
    if module in TOP:
        return "top"
    for layer, (prefixes, _allowed) in LAYERS.items():
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return layer
    raise AssertionError(f"{module} is in no layer: place it, and say where in ARCHITECTURE.md")


def test_every_module_belongs_to_a_layer() -> None:
    for module in modules():
        layer_of(module)


def test_layers_import_only_downwards() -> None:
    wrong = []
    for module, targets in graph().items():
        layer = layer_of(module)
        if layer == "top":
            continue
        allowed = LAYERS[layer][1]
        for target in sorted(targets):
            other = layer_of(target)
            if other not in allowed:
                wrong.append(f"{module} ({layer}) imports {target} ({other})")
    assert not wrong, "\n".join(wrong)


def test_no_import_loops() -> None:
    assert cycles(graph()) == []


def test_the_loop_finder_finds_a_loop(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg.b import x\n")
    (package / "b.py").write_text("def f():\n    from pkg import a\n")
    (package / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.a import y\n"
    )
    edges = graph(package)
    assert cycles(edges) == [["pkg.a", "pkg.b"]]
    assert edges["pkg.c"] == set()


def test_no_module_over_the_size_limit() -> None:
    too_big = {
        str(path.relative_to(ROOT)): lines
        for path in modules().values()
        if (lines := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert not too_big, f"over {MAX_LINES} lines, split by concern: {too_big}"


def test_nothing_inside_imports_the_kept_paths() -> None:
    edges = graph()
    users = {
        module: sorted(targets & TOP)
        for module, targets in edges.items()
        if module not in TOP and targets & TOP
    }
    assert not users, users


# -- documented names -----------------------------------------------------------------------

DOCUMENTED = [
    ROOT / "README.md",
    *sorted((ROOT / "docs").glob("*.md")),
    *sorted((ROOT / "deploy").glob("*.py")),
    ROOT / "app.py",
    PACKAGE / "cli" / "scaffold.py",
]
_FROM = re.compile(r"from (runnerkit(?:\.\w+)*) import \(?([\w, \n]+?)\)?(?:$|\s*#)", re.M)
_DOTTED = re.compile(r"(?<![\w./-])(runnerkit(?:\.\w+)+)(?::(\w+))?")


def documented_names() -> set[tuple[str, str | None]]:
    """(module, name) pairs a user may have written, read from the docs and generated files."""
    found: set[tuple[str, str | None]] = set()
    for path in DOCUMENTED:
        text = path.read_text(encoding="utf-8")
        for module, names in _FROM.findall(text):
            for item in names.split(","):
                name = item.split()[0] if item.split() else ""
                if name:
                    found.add((module, name))
        for dotted, attr in _DOTTED.findall(text):
            found.add((dotted, attr or None))
    return found


def _resolves(dotted: str, attr: str | None) -> bool:
    module_name, obj = dotted, None
    while module_name:
        try:
            obj = importlib.import_module(module_name)
            break
        except ModuleNotFoundError:
            module_name, _, _tail = module_name.rpartition(".")
    if obj is None:
        return False
    for part in dotted[len(module_name) :].strip(".").split(".") + ([attr] if attr else []):
        if part and not hasattr(obj, part):
            return False
        obj = getattr(obj, part) if part else obj
    return True


# Names in the docs that are not import paths: setting files, logger names, the env file.
NOT_IMPORTS = re.compile(r"^runnerkit\.(env|job|echo)\b")


def test_documented_import_paths_still_import() -> None:
    names = {(d, a) for d, a in documented_names() if not NOT_IMPORTS.match(d)}
    assert len(names) > 20, names  # the scan found the docs' names, not nothing
    broken = sorted(f"{d}{':' + a if a else ''}" for d, a in names if not _resolves(d, a))
    assert not broken, broken


@pytest.mark.parametrize(
    ("path", "names"),
    [
        ("runnerkit", ["Runner", "Capability", "Context", "RunnerError", "build_envelope"]),
        ("runnerkit.runner", ["Runner"]),
        ("runnerkit.capability", ["Capability", "Context", "CapabilityDefinitionError"]),
        ("runnerkit.errors", ["RunnerError", "ValidationFailed", "retry_delay", "should_retry"]),
        ("runnerkit.config", ["SETTINGS", "Settings", "ConfigError", "write_settings_doc"]),
        ("runnerkit.gunicorn_worker", ["ThreadWorker", "fit_threads"]),
        ("runnerkit.gunicorn_logging", ["JsonLogger"]),
        ("runnerkit.lifecycle", ["on_master_exit"]),
        ("runnerkit.affinity", ["pin_worker"]),
        ("runnerkit.signing", ["sign", "verify"]),
        ("runnerkit.testing", ["ContractValidator", "RunnerClient", "JobForgeStub", "documents"]),
        ("runnerkit.forge", ["app", "create_app"]),
        ("runnerkit.forge.settings", ["SETTINGS"]),
        ("runnerkit.contracts.fields", ["StrictString", "StrictInteger", "StrictNumber"]),
    ],
)
def test_kept_import_paths(path: str, names: list[str]) -> None:
    module = importlib.import_module(path)
    missing = [name for name in names if not hasattr(module, name)]
    assert not missing, f"{path} lost {missing}"


# -- the drawing matches the tree -----------------------------------------------------------

ARCHITECTURE = ROOT / "docs" / "ARCHITECTURE.md"


def test_architecture_names_every_module_and_nothing_else() -> None:
    text = ARCHITECTURE.read_text(encoding="utf-8")
    named = set(re.findall(r"`(runnerkit/[\w/]+\.py)`", text))
    actual = {str(p.relative_to(ROOT)) for p in modules().values()}
    assert named, "ARCHITECTURE.md's module table names no files"
    assert sorted(actual - named) == [], "modules ARCHITECTURE.md does not mention"
    assert sorted(named - actual) == [], "ARCHITECTURE.md names files that do not exist"
