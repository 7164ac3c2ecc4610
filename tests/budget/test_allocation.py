"""Global allocation MILP: optimality against brute force, statuses, and input validation."""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pytest

import orprune.budget.allocation as allocation_module
from orprune.budget.allocation import (
    FORMULATIONS,
    Allocation,
    AllocationProblem,
    CostModel,
    Expr,
    MilpResult,
    allocate,
    min_cost,
    solve_milp,
)

# ------------------------------------------------------------------------------------------------
# Reference implementations, written independently of the module under test.


def cost_of(cost: CostModel, keep: dict) -> float:
    total = cost.constant
    for u, a in cost.linear.items():
        total += a * keep[u]
    for (u, v), b in cost.bilinear.items():
        total += b * keep[u] * keep[v]
    return total


def all_allocations(problem: AllocationProblem):
    units = list(problem.options)
    for combo in itertools.product(*(range(problem.options[u].size) for u in units)):
        keep = {u: int(problem.options[u][o]) for u, o in zip(units, combo)}
        value = sum(problem.weights[u] * problem.errors[u][o] for u, o in zip(units, combo))
        yield keep, value


def brute_force(problem: AllocationProblem, costs: dict, budgets: dict) -> float:
    best = math.inf
    for keep, value in all_allocations(problem):
        if all(cost_of(costs[n], keep) <= b for n, b in budgets.items()):
            best = min(best, value)
    return best


# ------------------------------------------------------------------------------------------------
# Random tiny networks: chains and a branching block, a fixed input unit, MACs and params.


def random_network(seed: int, negative: bool = False):
    rng = np.random.default_rng(seed)
    if seed % 2 == 0:
        units = [f"c{l}" for l in range(int(rng.integers(3, 6)))]
        edges = list(zip(units[:-1], units[1:]))
    else:  # a -> (b, c) -> d, d consuming the concatenation of b and c
        units = ["a", "b", "c", "d"]
        edges = [("a", "b"), ("a", "c"), ("b", "d"), ("c", "d")]
    edges.append(("in", units[0]))  # network input: a single option, folded into the coefficients
    options, errors = {"in": np.array([3])}, {"in": np.array([0.0])}
    for u in units:
        n = int(rng.integers(2, 5))
        options[u] = np.sort(rng.choice(np.arange(1, 9), size=n, replace=False))
        e = rng.random(n)
        errors[u] = e if seed % 4 < 2 else np.sort(e)[::-1]  # half of them non-monotone
    weights = None
    if seed % 3 == 0:
        weights = {u: float(rng.uniform(0, 2)) for u in units}
        weights[units[-1]] = 0.0
    problem = AllocationProblem(options, errors, weights)
    low = -6 if negative else 0
    macs = CostModel(
        constant=float(rng.integers(0, 50)),
        linear={units[-1]: float(rng.integers(low, 20))},
        bilinear={e: float(rng.integers(low if negative else 1, 20)) for e in edges},
    )
    params = CostModel(
        linear={u: float(rng.integers(low, 5)) for u in units},
        bilinear={**{e: float(rng.integers(low, 9)) for e in edges}, (units[1], units[1]): 0.5},
    )
    costs = {"macs": macs, "params": params}
    # Budgets from a random allocation: feasible, and sometimes met with equality.
    ref = {u: int(rng.choice(options[u])) for u in options}
    which = [["macs"], ["params"], ["macs", "params"]][seed % 3]
    slack = {n: 1.0 if rng.random() < 0.4 else rng.uniform(1, 1.3) for n in which}
    budgets = {n: cost_of(costs[n], ref) * slack[n] for n in which}
    budgets = {n: max(b, 0.0) for n, b in budgets.items()}
    return problem, costs, budgets


def assert_valid(alloc: Allocation, problem, costs, budgets) -> None:
    for u, k in alloc.keep.items():
        assert k in problem.options[u]
    for n, c in costs.items():
        assert alloc.costs[n] == pytest.approx(cost_of(c, alloc.keep), rel=1e-12, abs=1e-9)
    for n, b in budgets.items():
        assert cost_of(costs[n], alloc.keep) <= b + 1e-9 * max(abs(b), 1)
    position = {u: list(problem.options[u]).index(k) for u, k in alloc.keep.items()}
    value = sum(problem.weights[u] * problem.errors[u][o] for u, o in position.items())
    assert alloc.objective == pytest.approx(value, abs=1e-12)
    assert alloc.bound <= alloc.objective + 1e-12
    assert alloc.gap >= 0


