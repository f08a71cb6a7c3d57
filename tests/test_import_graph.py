"""quantlab's import graph has no cycle, and every module imports in a fresh interpreter.

The graph is read from the source by scripts/import_graph.py, counting imports inside functions
and module names held as strings (a registry importing its members by name): an import moved
into a function to dodge a cycle is still a cycle of concepts (docs/architecture.md).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from collections import Counter
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


def test_folders_import_one_way() -> None:
    """docs/architecture.md draws the folders in layers, every arrow pointing down: no two folders
    import each other, even through different modules."""
    graph = _graph_script()
    modules = graph.discover_modules()
    folders = graph.folder_edges(graph.import_edges(modules), graph.packages_of(modules))
    assert ("quantlab.methods", "quantlab.solvers") in folders
    assert graph.folder_cycles(folders) == []
    assert len(graph.layers(folders)) >= 5


def test_folder_cycle_is_found_and_refuses_a_layering() -> None:
    graph = _graph_script()
    folders = Counter({("pkg.a", "pkg.b"): 2, ("pkg.b", "pkg.c"): 1, ("pkg.c", "pkg.a"): 1})
    assert graph.folder_cycles(folders) == [["pkg.a", "pkg.b", "pkg.c"]]
    with pytest.raises(ValueError, match="folder cycles"):
        graph.layers(folders)
    del folders[("pkg.c", "pkg.a")]
    assert graph.layers(folders) == [["pkg.a"], ["pkg.b"], ["pkg.c"]]


def test_integrations_import_only_the_schema_and_the_loader() -> None:
    """The transformers integration goes through export's two public levels, never a layout's
    own module, so a change inside export cannot reach it (issue #20)."""
    graph = _graph_script()
    modules = graph.discover_modules()
    edges = graph.import_edges(modules)
    imported = {
        target
        for source, targets in edges.items()
        if source.startswith("quantlab.integrations")
        for target in targets
        if target.startswith("quantlab.export")
    }
    assert imported == {"quantlab.export.schema", "quantlab.export.load"}


def test_quantlab_imports_every_name_from_its_owner() -> None:
    """A re-export (``quantlab.config``, ``pipeline.QuantizationReport``) is for users; inside
    quantlab each name comes from the module that defines it, so moving a concept moves its
    importers' lines and nothing else (docs/architecture.md, "One owner per concept")."""
    graph = _graph_script()
    assert graph.borrowed_imports(graph.discover_modules()) == []


def test_borrowed_import_is_found(tmp_path: Path) -> None:
    graph = _graph_script()
    _write_package(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/owner.py": "VALUE = 1\n\n\ndef helper():\n    return VALUE\n",
            "pkg/facade.py": "from pkg.owner import VALUE, helper\n",
            "pkg/user.py": "from pkg.facade import VALUE\nfrom pkg.owner import helper\n",
        },
    )
    modules = graph.discover_modules({"pkg": tmp_path / "pkg"})
    assert graph.borrowed_imports(modules) == ["pkg.user:1: VALUE from pkg.facade"]


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
