"""The package's layout: stages import only the stages before them, and no module imports itself in a circle.

Every ``import`` in every module counts, including those inside functions. A module of stage S may import
the modules of the stages ``ALLOWED[S]`` and of its own stage.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import orprune

PACKAGE = Path(orprune.__file__).resolve().parent

CORE = {"orprune._status", "orprune._validation", "orprune._highs", "orprune._pool", "orprune._phases"}
#: stage -> the stages it may import (what each subpackage's docstring says)
ALLOWED = {
    "core": set(),
    "layer": {"core"},
    "network": {"core", "layer"},
    "budget": {"core", "layer", "network"},
    "training": {"core"},
    "pipeline": {"core", "layer", "network", "budget"},
    "transformer": {"core", "layer", "network", "budget"},
    "spr": {"core", "layer", "network", "training"},
    "trp": {"core", "layer", "network", "training"},
    "c2f": {"core", "layer", "training"},
    "ucp": {"core", "layer", "network", "training"},
    "examples": {"core", "layer", "network", "budget", "training", "pipeline"},
    "cli": {"core", "layer", "network", "budget", "training", "pipeline", "spr", "trp", "examples"},
    "root": {"core", "layer", "network", "budget", "training", "pipeline", "transformer", "spr", "trp", "c2f", "ucp",
             "examples", "cli"},
}


def stage(module: str) -> str:
    if module == "orprune":
        return "root"
    if module in CORE:
        return "core"
    part = module.split(".")[1]
    return {"prune_result": "pipeline", "_pipeline_steps": "pipeline", "_latency_loop": "pipeline",
            "factorize": "pipeline", "mixed": "pipeline", "mixed_guard": "pipeline", "mixed_surgery": "pipeline",
            "_refit": "pipeline", "_pruner_options": "pipeline", "_pruned_model": "pipeline",
            "_allocation_steps": "pipeline", "_unit_curves": "pipeline"}.get(part, part)


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The orprune modules ``name`` imports (``from a import b`` counts ``a.b`` when that is a module)."""
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")[: len(name.split(".")) - node.level + is_package]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            targets = [f"{prefix}.{alias.name}" if f"{prefix}.{alias.name}" in known else prefix for alias in node.names]
        else:
            continue
        out |= {t for t in targets if t == "orprune" or t.startswith("orprune.")}
    return {t for t in out if t in known and t != name}


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(name, path, set(found)) for name, path in found.items()}


def test_every_module_is_in_a_known_stage():
    assert {stage(m) for m in graph()} <= set(ALLOWED)


@pytest.mark.parametrize("module", sorted(modules()))
def test_no_upward_import(module):
    bad = {t for t in graph()[module] if stage(t) != stage(module) and stage(t) not in ALLOWED[stage(module)]}
    assert not bad, f"{module} (stage {stage(module)}) imports {sorted(bad)} from a later stage"


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``edges`` (depth-first search), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_no_import_circle():
    cycle = find_cycle(graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_checker_sees_circles_and_upward_imports(tmp_path):
    # the checks above fail when they should: a planted circle and an upward import are found
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
    assert "orprune.layer.problem" in graph()["orprune.layer.selection"]
    assert stage("orprune.budget.curves") == "budget" and "budget" not in ALLOWED["network"]
    fake = tmp_path / "m.py"
    fake.write_text("from orprune.budget import curves\nimport orprune.layer.problem\n")
    known = set(modules())
    assert imports("orprune.network.fake", fake, known) == {"orprune.budget.curves", "orprune.layer.problem"}


@pytest.mark.parametrize("module", sorted(modules()))
def test_every_module_imports_on_its_own(module):
    importlib.import_module(module)
