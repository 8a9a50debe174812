"""The package's layers as docs/design.md draws them: every import (lazy ones too) points down or
stays inside its own subpackage, the four stages never import one another, and there is no cycle."""
import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "rocket"

# Lower numbers are lower layers; a module may import its own subpackage or any lower layer.
LAYERS = {
    "rocket.errors": 0, "rocket.io": 1, "rocket.progress": 1, "rocket.kernels": 1,
    "rocket.data": 2, "rocket.modeling": 2, "rocket.resume": 2, "rocket.tiny": 2,
    "rocket.adapters": 3,
    "rocket.moe": 4, "rocket.runtime": 4,
    "rocket.rationale": 5, "rocket.scoring": 5, "rocket.selection": 5, "rocket.augment": 5, "rocket.training": 5,
    "rocket.evaluation": 5,
    "rocket.report": 6, "rocket.pipeline": 7, "rocket.demo": 8, "rocket.cli": 9,
}
STAGES = {"rocket.rationale", "rocket.scoring", "rocket.selection", "rocket.augment", "rocket.training",
          "rocket.evaluation"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit(module: str) -> str | None:
    """The layer entry a module belongs to (its subpackage, or itself for a top-level module)."""
    for name in sorted(LAYERS, key=len, reverse=True):
        if module == name or module.startswith(name + "."):
            return name
    return None


def _nodes(tree: ast.AST):
    """Every node, except those under `if TYPE_CHECKING:` (imports for annotations only)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            continue
        yield node
        yield from _nodes(node)


def imports_of(path: Path) -> set[str]:
    """rocket modules imported anywhere in the file (function-level imports included)."""
    found = set()
    for node in _nodes(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.startswith("rocket"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)  # `from pkg import submodule`
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("rocket"))
    return found


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges = {}
    for name, path in files.items():
        if name == "rocket":  # the lazy public API names every stage as strings, not imports
            continue
        edges[name] = {m for m in imports_of(path) if m in files and m != name}
    return edges


def layer_violations(edges: dict[str, set[str]]) -> list[str]:
    bad = []
    for src, targets in edges.items():
        u = unit(src)
        if u is None:
            bad.append(f"{src}: not in any layer")
            continue
        for dst in targets:
            v = unit(dst)
            if v is None or v == u:
                continue
            if u in STAGES and v in STAGES:
                bad.append(f"{src} imports {dst}: stages never import one another")
            elif LAYERS[v] >= LAYERS[u]:
                bad.append(f"{src} (layer {LAYERS[u]}) imports {dst} (layer {LAYERS[v]})")
    return sorted(bad)


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
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


def test_every_import_points_down_a_layer():
    assert layer_violations(graph()) == []


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_checks_catch_a_cycle_and_a_stage_importing_a_stage():
    edges = {"rocket.scoring.score": {"rocket.selection.ranking"}, "rocket.selection.ranking": set(),
             "rocket.adapters.bank": {"rocket.moe.layer"}, "rocket.moe.layer": {"rocket.adapters.bank"}}
    assert layer_violations(edges) == [
        "rocket.adapters.bank (layer 3) imports rocket.moe.layer (layer 4)",
        "rocket.scoring.score imports rocket.selection.ranking: stages never import one another"]
    assert cycles(edges) == [["rocket.adapters.bank", "rocket.moe.layer"]]


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_comments_point_inside_the_repository(path):
    text = path.read_text(encoding="utf-8")
    found = re.search(r"DESIGN\.md|DESIGN §|\.\./shared|\b[Ii]ssue #?\d", text)
    assert found is None, f"{path.name} cites {found.group(0)!r}: point to docs/design.md instead"
