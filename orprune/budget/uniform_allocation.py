"""Uniform per-layer rates: the baseline the MILP allocation is compared against.

Every unit keeps the same fraction ``q`` of its channels (the largest of its options not above
``q * C``, at least its smallest option); ``q`` is the largest fraction whose keep counts meet
every budget. The keep counts change only at the fractions ``o / C`` of the options, compared in
exact rational arithmetic, and each cost is non-decreasing in ``q`` when its coefficients are
non-negative (MACs, parameters): a bisection over those breakpoints finds ``q``. The error curves are not consulted: this is
what a per-layer pruning rate does, and the error it reaches is reported for comparison.
"""

from __future__ import annotations

import math
import time
from collections.abc import Hashable, Mapping
from fractions import Fraction
from types import MappingProxyType

import numpy as np

from orprune._status import FEASIBLE
from orprune.budget.allocation import Allocation, AllocationProblem, CostModel
from orprune.layer.result import relative_gap

__all__ = ["allocate_uniform"]


def _keep_at(problem: AllocationProblem, fraction: Fraction) -> dict[Hashable, int]:
    """Each unit's largest option not above ``fraction`` of its width; a tied group takes its widest unit's
    option index (tied units need not have the same options: a chunk's balance ties 8 to 4, 4 to 2, ...)."""
    index = {}
    for unit, options in problem.options.items():
        width = int(options[-1])
        fitting = [o for o, k in enumerate(options) if Fraction(int(k), max(width, 1)) <= fraction]
        index[unit] = fitting[-1] if fitting else 0
    for group in problem.ties:
        leader = max(group, key=lambda u: int(problem.options[u][-1]))
        for unit in group:
            index[unit] = index[leader]
    return {unit: int(problem.options[unit][o]) for unit, o in index.items()}


def allocate_uniform(problem: AllocationProblem, costs: Mapping[str, CostModel],
                     budgets: Mapping[str, float]) -> Allocation:
    """The same keep fraction for every unit, as large as the budgets allow.

    Parameters
    ----------
    problem : AllocationProblem
        Options (the largest is taken as the unit's width) and error curves. A tied group takes the option
        index of its widest unit.
    costs : mapping name -> CostModel
        Costs to report; those named in ``budgets`` must have non-negative coefficients.
    budgets : mapping name -> float
        Upper bound of each constrained cost; at least one.

    Returns
    -------
    Allocation
        Status ``"feasible"``; ``bound`` is the sum of every unit's least error (a valid lower bound
        on the MILP optimum), ``info["fraction"]`` the common fraction.

    Raises
    ------
    ValueError
        No budget, a budgeted cost with a negative coefficient, or budgets that even the smallest
        options do not meet.
    """
    start = time.perf_counter()
    if not budgets:
        raise ValueError("`budgets` must name at least one cost.")
    for name in budgets:
        if name not in costs:
            raise ValueError(f"`budgets` names {name!r}, which is not in `costs`.")
        if not costs[name].nonnegative:
            raise ValueError(f"cost {name!r} has negative coefficients: a uniform rate needs costs that "
                             "grow with the channels kept.")

    def fits(fraction: Fraction) -> bool:
        keep = _keep_at(problem, fraction)
        return all(costs[n].evaluate(keep) <= b * (1 + 1e-12) + 1e-9 for n, b in budgets.items())

    breakpoints = sorted({Fraction(0)} | {Fraction(int(o), max(int(opts[-1]), 1))
                                          for opts in problem.options.values() for o in opts})
    if not fits(breakpoints[0]):
        smallest = _keep_at(problem, breakpoints[0])
        lowest = {n: costs[n].evaluate(smallest) for n in budgets}
        raise ValueError(f"the budgets {dict(budgets)} cannot be met with uniform rates: the smallest "
                         f"options cost {lowest}.")
    low, high = 0, len(breakpoints)  # fits(breakpoints[low]); every index >= high does not
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(breakpoints[middle]) else (low, middle)
    low = breakpoints[low]
    keep = _keep_at(problem, low)
    value = problem.objective(keep)
    bound = min(value, math.fsum(problem.weights[u] * float(np.min(e)) for u, e in problem.errors.items()))
    achieved = {name: c.evaluate(keep) for name, c in costs.items()}
    return Allocation(
        keep=MappingProxyType(keep), objective=value, bound=bound, gap=relative_gap(value, bound, 1.0),
        status=FEASIBLE, costs=MappingProxyType(achieved), solve_time=time.perf_counter() - start,
        message=f"uniform keep fraction {float(low):.4f}", formulation="uniform",
        info=MappingProxyType({"fraction": float(low)}),
    )
