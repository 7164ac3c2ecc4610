"""What removing one channel saves, per SPR channel group: the prices of a cost-weighted penalty.

The indicator MIP with a budget ``sum_j cost_j z_j <= B`` instead of a cardinality, relaxed in the
Lagrangian way, charges each group ``lam * cost_j`` for keeping it
(``formulations/perspective_regularizer.md``, section 10). The cost of a channel is the network's
MACs (or parameters) at full width minus those with one channel of its unit removed, from the
same cost polynomials the allocation MILP uses (:func:`orprune.network.costs.network_costs`, which counts
as torch-pruning's ``count_ops_and_params`` does).
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from torch import nn

from orprune.network.costs import network_costs
from orprune.network.graph import find_groups
from orprune.spr.groups import ChannelGroup

__all__ = ["channel_group_costs"]

COST_KINDS = ("macs", "params")


def channel_group_costs(model: nn.Module, groups: Sequence[ChannelGroup], example_inputs: Any,
                        kind: str = "macs") -> np.ndarray:
    """MACs (or parameters) saved by removing each group's channel alone, shape ``(len(groups),)``.

    Every channel of one prunable unit saves the same amount at full width (the cost is affine in
    each unit's keep count when the others are fixed). A group whose channel belongs to no prunable
    unit of :func:`orprune.find_groups` (an unusual coupling) gets the median of the others, with a
    warning.
    """
    if kind not in COST_KINDS:
        raise ValueError(f"`costs` must be one of {COST_KINDS}, an array or None; got {kind!r}.")
    # both trace through build_dependency_graph: eval mode, every module's training flag restored
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # excluded groups: handled below
        graph = find_groups(model, example_inputs, max_features=sys.maxsize, residual=True)
    cost_model = getattr(network_costs(model, graph, example_inputs), kind)
    full = dict(graph.n_channels)
    base = cost_model.evaluate(full)
    saving = {u: base - cost_model.evaluate({**full, u: full[u] - 1}) for u in full}
    owner = {m: unit.name for unit in graph.units for m in (unit.root, *unit.carried)}
    costs = np.full(len(groups), np.nan)
    for j, group in enumerate(groups):
        units = {owner[m.module] for m in group.members if m.dim == "out" and m.module in owner}
        if len(units) == 1:
            costs[j] = saving[units.pop()]
    missing = np.isnan(costs)
    if missing.all():
        raise ValueError("no channel group matches a prunable unit of the model; give `costs` as an array.")
    if missing.any():
        roots = sorted({groups[j].root_module for j in np.flatnonzero(missing)})
        warnings.warn(f"`costs={kind!r}`: no cost found for the channels of {roots}; they get the median cost.",
                      stacklevel=3)
        costs[missing] = np.median(costs[~missing])
    return costs
