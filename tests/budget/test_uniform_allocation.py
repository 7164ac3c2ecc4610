"""Uniform per-layer rates: the largest common fraction within the budgets, against enumeration."""

from __future__ import annotations

import numpy as np
import pytest

from orprune import AllocationProblem, CostModel, allocate, allocate_uniform
from tests.budget.test_allocation import assert_valid, cost_of, random_network


def keep_at(problem: AllocationProblem, q: float) -> dict:
    """Each unit's largest option not above q times its width (at least its smallest option)."""
    keep = {}
    for u, options in problem.options.items():
        below = [int(o) for o in options if o <= q * options.max() * (1 + 1e-12)]
        keep[u] = max(below) if below else int(options.min())
    return keep


def best_uniform(problem, costs, budgets):
    """Enumerate every breakpoint fraction o / width; the largest feasible one decides."""
    fractions = sorted({0.0} | {o / opts.max() for opts in problem.options.values() for o in opts}, reverse=True)
    for q in fractions:
        keep = keep_at(problem, q)
        if all(cost_of(costs[n], keep) <= b + 1e-9 for n, b in budgets.items()):
            return keep
    return None


@pytest.mark.parametrize("seed", range(40))
def test_uniform_rate_is_the_largest_feasible_common_fraction(seed):
    problem, costs, budgets = random_network(seed)
    expected = best_uniform(problem, costs, budgets)
    if expected is None:
        with pytest.raises(ValueError, match="cannot be met with uniform rates"):
            allocate_uniform(problem, costs, budgets)
        return
    alloc = allocate_uniform(problem, costs, budgets)
    assert dict(alloc.keep) == expected
    assert_valid(alloc, problem, costs, budgets)
    assert alloc.status == "feasible" and alloc.formulation == "uniform"
    # the MILP optimises the same errors under the same budgets: never worse than a uniform rate
    assert allocate(problem, costs, budgets).objective <= alloc.objective + 1e-12


def test_uniform_rate_on_a_chain():
    options = {u: np.arange(1, 9) for u in "abc"}
    errors = {u: 1.0 / options[u] for u in "abc"}
    problem = AllocationProblem(options, errors)
    macs = CostModel(linear={"a": 3.0}, bilinear={("a", "b"): 1.0, ("b", "c"): 1.0})  # full: 24 + 64 + 64
    alloc = allocate_uniform(problem, {"macs": macs}, {"macs": 0.25 * 152})
    assert dict(alloc.keep) == {"a": 3, "b": 3, "c": 3}  # 9 + 9 + 9 <= 38 < 12 + 16 + 16
    assert alloc.info["fraction"] == 3 / 8
    assert dict(allocate_uniform(problem, {"macs": macs}, {"macs": 1e9}).keep) == {"a": 8, "b": 8, "c": 8}


def test_bad_arguments():
    problem, costs, budgets = random_network(0)
    with pytest.raises(ValueError, match="at least one cost"):
        allocate_uniform(problem, costs, {})
    with pytest.raises(ValueError, match="not in `costs`"):
        allocate_uniform(problem, costs, {"latency": 1.0})
    negative = {"macs": CostModel(linear={u: -1.0 for u in problem.options})}
    with pytest.raises(ValueError, match="negative coefficients"):
        allocate_uniform(problem, negative, {"macs": 0.0})
