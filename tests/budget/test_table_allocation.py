"""Allocation under a TableCost (a measured latency): brute-force optimum, exact table budget, presolve."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from orprune.budget.allocation import AllocationProblem, CostModel, TableCost, _presolve, allocate, min_cost


def table_cost_of(cost: TableCost, keep: dict) -> float:
    """Independent evaluation: look each count up by a linear scan."""
    def pos(u):
        return list(cost.options[u]).index(keep[u])

    total = cost.constant + sum(t[pos(u)] for u, t in cost.unary.items())
    return total + sum(t[pos(u), pos(v)] for (u, v), t in cost.pairwise.items())


def random_instance(seed: int, n_units: int = 4):
    """A chain a -> b -> c -> d with random (non-monotone) latency tables and a MACs polynomial."""
    rng = np.random.default_rng(seed)
    units = [f"u{i}" for i in range(n_units)]
    options = {u: np.sort(rng.choice(np.arange(1, 9), size=rng.integers(2, 5), replace=False)) for u in units}
    errors = {u: rng.uniform(0, 1, options[u].size) for u in units}
    unary = {u: rng.uniform(0, 2, options[u].size) for u in units if rng.random() < 0.7}
    # pairs in both orientations, so that the MILP has to transpose some
    pairwise = {}
    for i in range(n_units - 1):
        a, b = (units[i], units[i + 1]) if i % 2 == 0 else (units[i + 1], units[i])
        pairwise[(a, b)] = rng.uniform(0, 3, (options[a].size, options[b].size))
    table = TableCost(options=options, constant=rng.uniform(0, 1), unary=unary, pairwise=pairwise)
    macs = CostModel(linear={units[0]: 1.0}, bilinear={(units[i], units[i + 1]): 1.0 for i in range(n_units - 1)})
    return AllocationProblem(options=options, errors=errors), table, macs


def brute_force(problem, costs, budgets):
    units = list(problem.units)
    best, best_keep = math.inf, None
    for combo in itertools.product(*(problem.options[u] for u in units)):
        keep = dict(zip(units, map(int, combo)))
        if all(evaluate(costs[n], keep) <= b for n, b in budgets.items()):
            value = problem.objective(keep)
            if value < best:
                best, best_keep = value, keep
    return best, best_keep


def evaluate(cost, keep):
    if isinstance(cost, TableCost):
        return table_cost_of(cost, keep)
    return cost.constant + sum(a * keep[u] for u, a in cost.linear.items()) + sum(
        b * keep[u] * keep[v] for (u, v), b in cost.bilinear.items())


def table_range(problem, table):
    values = [table_cost_of(table, dict(zip(problem.units, map(int, c))))
              for c in itertools.product(*(problem.options[u] for u in problem.units))]
    return min(values), max(values)


@pytest.mark.parametrize("formulation", ["transport", "mccormick"])
@pytest.mark.parametrize("seed", range(12))
def test_table_budget_matches_brute_force(seed, formulation):
    problem, table, macs = random_instance(seed)
    low, high = table_range(problem, table)
    budget = low + (high - low) * (0.2 + 0.05 * (seed % 6))
    costs = {"latency": table, "macs": macs}
    budgets = {"latency": budget}
    if seed % 3 == 0:  # with a MACs budget beside it: products and tables over the same pairs
        budgets["macs"] = 0.6 * macs.evaluate({u: int(k[-1]) for u, k in problem.options.items()})
    best, _ = brute_force(problem, costs, budgets)
    if not math.isfinite(best):
        with pytest.raises(ValueError):
            allocate(problem, costs, budgets, mip_rel_gap=0.0, formulation=formulation)
        return
    result = allocate(problem, costs, budgets, mip_rel_gap=0.0, formulation=formulation)
    assert result.objective == pytest.approx(best, abs=1e-9)
    # the chosen counts re-evaluated on the tables, independently: within the budget exactly
    assert table_cost_of(table, result.keep) <= budget
    assert result.costs["latency"] == pytest.approx(table_cost_of(table, result.keep), abs=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_min_cost_of_a_table_is_the_brute_force_minimum(seed):
    problem, table, _ = random_instance(seed)
    low, _ = table_range(problem, table)
    value, keep = min_cost(problem, table)
    assert value == pytest.approx(low, abs=1e-12)
    assert table_cost_of(table, keep) == pytest.approx(low, abs=1e-12)


def test_budget_below_the_table_minimum_is_refused():
    problem, table, _ = random_instance(0)
    low, _ = table_range(problem, table)
    with pytest.raises(ValueError, match="cannot be met"):
        allocate(problem, {"latency": table}, {"latency": 0.99 * low})


def test_presolve_keeps_a_slower_smaller_option_out():
    # 15 channels are slower than 16 and no more accurate: 15 is dominated, 16 and 8 stay
    options = {"a": np.array([8, 15, 16])}
    problem = AllocationProblem(options=options, errors={"a": np.array([0.5, 0.2, 0.1])})
    table = TableCost(options=options, unary={"a": np.array([1.0, 3.0, 2.0])})
    assert _presolve(problem, [table])[0].tolist() == [0, 2]
    # ... unless 15 is cheaper than 16 with the partner's every option
    both = {"a": options["a"], "b": np.array([1, 2])}
    problem = AllocationProblem(options=both, errors={"a": np.array([0.5, 0.2, 0.1]), "b": np.zeros(2)})
    pair = TableCost(options=both, pairwise={("b", "a"): np.array([[1.0, 3.0, 2.0], [1.0, 1.0, 2.0]])})
    assert _presolve(problem, [pair])[0].tolist() == [0, 1, 2]


def test_presolve_of_polynomials_unchanged():
    # non-decreasing polynomial: options not strictly better than every smaller one go
    options = {"a": np.array([1, 2, 3, 4])}
    problem = AllocationProblem(options=options, errors={"a": np.array([0.5, 0.6, 0.2, 0.2])})
    assert _presolve(problem, [CostModel(linear={"a": 1.0})])[0].tolist() == [0, 2]
    assert _presolve(problem, [CostModel(linear={"a": -1.0})])[0].tolist() == [0, 1, 2, 3]
    assert _presolve(problem, [CostModel(linear={})])[0].tolist() == [2]


def test_table_cost_validation():
    options = {"a": np.array([1, 2])}
    with pytest.raises(ValueError, match="shape"):
        TableCost(options=options, unary={"a": np.zeros(3)})
    with pytest.raises(ValueError, match="without `options`"):
        TableCost(options=options, unary={"b": np.zeros(2)})
    with pytest.raises(ValueError, match="pairs of two units"):
        TableCost(options=options, pairwise={("a", "a"): np.zeros((2, 2))})
    with pytest.raises(ValueError, match="finite"):
        TableCost(options=options, unary={"a": np.array([1.0, np.nan])})
    with pytest.raises(ValueError, match="not one of the tabulated options"):
        TableCost(options=options, unary={"a": np.zeros(2)}).evaluate({"a": 3})
    problem = AllocationProblem(options={"a": np.array([1, 2, 3])}, errors={"a": np.zeros(3)})
    with pytest.raises(ValueError, match=r"no table entry for the options \[3\]"):
        allocate(problem, {"latency": TableCost(options=options, unary={"a": np.zeros(2)})}, {"latency": 1.0})
