"""Tied units in the allocation MILP (UCP's one width per stage): the ties hold and the optimum equals brute force."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from orprune.budget.allocation import AllocationProblem, CostModel, allocate


def brute_force(problem: AllocationProblem, cost: CostModel, budget: float, ties) -> float:
    """Best weighted error over every allocation whose tied units share an option index."""
    units = list(problem.options)
    best = math.inf
    for combo in itertools.product(*(range(problem.options[u].size) for u in units)):
        o = dict(zip(units, combo))
        if any(len({o[u] for u in group}) > 1 for group in ties):
            continue
        keep = {u: int(problem.options[u][o[u]]) for u in units}
        total = cost.constant + sum(a * keep[u] for u, a in cost.linear.items())
        total += sum(b * keep[u] * keep[v] for (u, v), b in cost.bilinear.items())
        if total <= budget:
            best = min(best, sum(problem.weights[u] * problem.errors[u][o[u]] for u in units))
    return best


def stage_network(seed: int):
    """A stem, two "stages" of two inner units each and a head: MACs bilinear along the chain."""
    rng = np.random.default_rng(seed)
    units = ["stem", "s1a", "s1b", "s2a", "s2b"]
    width = {"stem": 4, "s1a": 4, "s1b": 4, "s2a": 6, "s2b": 6}
    options = {u: np.arange(1, width[u] + 1) for u in units}
    # the second stage's options are the same fractions of 6 as the first's of 4: o -> round(6 (o + 1) / 4)
    options["s2a"] = options["s2b"] = np.array([2, 3, 5, 6])
    errors = {u: np.sort(rng.random(options[u].size))[::-1] * rng.uniform(0.5, 2) for u in units}
    if seed % 3 == 2:  # errors that are not monotone in the count: presolve must not assume it
        errors = {u: rng.random(options[u].size) for u in units}
    weights = {u: float(rng.uniform(0.5, 2)) for u in units}
    bilinear = {("stem", "s1a"): 9.0, ("stem", "s1b"): 9.0, ("s1a", "stem"): 9.0, ("s1b", "stem"): 9.0,
                ("stem", "s2a"): 4.0, ("stem", "s2b"): 4.0, ("s2a", "stem"): 4.0, ("s2b", "stem"): 4.0}
    cost = CostModel(constant=10.0, linear={u: 2.0 for u in units}, bilinear=bilinear)
    ties = [("s1a", "s1b"), ("s2a", "s2b")]
    return options, errors, weights, cost, ties


@pytest.mark.parametrize("seed", range(9))
@pytest.mark.parametrize("fraction", [0.35, 0.6, 0.85])
def test_tied_allocation_equals_brute_force_and_ties_hold(seed, fraction):
    options, errors, weights, cost, ties = stage_network(seed)
    full = cost.evaluate({u: int(o[-1]) for u, o in options.items()})
    lowest = cost.evaluate({u: int(o[0]) for u, o in options.items()})
    budget = lowest + fraction * (full - lowest)
    problem = AllocationProblem(options, errors, weights, ties=ties)
    result = allocate(problem, {"macs": cost}, {"macs": budget})
    assert result.status == "optimal"
    index = {u: int(np.flatnonzero(options[u] == k)[0]) for u, k in result.keep.items()}
    for group in ties:
        assert len({index[u] for u in group}) == 1
    assert result.costs["macs"] <= budget * (1 + 1e-9)
    assert result.objective == pytest.approx(brute_force(problem, cost, budget, ties), rel=1e-9, abs=1e-12)
    # the ties cost something or nothing, never help: the untied optimum is no worse
    free = allocate(AllocationProblem(options, errors, weights), {"macs": cost}, {"macs": budget})
    assert free.objective <= result.objective + 1e-12
    assert free.objective == pytest.approx(brute_force(problem, cost, budget, []), rel=1e-9, abs=1e-12)


def test_mccormick_formulation_keeps_the_ties():
    options, errors, weights, cost, ties = stage_network(4)
    problem = AllocationProblem(options, errors, weights, ties=ties)
    budget = 0.5 * cost.evaluate({u: int(o[-1]) for u, o in options.items()})
    a = allocate(problem, {"macs": cost}, {"macs": budget}, formulation="mccormick")
    b = allocate(problem, {"macs": cost}, {"macs": budget})
    assert a.objective == pytest.approx(b.objective, rel=1e-9)
    assert a.objective == pytest.approx(brute_force(problem, cost, budget, ties), rel=1e-9)


@pytest.mark.parametrize("ties, match", [
    ([("s1a", "nope")], "without options"),
    ([("s1a", "s1b"), ("s1b", "s2a")], "disjoint"),
    ([("s1a", "s2a")], "same number of options"),
    ("s1a", "sequence of groups"),
    ([3], "sequences of units"),
])
def test_bad_ties(ties, match):
    options, errors, weights, _, _ = stage_network(0)
    options = dict(options, s2a=np.arange(1, 7))
    errors = dict(errors, s2a=np.linspace(1, 0, 6))
    with pytest.raises(ValueError, match=match):
        AllocationProblem(options, errors, weights, ties=ties)


def test_a_group_of_one_ties_nothing():
    options, errors, weights, _, _ = stage_network(0)
    assert AllocationProblem(options, errors, weights, ties=[("s1a",)]).ties == ()
