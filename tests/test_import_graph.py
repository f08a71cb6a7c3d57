"""quantlab's import graph has no cycle, and every module imports in a fresh interpreter.

The graph is read from the source by scripts/import_graph.py, counting imports inside functions
and module names held as strings (a registry importing its members by name): an import moved
into a function to dodge a cycle is still a cycle of concepts (docs/architecture.md).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _graph_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "import_graph", ROOT / "scripts" / "import_graph.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quantlab_import_graph_has_no_cycle() -> None:
    graph = _graph_script()
    modules = graph.discover_modules()
    assert "quantlab.methods.base" in modules and "quantlab.calib.stats" in modules
    found = graph.cycles(graph.import_edges(modules), sorted(modules))
    assert found == [], "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def _write_package(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


@pytest.mark.parametrize(
    ("b_source", "cycle"),
    [
        ("import os\n", []),
        ("def f():\n    from pkg.a import x\n", [["pkg.a", "pkg.sub.b"]]),
        ("_BUILTIN = ('pkg.a',)\n", [["pkg.a", "pkg.sub.b"]]),
        ("from pkg import a\n", [["pkg.a", "pkg.sub.b"]]),
        ("from pkg import name_in_init\n", [["pkg", "pkg.sub.b"]]),
        ("from .. import a\n", [["pkg.a", "pkg.sub.b"]]),
    ],
    ids=["none", "function-level", "registry-string", "from-package", "package-init", "relative"],
)
def test_graph_finds_every_kind_of_cycle(tmp_path: Path, b_source: str, cycle: list) -> None:
    """The checker sees cycles hidden in functions, registries and package __init__ files."""
    graph = _graph_script()
    _write_package(
        tmp_path,
        {
            "pkg/__init__.py": "def name_in_init():\n    from pkg.sub import b\n",
            "pkg/a.py": "from pkg.sub.b import y\n\nx = 1\n",
            "pkg/sub/__init__.py": "",
            "pkg/sub/b.py": b_source + "y = 2\n",
        },
    )
    modules = graph.discover_modules({"pkg": tmp_path / "pkg"})
    assert sorted(modules) == ["pkg", "pkg.a", "pkg.sub", "pkg.sub.b"]
    assert graph.cycles(graph.import_edges(modules), sorted(modules)) == cycle


def test_every_module_imports_in_a_fresh_interpreter() -> None:
    modules = sorted(_graph_script().discover_modules())
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "print(len(sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr[-3000:]
