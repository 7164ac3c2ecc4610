"""orprune: operations-research-first structured pruning for PyTorch."""

from orprune._status import FEASIBLE, INFEASIBLE, OPTIMAL, TIME_LIMIT
from orprune.problem import LayerProblem, StatisticsAccumulator
from orprune.regularizers import PerspectiveRegularizer, spr_optimal_y, spr_penalty
from orprune.result import Selection
from orprune.selection import select
from orprune.solvers import available_solvers, register_solver
from orprune.solvers.greedy import greedy_path

__version__ = "0.1.0.dev0"

__all__ = [
    "FEASIBLE",
    "INFEASIBLE",
    "OPTIMAL",
    "PerspectiveRegularizer",
    "TIME_LIMIT",
    "LayerProblem",
    "Selection",
    "StatisticsAccumulator",
    "available_solvers",
    "greedy_path",
    "register_solver",
    "select",
    "spr_optimal_y",
    "spr_penalty",
]
