"""Check the package's import structure: no import cycles (function-local imports included), and function-local
imports only of the optional heavy dependencies.

Every ``import``/``from … import`` inside ``src/onlynorm`` is resolved to the package module it names; the graph
of module → imported module must be acyclic. An import inside a function is allowed only for a module listed in
``LAZY`` (optional extras that are slow to import or may be missing). Exits 1 with one line per finding::

    python scripts/check_imports.py src/onlynorm
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

#: top-level packages a function may import lazily (optional extras / slow imports kept off the start-up path)
LAZY = {"onnx", "onnxruntime", "dask", "distributed", "joblib._dask", "matplotlib", "threadpoolctl"}


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def resolve(current: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = current.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(root: Path, path: Path, modules: set[str]) -> list[tuple[str, int, bool]]:
    """``(imported package module, line, inside a function)`` for every import of ``path``."""
    current = module_name(root, path)
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            local = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    found.append((alias.name, child.lineno, in_function))
            elif isinstance(child, ast.ImportFrom):
                target = resolve(current, path.name == "__init__.py", child)
                for alias in child.names:  # `from . import x` may import the submodule x
                    sub = f"{target}.{alias.name}"
                    found.append((sub if sub in modules else target, child.lineno, in_function))
            elif isinstance(child, ast.If) and _is_type_checking(child):
                continue  # imports for annotations only are never executed
            visit(child, local)

    visit(tree, False)
    return found


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("package", nargs="?", default="src/onlynorm")
    args = parser.parse_args(argv)
    root = Path(args.package)
    files = sorted(root.rglob("*.py"))
    modules = {module_name(root, p) for p in files}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    problems = []
    for path in files:
        me = module_name(root, path)
        for target, line, local in imports(root, path, modules):
            if local and not any(target == m or target.startswith(m + ".") for m in LAZY):
                problems.append(f"{path}:{line}: function-local import of {target} (only optional extras may be lazy)")
            # a package's __init__ importing its own submodules is how a package is built, not a cycle
            if target in modules and target != me and not (path.name == "__init__.py" and target.startswith(me + ".")):
                graph[me].add(target)
    for component in cycles(graph):
        problems.append(f"import cycle among {', '.join(component)}")
    for line in problems:
        print(line)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