@pytest.mark.parametrize("seed", range(60))
def test_optimum_matches_brute_force(seed):
    problem, costs, budgets = random_network(seed)
    best = brute_force(problem, costs, budgets)
    for formulation in FORMULATIONS:
        alloc = allocate(problem, costs, budgets, formulation=formulation)
        assert alloc.status == "optimal" and alloc.success
        assert_valid(alloc, problem, costs, budgets)
        assert alloc.objective == pytest.approx(best, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("seed", range(20))
def test_costs_with_negative_coefficients(seed):
    # No dominance presolve, no greedy start, and min_cost needs its own MILP.
    problem, costs, budgets = random_network(1000 + seed, negative=True)
    for name, cost in costs.items():
        value, keep = min_cost(problem, cost)
        assert value == pytest.approx(min(cost_of(cost, k) for k, _ in all_allocations(problem)), abs=1e-9)
        assert value == pytest.approx(cost_of(cost, keep), abs=1e-9)
    feasible = brute_force(problem, costs, budgets)
    for formulation in FORMULATIONS:
        alloc = allocate(problem, costs, budgets, formulation=formulation, warm_start=False)
        assert_valid(alloc, problem, costs, budgets)
        assert alloc.objective == pytest.approx(feasible, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("seed", range(0, 20, 2))
def test_transport_relaxation_is_integral_on_a_chain(seed):
    # Without a budget the transport LP over a chain is the marginal polytope of a tree: its
    # minimum of any cost equals the integer minimum. McCormick's relaxation is never tighter.
    problem, costs, _ = random_network(seed, negative=True)
    cost = costs["macs"]
    kept = [np.arange(problem.options[u].size) for u in problem.units]
    expr = allocation_module._expr(cost, problem, kept)
    vals = allocation_module._vals(problem, kept)
    lp = {f: solve_milp(expr, [], vals, f, None, 0.0, None, relax=True).bound for f in FORMULATIONS}
    exact = min(cost_of(cost, k) for k, _ in all_allocations(problem))
    assert lp["transport"] == pytest.approx(exact, rel=1e-7, abs=1e-7)
    assert lp["mccormick"] <= lp["transport"] + 1e-7


def test_cost_model_evaluate():
    cost = CostModel(constant=1, linear={"a": 2}, bilinear={("a", "b"): 3, ("b", "a"): 1, ("b", "b"): 0.5})
    assert cost.evaluate({"a": 2, "b": 4, "unused": 7}) == 1 + 2 * 2 + 3 * 8 + 1 * 8 + 0.5 * 16
    assert cost.units == {"a", "b"}
    with pytest.raises(ValueError, match="lacks a keep count"):
        cost.evaluate({"a": 2})


def test_without_budgets_each_unit_takes_its_least_error():
    problem = AllocationProblem({"a": [1, 2, 3], "b": [4, 8]}, {"a": [0.5, 0.1, 0.3], "b": [0.2, 0.0]})
    macs = CostModel(bilinear={("a", "b"): 9.0})
    alloc = allocate(problem, {"macs": macs})
    assert dict(alloc.keep) == {"a": 2, "b": 8}
    assert alloc.costs["macs"] == 9 * 2 * 8
    assert alloc.status == "optimal" and alloc.objective == pytest.approx(0.1)


def test_budget_equal_to_the_minimum_is_met():
    problem, costs, _ = random_network(4)
    smallest = {u: int(problem.options[u][0]) for u in problem.units}
    alloc = allocate(problem, costs, {"macs": cost_of(costs["macs"], smallest)})
    assert cost_of(costs["macs"], alloc.keep) <= cost_of(costs["macs"], smallest)


def test_infeasible_budget_reports_minimum_cost():
    problem, costs, _ = random_network(2)
    lowest, _ = min_cost(problem, costs["macs"])
    match = r"`budgets\['macs'\]` = .* cannot be met: the minimum achievable macs"
    with pytest.raises(ValueError, match=match):
        allocate(problem, costs, {"macs": lowest * 0.99})


def test_budgets_jointly_infeasible():
    problem = AllocationProblem({"u": [1, 5]}, {"u": [1.0, 0.0]})
    costs = {"up": CostModel(linear={"u": 1.0}), "down": CostModel(constant=10.0, linear={"u": -1.0})}
    with pytest.raises(ValueError, match="cannot be met together"):
        allocate(problem, costs, {"up": 1.0, "down": 5.0})


def chain(n_units: int, n_options: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    units = [f"c{l}" for l in range(n_units)]
    grid = np.linspace(64 // n_options, 64, n_options).astype(int)
    errors = {u: (1 - grid / 64) ** rng.uniform(1, 3) * rng.lognormal(0, 0.5) for u in units}
    macs = CostModel(linear={units[0]: 27.0}, bilinear={(a, b): 9.0 for a, b in zip(units[:-1], units[1:])})
    problem = AllocationProblem({u: grid for u in units}, errors)
    return problem, {"macs": macs}, {"macs": 0.5 * macs.evaluate({u: 64 for u in units})}


@pytest.mark.parametrize("warm_start", [True, False])
def test_time_limit_returns_a_feasible_incumbent(warm_start):
    problem, costs, budgets = chain(20, 16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        alloc = allocate(problem, costs, budgets, time_limit=0.01, warm_start=warm_start)
    assert alloc.status in ("optimal", "time_limit")
    assert_valid(alloc, problem, costs, budgets)
    if alloc.status == "time_limit":
        assert any("relative gap" in str(w.message) for w in caught)
    # Never below the budget-free bound: every unit at its least error.
    assert alloc.bound >= sum(e.min() for e in problem.errors.values()) - 1e-12


def test_time_limit_without_incumbent_is_an_error(monkeypatch):
    problem, costs, budgets = random_network(1000, negative=True)  # no greedy fallback
    real = solve_milp

    def stopped(objective, rows, *args, **kwargs):  # min_cost (no rows) still solves for real
        if not rows:
            return real(objective, rows, *args, **kwargs)
        return MilpResult(None, "time_limit", -math.inf, "Time limit reached")

    monkeypatch.setattr(allocation_module, "solve_milp", stopped)
    with pytest.raises(RuntimeError, match="no feasible allocation found within `time_limit`"):
        allocate(problem, costs, budgets, time_limit=1.0)


def test_time_limit_falls_back_on_the_greedy_incumbent(monkeypatch):
    problem, costs, budgets = chain(6, 8)
    stopped = MilpResult(None, "time_limit", 0.01, "Time limit reached")
    monkeypatch.setattr(allocation_module, "solve_milp", lambda *a, **k: stopped)
    with pytest.warns(RuntimeWarning, match="relative gap"):
        alloc = allocate(problem, costs, budgets, time_limit=1.0)
    assert alloc.status == "time_limit"
    assert alloc.bound == max(0.01, sum(e.min() for e in problem.errors.values()))
    assert_valid(alloc, problem, costs, budgets)


def test_never_returns_an_allocation_over_budget(monkeypatch):
    problem, costs, _ = chain(5, 4)
    largest = [problem.options[u].size - 1 for u in problem.units]
    full = costs["macs"].evaluate({u: int(problem.options[u][-1]) for u in problem.units})
    budgets = {"macs": full * (1 - 1e-8)}  # the full network is over budget by a hair
    real, calls = solve_milp, []

    def once_violating(*args, **kwargs):
        calls.append(args[1][0][1])  # the budget HiGHS was given
        if len(calls) == 1:
            return MilpResult(largest, "optimal", 0.0, "pretend")
        return real(*args, **kwargs)

    monkeypatch.setattr(allocation_module, "solve_milp", once_violating)
    alloc = allocate(problem, costs, budgets)
    assert_valid(alloc, problem, costs, budgets)
    assert len(calls) == 2 and calls[1] < calls[0] and "re-solve" in alloc.message

    violating = MilpResult(largest, "optimal", 0.0, "")
    monkeypatch.setattr(allocation_module, "solve_milp", lambda *a, **k: violating)
    with pytest.raises(RuntimeError, match="exceed a budget"):
        allocate(problem, costs, budgets)
    with pytest.raises(RuntimeError, match="over budget by"):  # far over: not a tolerance issue
        allocate(problem, costs, {"macs": 0.5 * full})


GOOD_OPTIONS = {"a": [1, 2], "b": [2, 4]}
GOOD_ERRORS = {"a": [0.2, 0.1], "b": [0.3, 0.0]}


@pytest.mark.parametrize(
    ("options", "errors", "weights", "match"),
    [
        ({"a": [1, 2]}, GOOD_ERRORS, None, "same units"),
        ({**GOOD_OPTIONS, "a": []}, {**GOOD_ERRORS, "a": []}, None, "non-empty 1-D"),
        ({**GOOD_OPTIONS, "a": [1, 2, 3]}, GOOD_ERRORS, None, "one entry per option"),
        (GOOD_OPTIONS, {**GOOD_ERRORS, "a": [np.nan, 0.1]}, None, "must be finite"),
        ({**GOOD_OPTIONS, "a": [2, 1]}, GOOD_ERRORS, None, "strictly increasing"),
        ({**GOOD_OPTIONS, "a": [1.5, 2]}, GOOD_ERRORS, None, "integer keep counts >= 0"),
        ({**GOOD_OPTIONS, "a": [-1, 2]}, GOOD_ERRORS, None, "integer keep counts >= 0"),
        ({}, {}, None, "at least one unit"),
        (GOOD_OPTIONS, GOOD_ERRORS, {"a": -1.0}, r"`weights\['a'\]` must be >= 0"),
        (GOOD_OPTIONS, GOOD_ERRORS, {"z": 1.0}, "units without options"),
    ],
)
def test_bad_problem_raises(options, errors, weights, match):
    with pytest.raises(ValueError, match=match):
        AllocationProblem(options, errors, weights)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"costs": {"macs": CostModel(linear={"zz": 1.0})}}, "units that have no options"),
        ({"budgets": {"macs": -1.0}}, r"`budgets\['macs'\]` must be >= 0"),
        ({"budgets": {"macs": np.nan}}, "must be finite"),
        ({"budgets": {"flops": 1.0}}, "costs that `costs` does not define"),
        ({"time_limit": 0.0}, "`time_limit` must be > 0"),
        ({"mip_rel_gap": 1.5}, r"`mip_rel_gap` must lie in \[0, 1\)"),
        ({"formulation": "bigm"}, "`formulation` must be one of"),
        ({"costs": {"macs": "not a cost"}}, "must be a CostModel"),
    ],
)
def test_bad_allocate_arguments_raise(kwargs, match):
    problem = AllocationProblem(GOOD_OPTIONS, GOOD_ERRORS)
    args = {"costs": {"macs": CostModel(bilinear={("a", "b"): 1.0})}, "budgets": {"macs": 100.0}, **kwargs}
    with pytest.raises(ValueError, match=match):
        allocate(problem, **args)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"bilinear": {("a",): 1.0}}, "must be pairs"),
        ({"linear": {"a": math.inf}}, "must be finite"),
        ({"constant": "x"}, "must be a real number"),
    ],
)
def test_bad_cost_model_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CostModel(**kwargs)


def test_expr_is_what_the_cost_model_says():
    # The reduced expression (fixed units folded in) evaluates to the cost model's value.
    problem, costs, _ = random_network(7)
    kept = [np.arange(problem.options[u].size) for u in problem.units]
    vals = allocation_module._vals(problem, kept)
    expr: Expr = allocation_module._expr(costs["params"], problem, kept)
    rng = np.random.default_rng(0)
    for _ in range(10):
        idx = [int(rng.integers(v.size)) for v in vals]
        keep = {u: int(vals[j][idx[j]]) for j, u in enumerate(problem.units)}
        assert expr.value(idx, vals) == pytest.approx(cost_of(costs["params"], keep), abs=1e-9)
