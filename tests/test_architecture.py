"""The package's layering, checked from every import statement (inside functions too).

Layers, lowest first: common, space, nets, engine, search, store, commands,
then the top-level modules (cli, the public API, ``__main__``).  A module may
import its own layer or a lower one, never a higher one, and no set of
modules may import each other in a circle.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ("common", "space", "nets", "engine", "search", "store", "commands")
TOP = len(LAYERS)  # nero_deap/__init__.py, __main__.py, cli.py


def module_name(path: Path, package_root: Path) -> str:
    parts = list(path.relative_to(package_root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph(package_root: Path) -> dict:
    """``{module: {imported module of the same package, ...}}`` from every import statement."""
    files = {module_name(p, package_root): p for p in package_root.rglob("*.py")}
    package = package_root.name
    graph = {}
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        here = name.split(".") if is_package else name.split(".")[:-1]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = here[:len(here) - (node.level - 1)]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                # ``from pkg import module`` imports that module; ``from module import name`` the module
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base for alias in node.names]
            else:
                continue
            edges.update(t for t in targets if t == package or t.startswith(package + "."))
        edges.discard(name)
        graph[name] = edges
    return graph


def layer_of(module: str) -> int:
    parts = module.split(".")
    if len(parts) > 2 or (len(parts) == 2 and parts[1] in LAYERS):
        return LAYERS.index(parts[1]) if parts[1] in LAYERS else -1
    return TOP


def upward_imports(graph: dict) -> list:
    return sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets if layer_of(b) > layer_of(a))


def circles(graph: dict) -> list:
    """The modules of one import circle, sorted, if there is any (graphlib finds one at a time); else []."""
    try:
        TopologicalSorter(graph).prepare()
    except CycleError as exc:
        return [sorted(set(exc.args[1]))]
    return []


def test_every_module_sits_in_a_known_layer():
    graph = import_graph(ROOT / "nero_deap")
    assert not [m for m in graph if layer_of(m) < 0], "a sub-package that is not in LAYERS"
    assert {m.split(".")[1] for m in graph if m.count(".") >= 1} >= set(LAYERS)


def test_no_import_circles_and_no_upward_imports():
    graph = import_graph(ROOT / "nero_deap")
    assert len(graph) > 30  # the checker really read the package
    assert sum(map(len, graph.values())) > 60
    assert circles(graph) == []
    assert upward_imports(graph) == []


def test_the_checks_catch_a_circle_and_an_upward_import(tmp_path):
    """The two checks on a package built to break both rules, with the imports hidden inside functions."""
    pkg = tmp_path / "nero_deap"
    for sub in ("space", "search"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "space" / "a.py").write_text("def f():\n    from ..search import c\n")
    (pkg / "space" / "b.py").write_text("from . import a\n")
    (pkg / "search" / "c.py").write_text("def g():\n    from nero_deap.space.b import x\n")
    graph = import_graph(pkg)
    assert graph["nero_deap.space.a"] == {"nero_deap.search.c"}
    assert upward_imports(graph) == ["nero_deap.space.a -> nero_deap.search.c"]
    assert circles(graph) == [["nero_deap.search.c", "nero_deap.space.a", "nero_deap.space.b"]]


def test_only_the_cli_module_knows_argparse():
    users = [str(p.relative_to(ROOT)) for p in (ROOT / "nero_deap").rglob("*.py") if "argparse" in p.read_text()]
    assert users == ["nero_deap/cli.py"]


def test_importing_the_command_line_stays_cheap():
    """SCOOP imports run.py in every worker: the command line and the DEAP classes load without torch."""
    code = "import sys, run; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("name", ["load_model", "RunConfig", "run_search", "FinalSettings", "run_final",
                                  "ReportSettings", "run_report", "load_run"])
def test_the_public_api_resolves(name):
    import nero_deap

    assert callable(getattr(nero_deap, name))
