"""The prune phase's refit (design.md, section 3, step 5): least-squares weights and compensated biases of every
consumer reading a pruned unit, for :meth:`orprune.Pruner.apply`.

Sequential mode refits the consumers in the order they run, each on inputs from the masked model with every
earlier consumer already refitted, against the original model's targets (the :class:`TargetCache` of
:meth:`orprune.Pruner.fit`), with the residual-target correction where it applies
(``formulations/least_squares_reconstruction.md``, section 6).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch.nn as nn
from tqdm.auto import tqdm

from orprune.layer.problem import LayerProblem, StatisticsAccumulator
from orprune.layer.tied import block_diagonal
from orprune.network.calibration import TargetCache, collect_statistics
from orprune.network.graph import Consumer, weight_matrix
from orprune.network.residual_targets import ResidualTarget
from orprune.network.surgery import ConsumerUpdate, PruningPlan, masked_copy, write_updates
from orprune.network.units import PruningGraph

__all__ = ["consumer_problem", "consumer_update", "has_intercept", "refit_updates"]


def has_intercept(consumer: Consumer, model: nn.Module) -> bool:
    """Whether the refit has an intercept: the layer has a bias, or a BatchNorm to fold one into.
    Otherwise a new bias would add parameters and MACs the cost model does not price."""
    return (getattr(model.get_submodule(consumer.name), "bias", None) is not None
            or consumer.norm is not None or bool(consumer.norms))


def consumer_problem(acc: StatisticsAccumulator, consumer: Consumer, model: nn.Module, ridge: float,
                     check: bool = True) -> LayerProblem:
    """One consumer's least-squares problem from its statistics, ``ridge`` relative to the mean Gram diagonal.

    ``check=False``: a refit's statistics, used once: no weights (magnitude baseline), no consistency checks.
    """
    gram, cross, yy = acc.statistics(center=has_intercept(consumer, model))
    if consumer.groups > 1:  # a grouped conv's own least squares: block-diagonal by group
        gram, cross = block_diagonal(gram, cross, consumer.groups, consumer.group_size)
    scale = float(np.mean(np.diag(gram)))
    # inputs constant over the calibration data have a zero centred Gram matrix: an absolute ridge then
    # gives weights 0 and the bias keeps the (constant) output
    ridge = ridge * (scale if scale > 0 else 1.0)
    if not check:
        return LayerProblem(gram, cross, yy, group_size=consumer.group_size, ridge=ridge, check=False)
    weights = weight_matrix(model.get_submodule(consumer.name)).detach().double().numpy()
    return LayerProblem(gram, cross, yy, group_size=consumer.group_size, ridge=ridge, weights=weights,
                        assume_psd=True)  # accumulated X^T X


def consumer_update(consumer: Consumer, keep: Mapping[str, np.ndarray], acc: StatisticsAccumulator,
                    problem: LayerProblem, graph: PruningGraph, model: nn.Module) -> ConsumerUpdate:
    """Least-squares weights on the kept input channels (of every unit in ``keep`` the layer reads)
    and the compensated bias of one consumer of ``model`` (the original)."""
    mask = graph.input_mask(consumer.name, dict(keep))
    weights, _ = problem.refit(mask)
    if not has_intercept(consumer, model):
        return ConsumerUpdate(weight=weights)
    mean_x, mean_y = acc.means()
    module = model.get_submodule(consumer.name)
    old_bias = module.bias.detach().double().numpy() if getattr(module, "bias", None) is not None else 0.0
    return ConsumerUpdate(weight=weights, bias=old_bias + mean_y - mean_x @ weights)


def refit_updates(
    model: nn.Module,
    graph: PruningGraph,
    pruned_keep: Mapping[str, np.ndarray],
    batches: Sequence[Any],
    *,
    order: Sequence[Consumer],
    statistics: Mapping[str, StatisticsAccumulator],
    problems: Mapping[str, LayerProblem],
    targets: TargetCache | None,
    residual_targets: Mapping[str, ResidualTarget],
    sequential: bool,
    ridge: float,
    positions_per_image: int | None,
    seed: int,
    float32: bool = False,
    progress: bool = False,
) -> dict[str, ConsumerUpdate]:
    """Least-squares weights and biases of every consumer reading a pruned unit.

    Parameters
    ----------
    model : nn.Module
        The original (fitted) model; not modified.
    graph : PruningGraph
    pruned_keep : mapping unit -> kept channel indices
        Only the units that lose channels.
    batches : sequence
        The calibration batches the statistics (and ``targets``) were made from.
    order : sequence of Consumer
        One consumer per layer, in the order a forward pass runs them.
    statistics, problems : mappings consumer -> StatisticsAccumulator / LayerProblem
        The original model's (from :meth:`orprune.Pruner.fit`): the parallel refit's.
    targets : TargetCache or None
        The original model's sampled outputs; None: the original model runs beside each pass.
    residual_targets : mapping consumer -> ResidualTarget
        Consumers refitted to the original *sum* of a residual addition.
    sequential : bool
        False: every consumer refitted on the original inputs (``statistics``).
    ridge, positions_per_image, seed, float32, progress
        As in :class:`orprune.Pruner`.
    """
    readers = [c for c in order if any(r.unit in pruned_keep for r in graph.readers(c.name))]
    if not sequential:
        return {c.name: consumer_update(c, pruned_keep, statistics[c.name], problems[c.name], graph, model)
                for c in readers}
    # Consumers in the order they run: each refits on inputs from the network with every
    # earlier consumer already refitted and every dropped channel zero (the masked model),
    # so a residual stream's readers each see the stream as pruned up to their own depth.
    # A consumer feeding a residual add also absorbs the other operand's error as the masked
    # network has it now: of two consumers on one add, the later absorbs what the first left.
    # One working copy (the masked model) gets each refit written as it is made, instead of a
    # copy of the model per consumer; each pass's statistics are used once (no checks).
    updates: dict[str, ConsumerUpdate] = {}
    reference = model if targets is None else targets
    working = masked_copy(model, graph, PruningPlan(dict(pruned_keep), {}))
    for consumer in tqdm(readers, desc="refit", disable=not progress, leave=False):
        target = residual_targets.get(consumer.name)
        offsets = None if target is None else {consumer.name: target.offset(model)}
        stats = collect_statistics(working, [consumer], batches, reference=reference, offsets=offsets,
                                   positions_per_image=positions_per_image, seed=seed, progress=False,
                                   float32=float32)
        acc = stats.pop(consumer.name)
        updates[consumer.name] = consumer_update(consumer, pruned_keep, acc,
                                                 consumer_problem(acc, consumer, model, ridge, check=False),
                                                 graph, model)
        del acc
        write_updates(working, graph, PruningPlan(dict(pruned_keep), updates), [consumer.name])
    return updates
