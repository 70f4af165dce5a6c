"""The import graph of fastvit's own modules has no cycle, function-local imports included.

Static: every .py of the installed packages (fastvit/, kernels/ as fastvit.kernels, csrc/ as its
package) is parsed with ``ast``; nothing is imported. A cycle closed only by a function-local
import still couples the modules both ways (and fails when the import runs while one of them is
half-initialised), so those imports count too, as do ``importlib.import_module`` calls: with a
literal name, that module; with a computed one, every module named by a string literal of the
calling file (a backend table such as ``{"triton": "fastvit.kernels"}``).
"""

from __future__ import annotations

import ast
import os
from collections import deque
from typing import Dict, List, Optional, Set, Tuple

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# package -> source folder, as installed (pyproject's package-dir adds to or overrides these)
_PACKAGE_DIRS = {"fastvit": "fastvit", "fastvit.kernels": "kernels", "fastvit.cuda": "csrc"}
# the loading code that the preset table must not reach, even through other modules
_LOADING = {"fastvit.factory", "fastvit.checkpoint", "fastvit.hub", "fastvit.convert"}

Modules = Dict[str, Tuple[str, bool]]  # module name -> (file, is a package __init__)
Graph = Dict[str, Dict[str, int]]  # module -> {imported module: line of the first such import}


def _package_dirs(root: str) -> Dict[str, str]:
    dirs = dict(_PACKAGE_DIRS)
    try:
        import tomllib

        with open(os.path.join(root, "pyproject.toml"), "rb") as f:
            dirs.update(tomllib.load(f).get("tool", {}).get("setuptools", {}).get("package-dir", {}))
    except (ImportError, OSError, ValueError):  # Python < 3.11 or no pyproject: the defaults above
        pass
    return dirs


def _modules(root: str, package_dirs: Dict[str, str]) -> Modules:
    """Every .py under the package folders, by the module name it is installed as."""
    mods: Modules = {}
    for pkg, folder in package_dirs.items():
        base = os.path.join(root, folder)
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__" and not d.startswith("."))
            rel = os.path.relpath(dirpath, base)
            prefix = pkg if rel == "." else pkg + "." + rel.replace(os.sep, ".")
            for fn in sorted(f for f in filenames if f.endswith(".py")):
                name = prefix if fn == "__init__.py" else f"{prefix}.{fn[:-3]}"
                mods[name] = (os.path.join(dirpath, fn), fn == "__init__.py")
    return mods


def _resolve(module: str, is_package: bool, level: int, name: Optional[str]) -> str:
    """Absolute name of an import made in ``module`` (``level`` leading dots, 0 for absolute)."""
    if not level:
        return name or ""
    parts = module.split(".") if is_package else module.split(".")[:-1]
    parts = parts[: len(parts) - (level - 1)]
    return ".".join(parts + ([name] if name else []))


def _is_import_module(node: ast.AST) -> bool:
    if not isinstance(node, ast.Call):
        return False
    func = node.func
    return (func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)) == "import_module"


def _imports(module: str, mods: Modules) -> Dict[str, int]:
    """{module of ours imported by ``module``: line}, from imports at any depth of its file."""
    path, is_package = mods[module]
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=path)
    found: List[Tuple[str, int]] = []
    dynamic = False
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, is_package, node.level, node.module)
            # ``from pkg import name`` imports the submodule pkg.name when there is one, else reads pkg
            found += [(f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base, node.lineno) for a in node.names]
        elif _is_import_module(node):
            arg = node.args[0] if node.args else None
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                level = len(arg.value) - len(arg.value.lstrip("."))
                found.append((_resolve(module, is_package, level, arg.value.lstrip(".") or None), node.lineno))
            else:
                dynamic = True
    if dynamic:  # a computed name: the module names this file spells out are what it can import
        found += [(n.value, n.lineno) for n in ast.walk(tree) if isinstance(n, ast.Constant) and n.value in mods]
    out: Dict[str, int] = {}
    for target, line in sorted(found, key=lambda t: t[1]):
        if target in mods and target != module:  # third-party modules are not our graph
            out.setdefault(target, line)
    return out


def _graph(root: str = ROOT, package_dirs: Optional[Dict[str, str]] = None) -> Tuple[Graph, Modules]:
    mods = _modules(root, package_dirs if package_dirs is not None else _package_dirs(root))
    return {m: _imports(m, mods) for m in mods}, mods


