"""The docs point at files that exist, and every committed result names the command that made it."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "formulations").glob("*.md"))]
RESULTS = sorted((ROOT / "benchmarks" / "results").glob("*.md"))

# A repository path written out in a doc: `orprune/x.py`, `benchmarks/results/y.md`, `formulations/z.md`.
REPO_PATH = re.compile(r"`((?:orprune|benchmarks|formulations|notebooks|tests)/[\w./-]+\.(?:py|md|png|ipynb))`")
# A results file named by its bare name (the README abbreviates the directory).
RESULT_NAME = re.compile(r"\b((?:perspective_training|perspective_finetune|network_pruning|layer_solvers|network_seeds"
                         r"|heuristic_curves|allocation_milp)\w*\.(?:md|png))")


def test_the_docs_and_results_exist():
    assert (ROOT / "README.md").is_file()
    assert RESULTS, "no committed results tables"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_paths_named_in_docs_exist(doc):
    text = doc.read_text(encoding="utf-8")
    missing = [p for p in REPO_PATH.findall(text) if not (ROOT / p).exists()]
    missing += [n for n in RESULT_NAME.findall(text) if not (ROOT / "benchmarks" / "results" / n).exists()
                and not (ROOT / "benchmarks" / n).exists()]
    assert not missing, f"{doc.name} names files that do not exist: {sorted(set(missing))}"


@pytest.mark.parametrize("table", RESULTS, ids=lambda p: p.name)
def test_every_result_names_its_command(table):
    text = table.read_text(encoding="utf-8")
    assert re.search(r"`python (-m benchmarks\.\w+|benchmarks/\w+\.py)[^`]*`", text), (
        f"{table.name} does not say which benchmark command produced it")
