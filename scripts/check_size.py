"""Report functions and modules that are too long to read in one sitting.

A function counts from its first decorator to its last line (docstring included); a module counts all its lines.
Exits 1 when anything is over the limits, so it can gate a lint run::

    python scripts/check_size.py src
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path


def long_functions(path: Path, limit: int) -> list[tuple[int, str, int]]:
    """``(line, qualified name, length)`` of every function or method in ``path`` longer than ``limit`` lines."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            name = f"{prefix}{getattr(child, 'name', '')}"
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([child.lineno] + [d.lineno for d in child.decorator_list])
                length = (child.end_lineno or child.lineno) - first + 1
                if length > limit:
                    found.append((child.lineno, name, length))
                visit(child, f"{name}.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{name}.")
            else:
                visit(child, prefix)

    visit(tree, "")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("roots", nargs="*", default=["src"], help="directories (or files) to check")
    parser.add_argument("--max-function", type=int, default=100, help="longest allowed function, in lines")
    parser.add_argument("--max-module", type=int, default=500, help="longest allowed module, in lines")
    parser.add_argument("--exclude", action="append", default=[], help="a file to skip (repeatable)")
    args = parser.parse_args(argv)
    skip = {Path(p).resolve() for p in args.exclude}
    problems = []
    for root in map(Path, args.roots):
        for path in sorted(root.rglob("*.py")) if root.is_dir() else [root]:
            if path.resolve() in skip:
                continue
            lines = len(path.read_text(encoding="utf-8").splitlines())
            if lines > args.max_module:
                problems.append(f"{path}: module of {lines} lines (limit {args.max_module})")
            for line, name, length in long_functions(path, args.max_function):
                problems.append(f"{path}:{line}: {name} is {length} lines (limit {args.max_function})")
    print("\n".join(problems) if problems else "check_size: nothing over the limits")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
