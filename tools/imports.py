"""The package's import graph (top-level and function-level imports), its cycles, and which modules
import torch or ray (directly or through the package): ``python tools/imports.py``."""
from __future__ import annotations

import ast
import pathlib
import sys

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "orchestrator"


def graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """Module -> package modules it imports, and module -> third-party heavy imports (torch, ray)."""
    edges: dict[str, set[str]] = {}
    heavy: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.glob("*.py")):
        name = path.stem
        edges[name], heavy[name] = set(), set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module:
                    edges[name].add(node.module.split(".")[0])
                else:
                    edges[name].update(a.name for a in node.names)
            elif isinstance(node, ast.Import):
                heavy[name].update(a.name.split(".")[0] for a in node.names if a.name.split(".")[0] in ("torch", "ray"))
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                if node.module.split(".")[0] in ("torch", "ray"):
                    heavy[name].add(node.module.split(".")[0])
    edges = {k: {m for m in v if m in edges and m != k} for k, v in edges.items()}
    return edges, heavy


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def reaches(edges, heavy, module: str) -> set[str]:
    """torch/ray imported by ``module`` or anything it imports from the package."""
    seen, todo, found = set(), [module], set()
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        found |= heavy[m]
        todo.extend(edges[m])
    return found


if __name__ == "__main__":
    edges, heavy = graph()
    found = cycles(edges)
    for comp in found:
        print("cycle:", " <-> ".join(comp))
    for m in sorted(edges):
        lines = len((PACKAGE / f"{m}.py").read_text().splitlines())
        print(f"{m:12s} {lines:4d} lines  torch/ray: {','.join(sorted(reaches(edges, heavy, m))) or '-'}")
    sys.exit(1 if found else 0)
