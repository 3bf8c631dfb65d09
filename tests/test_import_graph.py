"""The package's import graph: no cycle, and no arrow from the library up into a stage.

Built from the source with ``ast`` (nothing is imported), counting every import, the lazy ones inside
functions too: a cycle through a function-level import is still two modules that each need the other.
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "portraitgen"

# The modules behind a CLI verb that runs a pipeline stage. They may use each other (precompute
# generates images with generate's sampler) and everything below them; nothing below imports them.
STAGES = {"portraitgen.curate", "portraitgen.invert", "portraitgen.precompute", "portraitgen.bench.run",
          "portraitgen.training", "portraitgen.generate", "portraitgen.ablation", "portraitgen.pretrain.stage"}


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the package modules it imports (``from . import x`` counts as importing ``x``)."""
    files = {module_name(f, package): f for f in package.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        here = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names if a.name in files)
            elif isinstance(node, ast.ImportFrom):
                base = (here[:len(here) - node.level + 1] if node.level else [])
                target = ".".join(base + ([node.module] if node.module else []))
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    if sub in files:
                        targets.add(sub)
                    elif target in files:
                        targets.add(target)
        graph[mod] = targets - {mod}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def below(graph: dict[str, set[str]], roots: set[str]) -> set[str]:
    """Every module the ``roots`` depend on, directly or not, other than the roots themselves."""
    seen: set[str] = set()
    todo = [t for r in roots for t in graph.get(r, ())]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(graph.get(m, ()))
    return seen - roots


def test_the_graph_is_read_from_the_source():
    g = import_graph()
    assert "portraitgen.sampling" in g["portraitgen.training"]  # from .sampling import ...
    assert "portraitgen.manifest" in g["portraitgen.curate"]  # from . import ..., manifest, ...
    assert STAGES <= set(g), "a stage module was renamed: update STAGES"


def test_the_package_has_no_import_cycle():
    found = cycles(import_graph())
    assert not found, "import cycles (each group imports itself through the others): " + "; ".join(
        " <-> ".join(c) for c in found)


def test_no_library_module_imports_a_stage():
    g = import_graph()
    library = below(g, STAGES) - STAGES
    upward = sorted(f"{m} -> {t}" for m in library for t in g[m] & STAGES)
    assert not upward, "modules the stages build on import a stage (move the shared code down): " + ", ".join(upward)


def test_the_checks_catch_a_cycle_and_an_upward_import(tmp_path):
    pkg = tmp_path / "portraitgen"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..a import thing\n")  # lazy, still an arrow
    (pkg / "training.py").write_text("from . import lib\n")
    (pkg / "lib.py").write_text("import portraitgen.training\n")
    g = import_graph(pkg)
    assert g["portraitgen.a"] == {"portraitgen.sub.b"} and g["portraitgen.sub.b"] == {"portraitgen.a"}
    assert sorted(cycles(g)) == [["portraitgen.a", "portraitgen.sub.b"], ["portraitgen.lib", "portraitgen.training"]]
    assert below(g, {"portraitgen.training"}) == {"portraitgen.lib"}
