"""Stage 2, a torch network: its prunable units, calibration statistics, costs and surgery.

Tracing (torch-pruning's dependency graph -> units and consumers), calibration streams and patches, residual
targets, the MACs / params cost model, the physical removal and the factorized (low-rank) surgery. May import the core and :mod:`orprune.layer`.
"""

from orprune.network.calibration import TargetCache, collect_statistics
from orprune.network.cost_model import CostModel
from orprune.network.costs import NetworkCosts, count_macs_params, network_costs
from orprune.network.factorization import LayerFactors, apply_factorization, following_norms, reconstructed_copy
from orprune.network.graph import find_groups
from orprune.network.residual_targets import ResidualTarget, Tap, TargetOffset, find_residual_targets
from orprune.network.surgery import ConsumerUpdate, PruningPlan, apply_pruning, masked_copy
from orprune.network.units import Consumer, ExcludedGroup, PrunableUnit, PruningGraph

__all__ = [
    "Consumer",
    "ConsumerUpdate",
    "CostModel",
    "ExcludedGroup",
    "LayerFactors",
    "NetworkCosts",
    "PrunableUnit",
    "PruningGraph",
    "PruningPlan",
    "ResidualTarget",
    "Tap",
    "TargetCache",
    "TargetOffset",
    "apply_factorization",
    "apply_pruning",
    "collect_statistics",
    "count_macs_params",
    "find_groups",
    "find_residual_targets",
    "following_norms",
    "masked_copy",
    "network_costs",
    "reconstructed_copy",
]
