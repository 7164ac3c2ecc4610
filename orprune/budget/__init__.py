"""Stage 3, the budget: error curves per unit and the allocation of keep counts across units.

Layer and output error curves, the allocation MILP (HiGHS) and its data, the uniform-rate baseline.
May import the core, :mod:`orprune.layer` and :mod:`orprune.network`.
"""

from orprune.budget.allocation import Allocation, AllocationProblem, allocate, min_cost
from orprune.budget.curves import ErrorCurve, error_curve, join_curves
from orprune.budget.uniform_allocation import allocate_uniform

__all__ = [
    "Allocation",
    "AllocationProblem",
    "ErrorCurve",
    "allocate",
    "allocate_uniform",
    "error_curve",
    "join_curves",
    "min_cost",
]
