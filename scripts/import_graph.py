"""quantlab's module import graph, read from the source (no module is imported).

Every ``import`` counts, wherever it sits (top level, inside a function, under ``TYPE_CHECKING``):
an import placed inside a function to dodge a cycle is still a cycle of concepts. A string
constant that names a quantlab module counts too (a registry that imports its members by name
depends on them). ``from quantlab import load`` is an edge to the package ``quantlab`` itself
(its ``__init__``); ``from quantlab.x import y`` is an edge to ``quantlab.x`` only (or to
``quantlab.x.y`` when that is a module): the parent packages Python runs on the way in are not
counted, since no module can avoid them.

    python scripts/import_graph.py            # summary: cycles, cross-folder edges, largest files
    python scripts/import_graph.py --dot F    # Graphviz DOT of the folder-level graph
    python scripts/import_graph.py --png F    # the same drawn with matplotlib (docs/img/)
    python scripts/import_graph.py --json     # everything above, for machines

``quantlab.calib`` lives in ``calib/`` (setup.py's ``package_dir``); it is read from there.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Source folder of each top-level package name.
PACKAGE_DIRS = {"quantlab": ROOT / "quantlab", "quantlab.calib": ROOT / "calib"}


def discover_modules(package_dirs: dict[str, Path] = PACKAGE_DIRS) -> dict[str, Path]:
    """Dotted module name -> source file, for every ``.py`` under the package folders."""
    found: dict[str, Path] = {}
    for package, folder in package_dirs.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def _longest_known(name: str, modules: dict[str, Path]) -> str | None:
    parts = name.split(".")
    while parts and ".".join(parts) not in modules:
        parts.pop()
    return ".".join(parts) if parts else None


def import_edges(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the quantlab modules it imports (statically or by name)."""
    edges: dict[str, set[str]] = defaultdict(set)
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        targets: list[str] = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(up + ([base] if base else []))
                # ``from pkg import sub`` imports the submodule; ``from mod import x``, the module.
                targets += [
                    f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                    for alias in node.names
                ]
            elif (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and "." in node.value  # "quantlab" alone is a name (an op library, a layout)
                and node.value in modules
            ):
                targets.append(node.value)
        for target in targets:
            known = _longest_known(target, modules)
            if known is not None and known != module:
                edges[module].add(known)
    return edges


