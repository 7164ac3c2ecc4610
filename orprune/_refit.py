"""The prune phase's refit (design.md, section 3, step 5): least-squares weights and compensated biases of every
consumer reading a pruned unit, for :meth:`orprune.Pruner.apply`.

Sequential mode refits the consumers in the order they run, each on inputs from the masked model with every
earlier consumer already refitted, against the original model's targets (the :class:`TargetCache` of
:meth:`orprune.Pruner.fit`), with the residual-target correction where it applies
(``formulations/least_squares_reconstruction.md``, section 6).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch.nn as nn
from tqdm.auto import tqdm

from orprune.layer.problem import LayerProblem, StatisticsAccumulator
from orprune.layer.tied import block_diagonal
from orprune.layer.wide import WideAccumulator
from orprune.network.calibration import TargetCache, collect_statistics
from orprune.network.graph import Consumer, weight_matrix
from orprune.network.residual_targets import ResidualTarget
from orprune.network.streaming import StreamUnsupported, stream_refit
from orprune.network.surgery import ConsumerUpdate, PruningPlan, masked_copy, write_updates
from orprune.network.units import PruningGraph
from orprune.prune_result import RefitReport

__all__ = ["consumer_problem", "consumer_update", "has_intercept", "refit_updates"]

_log = logging.getLogger(__name__)


def has_intercept(consumer: Consumer, model: nn.Module) -> bool:
    """Whether the refit has an intercept: the layer has a bias, or a BatchNorm to fold one into.
    Otherwise a new bias would add parameters and MACs the cost model does not price."""
    return (getattr(model.get_submodule(consumer.name), "bias", None) is not None
            or consumer.norm is not None or bool(consumer.norms))


def consumer_problem(acc: StatisticsAccumulator, consumer: Consumer, model: nn.Module, ridge: float,
                     check: bool = True) -> LayerProblem:
    """One consumer's least-squares problem from its statistics, ``ridge`` relative to the mean Gram diagonal.

    ``check=False``: a refit's statistics, used once: no weights (magnitude baseline), no consistency checks.
    A wide consumer's statistics give its compressed selection problem with an exact refit
    (``formulations/wide_consumers.md``).
    """
    if isinstance(acc, WideAccumulator):
        center = has_intercept(consumer, model)
        scale = acc.mean_diagonal(center=center)
        return acc.to_problem(ridge=ridge * (scale if scale > 0 else 1.0), center=center,
                              weights=weight_matrix(model.get_submodule(consumer.name)).detach())
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
    max_bytes: int | None = None,
) -> tuple[dict[str, ConsumerUpdate], RefitReport]:
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
    max_bytes : int, optional
        Sequential mode: the most bytes of activations the streamed refit
        (:func:`orprune.network.streaming.stream_refit`) may hold (beyond, it recomputes from checkpoints);
        None: no limit; 0: one pass of :func:`collect_statistics` per consumer, also for models the stream does
        not support (the same updates).

    Returns
    -------
    updates : dict consumer -> ConsumerUpdate
    report : RefitReport
        Which path ran (``"stream"``, ``"passes"`` and why, ``"parallel"``), its time and memory.
    """
    start = time.perf_counter()
    readers = [c for c in order if any(r.unit in pruned_keep for r in graph.readers(c.name))]
    if not sequential:
        updates = {c.name: consumer_update(c, pruned_keep, statistics[c.name], problems[c.name], graph, model)
                   for c in readers}
        return updates, RefitReport("parallel", len(readers), time.perf_counter() - start)
    updates: dict[str, ConsumerUpdate] = {}
    keep = dict(pruned_keep)
    offsets = {c.name: residual_targets[c.name].offset(model) for c in readers if c.name in residual_targets}
    by_name = {c.name: c for c in readers}
    working = masked_copy(model, graph, PruningPlan(keep, {}))

    def refit(name: str, acc: StatisticsAccumulator) -> None:
        """Solve one consumer from its statistics (used once: no checks) and write it into the working copy."""
        consumer = by_name[name]
        updates[name] = consumer_update(consumer, keep, acc, consumer_problem(acc, consumer, model, ridge, check=False),
                                        graph, model)
        write_updates(working, graph, PruningPlan(keep, updates), [name])

    reason = "no consumer to refit" if not readers else None
    if readers and targets is None:
        reason = "no target cache (`cache_targets=False`)"
    elif readers and max_bytes is not None and max_bytes <= 0:
        reason = "streaming is off (`refit_memory=0`)"
    elif readers:
        try:
            stats = stream_refit(working, [c.name for c in readers], batches, targets, refit,
                                 offsets=offsets, float32=float32, max_bytes=max_bytes)
        except Exception as exc:  # StreamUnsupported before any refit; anything else: start again, one pass each
            reason = str(exc) if isinstance(exc, StreamUnsupported) else (
                f"the streamed pass failed ({type(exc).__name__}: {exc})")
            if updates:
                updates.clear()
                working = masked_copy(model, graph, PruningPlan(keep, {}))
        else:
            _log.debug("refit: streamed, %d consumers in %.2f forward passes (peak %.0f MB held)", len(readers),
                       stats.passes, stats.peak_bytes / 2**20)
            return updates, RefitReport("stream", len(readers), time.perf_counter() - start,
                                        peak_bytes=stats.peak_bytes, estimated_bytes=stats.estimated_bytes,
                                        passes=stats.passes)
    if readers:
        _log.debug("refit: one pass per consumer for %d consumers (%s)", len(readers), reason)
    # One pass per consumer, in the order they run: each refits on inputs from the network with every
    # earlier consumer already refitted and every dropped channel zero (the masked model),
    # so a residual stream's readers each see the stream as pruned up to their own depth.
    # A consumer feeding a residual add also absorbs the other operand's error as the masked
    # network has it now: of two consumers on one add, the later absorbs what the first left.
    # One working copy (the masked model) gets each refit written as it is made, instead of a
    # copy of the model per consumer.
    reference = model if targets is None else targets
    for consumer in tqdm(readers, desc="refit", disable=not progress, leave=False):
        own = {consumer.name: offsets[consumer.name]} if consumer.name in offsets else None
        stats = collect_statistics(working, [consumer], batches, reference=reference, offsets=own,
                                   positions_per_image=positions_per_image, seed=seed, progress=False,
                                   float32=float32)
        refit(consumer.name, stats.pop(consumer.name))
    return updates, RefitReport("passes", len(readers), time.perf_counter() - start, reason=reason)
