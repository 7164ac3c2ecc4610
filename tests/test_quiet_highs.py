"""orprune's HiGHS solves print nothing, not even highspy's construction banner."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("highspy")

# Each snippet runs in a fresh interpreter: highspy prints its banner once per process, so a
# HiGHS instance built earlier in the test session would hide it.
SNIPPETS = {
    "allocation MILP": """
        from orprune.budget.allocation import AllocationProblem, CostModel, allocate
        problem = AllocationProblem(options={"a": [1, 2, 3], "b": [1, 2]},
                                    errors={"a": [0.5, 0.2, 0.0], "b": [0.3, 0.0]})
        cost = CostModel(constant=0.0, linear={"a": 1.0, "b": 2.0}, bilinear={("a", "b"): 1.0})
        print("keep", dict(sorted(allocate(problem, costs={"macs": cost}, budgets={"macs": 6.0}).keep.items())))
    """,
    "exact solver, outer approximation": """
        import numpy as np
        from orprune import LayerProblem, select
        rng = np.random.default_rng(0)
        X = rng.standard_normal((60, 6)); Y = X @ rng.standard_normal((6, 2))
        print("status", select(LayerProblem.from_arrays(X, Y), 3, solver="exact", method="oa").status)
    """,
}


@pytest.mark.parametrize("name", sorted(SNIPPETS))
def test_highs_solves_write_nothing_to_stdout(name):
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(SNIPPETS[name])], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 1 and lines[0].split()[0] in ("keep", "status"), out.stdout  # only the snippet's print
    assert "HiGHS" not in out.stdout + out.stderr


def test_stdout_still_works_after_a_quiet_instance(capfd):
    from orprune._highs import quiet_highs

    print("before", flush=True)
    quiet_highs()
    print("after", flush=True)
    assert capfd.readouterr().out == "before\nafter\n"