def defined_names(path: Path) -> set[str]:
    """Names a module's top level binds itself (functions, classes, assignments, also under
    ``if``/``try``), not the names it imports."""
    names: set[str] = set()
    for node in ast.parse(path.read_text(), filename=str(path)).body:
        for sub in ast.walk(node) if isinstance(node, (ast.If, ast.Try)) else [node]:
            if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(sub.name)
            elif isinstance(sub, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                targets = sub.targets if isinstance(sub, ast.Assign) else [sub.target]
                names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    return names


def borrowed_imports(modules: dict[str, Path]) -> list[str]:
    """``from quantlab.x import name`` where ``x`` only re-exports ``name``: quantlab's own
    modules import every name from the module that defines it (re-exports are for users)."""
    defined = {module: defined_names(path) for module, path in modules.items()}
    found = []
    for module, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if not isinstance(node, ast.ImportFrom) or node.level or node.module not in modules:
                continue
            for alias in node.names:
                name = alias.name
                if name not in defined[node.module] and f"{node.module}.{name}" not in modules:
                    found.append(f"{module}:{node.lineno}: {name} from {node.module}")
    return found


def cycles(edges: dict[str, set[str]], nodes: list[str]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in nodes:
        if root in index:
            continue
        work = [(root, iter(sorted(edges.get(root, ()))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return sorted(found)


def folder_of(module: str, packages: set[str]) -> str:
    """The folder a module belongs to: ``quantlab.<sub>`` for the modules of a subpackage (at any
    depth), ``quantlab`` for the files at the package root."""
    parts = module.split(".")
    top = ".".join(parts[:2])
    return top if len(parts) >= 2 and top in packages else parts[0]


def packages_of(modules: dict[str, Path]) -> set[str]:
    return {name for name, path in modules.items() if path.name == "__init__.py"}


def folder_edges(edges: dict[str, set[str]], packages: set[str]) -> Counter[tuple[str, str]]:
    """(importing folder, imported folder) -> number of module-level edges between them."""
    counts: Counter[tuple[str, str]] = Counter()
    for source, targets in edges.items():
        for target in targets:
            a, b = folder_of(source, packages), folder_of(target, packages)
            if a != b:
                counts[(a, b)] += 1
    return counts


def summary(modules: dict[str, Path] | None = None, root: Path = ROOT) -> dict:
    """Counts, cycles, folder edges and the ten largest files (paths relative to ``root``)."""
    modules = modules or discover_modules()
    edges = import_edges(modules)
    folders = folder_edges(edges, packages_of(modules))
    sizes = sorted(
        (
            (len(path.read_text().splitlines()), str(path.relative_to(root)))
            for path in modules.values()
        ),
        reverse=True,
    )
    return {
        "modules": len(modules),
        "edges": sum(len(t) for t in edges.values()),
        "cycles": cycles(edges, sorted(modules)),
        "folder_cycles": folder_cycles(folders),
        "borrowed_imports": borrowed_imports(modules),
        "cross_folder_edges": sum(folders.values()),
        "folder_edges": {f"{a} -> {b}": n for (a, b), n in sorted(folders.items())},
        "largest_files": [{"path": p, "lines": n} for n, p in sizes[:10]],
    }


def write_dot(path: Path, folders: Counter[tuple[str, str]]) -> None:
    lines = ["digraph quantlab {", "  rankdir=TB; node [shape=box, fontname=Helvetica];"]
    lines += [f'  "{a}" -> "{b}" [label="{n}"];' for (a, b), n in sorted(folders.items())]
    path.write_text("\n".join([*lines, "}"]) + "\n")


def folder_cycles(folders: Counter[tuple[str, str]]) -> list[list[str]]:
    """Cycles between folders: two folders importing each other through different modules is
    no module cycle, but the folders then have no order (docs/architecture.md wants one)."""
    nodes = sorted({n for edge in folders for n in edge})
    edges: dict[str, set[str]] = {n: set() for n in nodes}
    for a, b in folders:
        if a != b:
            edges[a].add(b)
    return cycles(edges, nodes)


def layers(folders: Counter[tuple[str, str]]) -> list[list[str]]:
    """Folders in rows, each one row below the lowest folder that imports it, so every arrow
    points down.

    Raises:
        ValueError: the folders import each other in a cycle (:func:`folder_cycles`).
    """
    found = folder_cycles(folders)
    if found:
        raise ValueError("folder cycles: " + "; ".join(" <-> ".join(c) for c in found))
    nodes = sorted({n for edge in folders for n in edge})
    importers = {n: {a for (a, b) in folders if b == n and a != n} for n in nodes}
    depth: dict[str, int] = {}
    while len(depth) < len(nodes):
        for node in [n for n in nodes if n not in depth and importers[n] <= depth.keys()]:
            depth[node] = 1 + max((depth[i] for i in importers[node]), default=-1)
    rows: list[list[str]] = [[] for _ in range(max(depth.values()) + 1)]
    for node in nodes:
        rows[depth[node]].append(node)
    return rows


def write_png(path: Path, folders: Counter[tuple[str, str]]) -> None:
    """Draw the folder graph in layers (matplotlib; arrows labelled with their edge counts)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = layers(folders)
    where: dict[str, tuple[float, float]] = {}
    for r, row in enumerate(rows):
        for c, node in enumerate(row):
            where[node] = ((c + 1) / (len(row) + 1), 1 - (r + 0.5) / len(rows))
    fig, ax = plt.subplots(figsize=(12, 1.4 * len(rows) + 1))
    ax.set_axis_off()
    for (a, b), n in sorted(folders.items()):
        (x0, y0), (x1, y1) = where[a], where[b]
        ax.annotate(
            "",
            xy=(x1, y1),
            xytext=(x0, y0),
            arrowprops={"arrowstyle": "->", "color": "0.55", "shrinkA": 14, "shrinkB": 14},
        )
        ax.text(0.6 * x0 + 0.4 * x1, 0.6 * y0 + 0.4 * y1, str(n), fontsize=7, color="0.3")
    for node, (x, y) in where.items():
        label = node.removeprefix("quantlab.") if node != "quantlab" else "quantlab (root files)"
        ax.text(
            x,
            y,
            label,
            ha="center",
            va="center",
            fontsize=10,
            bbox={"boxstyle": "round", "facecolor": "#e8f0fe", "edgecolor": "#4a6fa5"},
        )
    ax.set_title("quantlab: imports between folders (arrow: importer -> imported; label: edges)")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--dot", type=Path, help="write the folder graph as Graphviz DOT")
    parser.add_argument("--png", type=Path, help="draw the folder graph (needs matplotlib)")
    args = parser.parse_args(argv)
    modules = discover_modules()
    data = summary(modules)
    folders = folder_edges(import_edges(modules), packages_of(modules))
    if args.dot:
        write_dot(args.dot, folders)
    if args.png:
        write_png(args.png, folders)
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    print(
        f"{data['modules']} modules, {data['edges']} import edges, "
        f"{data['cross_folder_edges']} across folders, {len(data['cycles'])} cycles, "
        f"{len(data['folder_cycles'])} folder cycles"
    )
    for component in data["cycles"] + data["folder_cycles"]:
        print("  cycle:", " <-> ".join(component))
    for line in data["borrowed_imports"]:
        print("  borrowed import:", line)
    for edge, n in data["folder_edges"].items():
        print(f"  {edge}: {n}")
    print("largest files:")
    for row in data["largest_files"]:
        print(f"  {row['lines']:5d}  {row['path']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
