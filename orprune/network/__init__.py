"""Stage 2, a torch network: its prunable units, calibration statistics, costs and surgery.

Tracing (torch-pruning's dependency graph -> units and consumers), calibration streams and patches, residual
targets, MACs / params cost models, measured latency tables, the physical removal, the factorized (low-rank)
surgery and the block-diagonal layer of partition pruning. May import the core and :mod:`orprune.layer`.
"""

from orprune.network.calibration import TargetCache, collect_statistics
from orprune.network.cost_model import CostModel, TableCost
from orprune.network.costs import NetworkCosts, count_macs_params, network_costs
from orprune.network.factorization import LayerFactors, apply_factorization, following_norms, reconstructed_copy
from orprune.network.graph import find_groups
from orprune.network.latency import LatencyModel, latency_tables
from orprune.network.partition_surgery import PartitionedLinear, partition_module
from orprune.network.residual_targets import ResidualTarget, Tap, TargetOffset, find_residual_targets
from orprune.network.stages import stage_ties
from orprune.network.surgery import ConsumerUpdate, PruningPlan, apply_pruning, masked_copy
from orprune.network.units import Consumer, ExcludedGroup, PrunableUnit, PruningGraph

__all__ = [
    "Consumer",
    "ConsumerUpdate",
    "CostModel",
    "ExcludedGroup",
    "LatencyModel",
    "LayerFactors",
    "NetworkCosts",
    "PartitionedLinear",
    "PrunableUnit",
    "PruningGraph",
    "PruningPlan",
    "ResidualTarget",
    "TableCost",
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
    "latency_tables",
    "masked_copy",
    "network_costs",
    "partition_module",
    "reconstructed_copy",
    "stage_ties",
]