def _components(graph: Graph) -> List[Set[str]]:
    """Strongly connected components of more than one module (Tarjan): each holds a cycle."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    out: List[Set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _cycle_through(start: str, graph: Graph) -> Optional[List[str]]:
    """A shortest import cycle ``[start, ..., start]``, or None (breadth-first search)."""
    prev: Dict[str, str] = {}
    queue = deque([start])
    while queue:
        v = queue.popleft()
        if start in graph[v]:
            path = [v]
            while path[-1] != start:
                path.append(prev[path[-1]])
            return path[::-1] + [start]
        for w in sorted(graph[v]):
            if w not in prev and w != start:
                prev[w] = v
                queue.append(w)
    return None


def _cycles(graph: Graph) -> List[List[str]]:
    """Shortest cycles through each module that is in one, each cycle once (from its first module)."""
    out: List[List[str]] = []
    for comp in _components(graph):
        for start in sorted(comp):
            cycle = _cycle_through(start, graph)[:-1]
            first = cycle.index(min(cycle))
            cycle = cycle[first:] + cycle[:first]
            if cycle + [cycle[0]] not in out:
                out.append(cycle + [cycle[0]])
    return out


def _describe(cycle: List[str], graph: Graph, mods: Modules, root: str = ROOT) -> str:
    """``a (fastvit/a.py:12) -> b (kernels/b.py:3) -> a``: each step names the importing line."""
    steps = [f"{a} ({os.path.relpath(mods[a][0], root)}:{graph[a][b]})" for a, b in zip(cycle, cycle[1:])]
    return " -> ".join(steps + [cycle[-1]])


def test_checker_sees_every_kind_of_import(tmp_path):
    """The checker on a made-up package: each kind of import closes its own cycle."""
    files = {
        "pkg/__init__.py": "from .a import f\n",
        "pkg/a.py": "def f():\n    from . import b  # function-local, a module\n",
        "pkg/b.py": "from .c import g\n",
        "pkg/c.py": "import importlib\n\ndef g():\n    return importlib.import_module('pkg.a')\n",
        "pkg/d.py": "from pkg import f  # a name of the package: an edge to pkg itself\n",
        "pkg/e.py": "import importlib\n_TABLE = {'x': 'pkg.sub.m'}\n\n"
                    "def load(k):\n    importlib.import_module(_TABLE[k])\n",
        "src/sub/__init__.py": "",
        "src/sub/m.py": "def h():\n    from .. import e\n",
        "pkg/ok.py": "import os\nfrom typing import List\nfrom .a import f\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    graph, mods = _graph(str(tmp_path), {"pkg": "pkg", "pkg.sub": "src/sub"})
    assert graph["pkg"] == {"pkg.a": 1} and graph["pkg.d"] == {"pkg": 1} and graph["pkg.ok"] == {"pkg.a": 3}
    found = sorted(_cycles(graph))
    assert found == [["pkg.a", "pkg.b", "pkg.c", "pkg.a"], ["pkg.e", "pkg.sub.m", "pkg.e"]], found
    text = _describe(found[1], graph, mods, str(tmp_path))
    assert text == "pkg.e (pkg/e.py:2) -> pkg.sub.m (src/sub/m.py:2) -> pkg.e", text
    assert _cycle_through("pkg.ok", graph) is None


def test_no_import_cycles():
    graph, mods = _graph()
    found = _cycles(graph)
    assert not found, "import cycles among fastvit modules:\n  " + "\n  ".join(_describe(c, graph, mods) for c in found)


@pytest.mark.parametrize("module", ["fastvit.registry", "fastvit.checkpoint", "fastvit.convert", "fastvit.hub",
                                    "fastvit.factory", "fastvit.version", "fastvit.cli"])
def test_loading_modules_are_in_no_cycle(module):
    """The checkpoint / preset / CLI modules stay acyclic whatever the rest of the graph does."""
    graph, mods = _graph()
    cycle = _cycle_through(module, graph)
    assert cycle is None, f"{module} is in an import cycle: {_describe(cycle, graph, mods)}"


def test_registry_reaches_no_loading_code():
    """The preset table is data: nothing it imports, directly or not, loads checkpoints."""
    graph, _ = _graph()
    seen, todo = set(), ["fastvit.registry"]
    while todo:
        for w in set(graph[todo.pop()]) - seen:
            seen.add(w)
            todo.append(w)
    assert not seen & _LOADING, f"fastvit.registry reaches {sorted(seen & _LOADING)}"


def test_no_submodule_imports_the_package():
    """``fastvit/__init__`` imports the submodules, so a submodule importing it (``from . import
    __version__``, ``import fastvit``) closes a cycle through every re-export."""
    graph, mods = _graph()
    bad = [f"{m} ({os.path.relpath(mods[m][0], ROOT)}:{graph[m]['fastvit']})"
           for m in sorted(graph) if m != "fastvit" and "fastvit" in graph[m]]
    assert not bad, f"modules importing the fastvit package itself: {bad}"
