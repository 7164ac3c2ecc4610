"""orprune: operations-research-first structured pruning for PyTorch.

The pipeline, one stage per subpackage (each may import only the stages before it):

1. :mod:`orprune.layer`: one layer's channel selection as a mixed-integer program, and its solvers;
2. :mod:`orprune.network`: a torch model's prunable units, calibration statistics, costs and surgery;
3. :mod:`orprune.budget`: error curves and the allocation of keep counts under a budget;
4. :mod:`orprune.pipeline`: :class:`Pruner` and :func:`prune`, from a model to a smaller model.

Beside it, :mod:`orprune.spr` trains with the Structured Perspective Regularization;
:mod:`orprune.examples` holds datasets, reference models and baselines; :mod:`orprune.cli` the commands.
"""

from orprune._status import FEASIBLE, INFEASIBLE, OPTIMAL, TIME_LIMIT
from orprune.budget import (
    Allocation,
    AllocationProblem,
    ErrorCurve,
    allocate,
    allocate_uniform,
    error_curve,
    join_curves,
    min_cost,
)
from orprune.layer import (
    LayerProblem,
    Selection,
    StatisticsAccumulator,
    available_solvers,
    backward_elimination,
    greedy_path,
    register_solver,
    select,
    solve_scip,
    swap_local_search,
    to_pyomo,
    write_model,
)
from orprune.network import (
    Consumer,
    ConsumerUpdate,
    CostModel,
    ExcludedGroup,
    NetworkCosts,
    PrunableUnit,
    PruningGraph,
    PruningPlan,
    ResidualTarget,
    Tap,
    TargetCache,
    TargetOffset,
    apply_pruning,
    collect_statistics,
    count_macs_params,
    find_groups,
    find_residual_targets,
    masked_copy,
    network_costs,
)
from orprune.network.saving import load, save
from orprune.pipeline import Pruner, PruneResult, prune
from orprune.spr import (
    PerspectiveRegularizer,
    SPRTraining,
    ThresholdPruning,
    prune_by_threshold,
    spr_optimal_y,
    spr_penalty,
    train_with_spr,
)

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
    "TargetCache",
    "TargetOffset",
    "ThresholdPruning",
    "allocate",
    "allocate_uniform",
    "apply_pruning",
    "available_solvers",
    "backward_elimination",
    "collect_statistics",
    "count_macs_params",
    "error_curve",
    "find_groups",
    "find_residual_targets",
    "greedy_path",
    "join_curves",
    "load",
    "masked_copy",
    "min_cost",
    "network_costs",
    "prune",
    "prune_by_threshold",
    "register_solver",
    "save",
    "select",
    "solve_scip",
    "spr_optimal_y",
    "spr_penalty",
    "swap_local_search",
    "to_pyomo",
    "train_with_spr",
    "write_model",
]
