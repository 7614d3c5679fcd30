"""The import structure of ``src/vlmprune``: no import cycles, no import of a layer above.

The layers, lowest first (a module may import its own layer and the layers below it, never one
above):

0. ``methods``: pure-tensor pruning / merging maths (no model family, no transformers);
1. ``registry``: the names of the methods and the dotted paths of their builders;
2. ``integrations``: one adapter per model family, the pruning stages, ``compat``;
3. ``vlmprune`` (the package root), ``api``, ``runinfo``, ``plotting``, ``clitools`` (the commands'
   shared error exit and notices): the public entry points, and what
   the tools' outputs share (the run record, figure files);
4. ``testbed``: ShapesVQA, the testbed model, its prompt and training recipe;
5. ``eval``, ``cost``, ``train``, ``bench``, ``viz``, ``demo``: tools built on the layers below;
6. ``cli``: the command line, which mounts them all.

Imports are read from the source with ``ast`` (nothing is imported). Three rules:

* no cycle among modules through module-level imports (the ones that run at import time);
* no cycle among the top-level packages above through any import, function-level included
  (a lazy import still ties two packages together);
* no import, at any level, of a package in a higher layer.

Function-level imports between two modules of one package may form a cycle (that is the usual
way to defer an import); they are not checked.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

LAYERS = [
    ("methods",),
    ("registry",),
    ("integrations",),
    ("vlmprune", "api", "runinfo", "plotting", "clitools"),
    ("testbed",),
    ("eval", "cost", "train", "bench", "viz", "demo"),
    ("cli",),
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}


def _modules(src: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file under ``src/vlmprune``."""
    out = {}
    for f in sorted((src / "vlmprune").rglob("*.py")):
        parts = f.relative_to(src).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def import_graph(src: Path = SRC) -> dict[str, dict[str, bool]]:
    """module -> {imported vlmprune module -> True if imported at module level}.

    ``from package import name`` counts as importing ``package.name`` when that is a module,
    else ``package``; relative imports are resolved against the importing module's package.
    """
    modules = _modules(src)
    graph: dict[str, dict[str, bool]] = {}
    for mod, path in modules.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        tree = ast.parse(path.read_text(), str(path))
        top_level = {id(node) for node in tree.body}
        for node in tree.body:  # imports under a module-level if / try still run at import time
            if isinstance(node, (ast.If, ast.Try)):
                top_level |= {id(n) for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))}
        edges: dict[str, bool] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            for target in targets:
                if target in modules and target != mod:
                    edges[target] = edges.get(target, False) or id(node) in top_level
        graph[mod] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (each holds a cycle), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

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
    return sorted(found)


def top_package(module: str) -> str:
    """``vlmprune.testbed.recipe.loop`` -> ``testbed``; the package root itself -> ``vlmprune``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def package_graph(graph: dict[str, dict[str, bool]]) -> dict[str, set[str]]:
    """top-level package -> the other top-level packages it imports (any level)."""
    out: dict[str, set[str]] = {}
    for mod, edges in graph.items():
        src = top_package(mod)
        out.setdefault(src, set()).update(top_package(t) for t in edges if top_package(t) != src)
    return out


def upward_imports(graph: dict[str, dict[str, bool]]) -> list[str]:
    """``"a.b -> c.d"`` for every import of a package in a higher layer than the importer's."""
    return sorted(f"{mod} -> {target}" for mod, edges in graph.items() for target in edges
                  if LAYER[top_package(target)] > LAYER[top_package(mod)])


# ---------------------------------------------------------------- the rules, on the real source


def test_every_top_level_package_has_a_layer():
    unknown = sorted({top_package(m) for m in _modules(SRC)} - set(LAYER))
    assert not unknown, f"add {unknown} to LAYERS in tests/test_imports.py (and to its docstring)"


def test_no_module_level_import_cycle():
    graph = import_graph()
    assert cycles({m: {t for t, top in e.items() if top} for m, e in graph.items()}) == []


def test_no_import_cycle_between_packages():
    assert cycles(package_graph(import_graph())) == []


def test_no_import_of_a_higher_layer():
    assert upward_imports(import_graph()) == []


# ---------------------------------------------------------------- the checker, on hand-made trees


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / "vlmprune" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


def test_checker_resolves_relative_imports_and_levels(tmp_path):
    src = _tree(tmp_path, {
        "__init__.py": "from .api import apply\n",
        "api.py": "from . import registry\n\ndef apply():\n    from .integrations import base\n",
        "registry.py": "",
        "integrations/__init__.py": "",
        "integrations/base.py": ("from ..methods.common import x\n"
                                 "try:\n    from . import extra\nexcept ImportError:\n    pass\n"),
        "integrations/extra.py": "",
        "methods/__init__.py": "",
        "methods/common.py": "import vlmprune.registry\n",
    })
    graph = import_graph(src)
    assert graph["vlmprune"] == {"vlmprune.api": True}
    assert graph["vlmprune.api"] == {"vlmprune.registry": True, "vlmprune.integrations.base": False}
    assert graph["vlmprune.integrations.base"] == {"vlmprune.methods.common": True,
                                                   "vlmprune.integrations.extra": True}
    assert graph["vlmprune.methods.common"] == {"vlmprune.registry": True}
    # methods (layer 0) importing the registry (layer 1) is the one upward import here
    assert upward_imports(graph) == ["vlmprune.methods.common -> vlmprune.registry"]


def test_checker_finds_cycles(tmp_path):
    src = _tree(tmp_path, {
        "__init__.py": "",
        "testbed/__init__.py": "",
        "testbed/check.py": "def f():\n    from ..eval import harness\n",  # function level
        "eval/__init__.py": "",
        "eval/harness.py": "from ..testbed import check\n",
        "eval/data.py": "from .report import r\n",
        "eval/report.py": "from .data import d\n",  # module-level cycle inside eval
    })
    graph = import_graph(src)
    top = {m: {t for t, at_top in e.items() if at_top} for m, e in graph.items()}
    assert cycles(top) == [["vlmprune.eval.data", "vlmprune.eval.report"]]
    assert cycles(package_graph(graph)) == [["eval", "testbed"]]
    assert upward_imports(graph) == ["vlmprune.testbed.check -> vlmprune.eval.harness"]
