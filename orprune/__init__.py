"""orprune: operations-research-first structured pruning for PyTorch."""

from orprune._status import FEASIBLE, INFEASIBLE, OPTIMAL, TIME_LIMIT
from orprune.allocation import Allocation, AllocationProblem, CostModel, allocate, min_cost
from orprune.calibration import TargetCache, collect_statistics
from orprune.costs import NetworkCosts, network_costs
from orprune.curves import ErrorCurve, error_curve, join_curves
from orprune.graph import Consumer, ExcludedGroup, PrunableUnit, PruningGraph, find_groups
from orprune.surgery import ConsumerUpdate, PruningPlan, apply_pruning, masked_copy
from orprune.milp_model import solve_scip, write_model
from orprune.pipeline import Pruner, PruneResult, prune
from orprune.problem import LayerProblem, StatisticsAccumulator
from orprune.residual_targets import ResidualTarget, Tap, TargetOffset, find_residual_targets
from orprune.regularizers import PerspectiveRegularizer, spr_optimal_y, spr_penalty
from orprune.result import Selection
from orprune.selection import select
from orprune.spr_pruning import ThresholdPruning, prune_by_threshold
from orprune.spr_training import SPRTraining, train_with_spr
from orprune.solvers import available_solvers, register_solver
from orprune.solvers.greedy import greedy_path
from orprune.solvers.local_search import backward_elimination, swap_local_search
from orprune.uniform_allocation import allocate_uniform

__version__ = "0.1.0.dev0"

__all__ = [
    "Allocation",
    "AllocationProblem",
    "Consumer",
    "ConsumerUpdate",
    "CostModel",
    "ErrorCurve",
    "ExcludedGroup",
    "FEASIBLE",
    "INFEASIBLE",
    "LayerProblem",
    "NetworkCosts",
    "OPTIMAL",
    "PerspectiveRegularizer",
    "PrunableUnit",
    "PruneResult",
    "Pruner",
    "PruningGraph",
    "PruningPlan",
    "ResidualTarget",
    "SPRTraining",
    "Selection",
    "StatisticsAccumulator",
    "TIME_LIMIT",
    "Tap",
    "TargetOffset",
    "ThresholdPruning",
    "allocate",
    "allocate_uniform",
    "apply_pruning",
    "available_solvers",
    "backward_elimination",
    "collect_statistics",
    "TargetCache",
    "error_curve",
    "join_curves",
    "find_groups",
    "find_residual_targets",
    "greedy_path",
    "masked_copy",
    "min_cost",
    "network_costs",
    "prune",
    "prune_by_threshold",
    "register_solver",
    "select",
    "solve_scip",
    "spr_optimal_y",
    "spr_penalty",
    "swap_local_search",
    "train_with_spr",
    "write_model",
]
