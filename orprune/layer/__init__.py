"""Stage 1, one layer: the channel-selection problem held as sufficient statistics, ``select`` and its solvers.

Holds :class:`LayerProblem`, :func:`select`, the solver registry (``solvers/``), the indicator MIQP as a Pyomo /
SCIP model, the best low-rank map (:func:`select_rank`), N:M masks (:func:`select_nm`), partition pruning,
:func:`select_hierarchical` and wide consumers' compressed problems (:class:`WideProblem`). May import only the
private core (``orprune._status``, ``_validation``, ``_highs``).
"""

from orprune.layer.fixed import FixedChannels, fix_channels, select_with_fixed
from orprune.layer.hierarchical import HierarchicalSelection, select_hierarchical
from orprune.layer.low_rank import RankCurve, RankSelection, map_objective, rank_curve, select_rank
from orprune.layer.milp_model import solve_scip, to_pyomo, write_model
from orprune.layer.nm import NMSelection, select_nm
from orprune.layer.partition import Partition, partition_weights
from orprune.layer.partition_data import partition_layer
from orprune.layer.problem import LayerProblem, StatisticsAccumulator
from orprune.layer.result import Selection
from orprune.layer.selection import select
from orprune.layer.solvers import available_solvers, register_solver
from orprune.layer.solvers.greedy import greedy_path
from orprune.layer.solvers.local_search import backward_elimination, swap_local_search
from orprune.layer.wide import WideAccumulator, WideProblem, channel_projection

__all__ = [
    "FixedChannels",
    "HierarchicalSelection",
    "LayerProblem",
    "NMSelection",
    "Partition",
    "RankCurve",
    "RankSelection",
    "Selection",
    "StatisticsAccumulator",
    "WideAccumulator",
    "WideProblem",
    "available_solvers",
    "backward_elimination",
    "channel_projection",
    "fix_channels",
    "greedy_path",
    "map_objective",
    "partition_layer",
    "partition_weights",
    "rank_curve",
    "register_solver",
    "select",
    "select_hierarchical",
    "select_nm",
    "select_rank",
    "select_with_fixed",
    "solve_scip",
    "swap_local_search",
    "to_pyomo",
    "write_model",
]
