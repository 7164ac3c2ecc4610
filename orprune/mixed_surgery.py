"""The surgery of a real mix: pruned consumers and factorized layers refitted together, in forward order.

Pruning the channels first (:meth:`orprune.Pruner.apply`, its consumers refitted on the channel-pruned network)
and factorizing afterwards leaves every pruned consumer *downstream* of a factorized layer fitted to inputs the
final network never produces: the factorization's error reaches it unabsorbed. Here one working copy (dropped
channels zero, factorized layers as their products) is refitted layer by layer in the order the forward pass
runs them, each changed layer on inputs from the network with every earlier change already made, targets from
the original (with the residual correction): a pruned consumer by the least-squares refit on its kept channels
(as the pruner's), a factorized layer by the closed form of its rank (``formulations/low_rank.md``, sections 2
and 10).
"""

from __future__ import annotations

import time
import types
from collections.abc import Mapping
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from orprune._pipeline_steps import forward_order
from orprune.budget.allocation import Allocation
from orprune.network.calibration import collect_statistics
from orprune.network.costs import count_macs_params
from orprune.network.factorization import LayerFactors, reconstructed_copy
from orprune.network.residual_targets import find_residual_targets
from orprune.network.surgery import PruningPlan, apply_pruning, masked_copy, write_updates
from orprune.prune_result import PruneResult

__all__ = ["joint_refit", "joint_surgery"]


def joint_surgery(fitted: Any, allocation: Allocation, ranks: Mapping[str, int]) -> tuple[PruneResult,
                                                                                           dict[str, LayerFactors]]:
    """The channel stage of a mix (``allocation.keep``: unit -> count) as a :class:`~orprune.PruneResult` whose
    refits saw the factorized layers (:func:`joint_refit`), and the factors, for ``MixedPruner.apply``."""
    start = time.perf_counter()
    p = fitted.pruner_
    keep = {u: np.flatnonzero(p.curves_[u].mask_for(int(k))) for u, k in allocation.keep.items()}
    pruned_keep = {u.name: keep[u.name] for u in p.graph_.units if keep[u.name].size < u.n_channels}
    plan, factors = joint_refit(fitted, pruned_keep, ranks)
    model = apply_pruning(p.model_, p.graph_, plan, p.example_inputs_)
    macs_after, params_after = count_macs_params(model, p.example_inputs_)
    report = tuple(p._report(u.name, int(keep[u.name].size)) for u in p.graph_.units)
    return PruneResult(model=model, macs_before=p.macs_before_, macs_after=macs_after, params_before=p.params_before_,
                       params_after=params_after, report=report, allocation=allocation, plan=plan,
                       prune_time=time.perf_counter() - start), factors


def joint_refit(fitted: Any, pruned_keep: Mapping[str, np.ndarray],
                ranks: Mapping[str, int]) -> tuple[PruningPlan, dict[str, LayerFactors]]:
    """The pruning plan (kept channels, refitted consumers) and the factors of a mix, refitted in one pass.

    Parameters
    ----------
    fitted : MixedPruner
        Fitted, with a sequential pruner (``sequential=True``).
    pruned_keep : mapping unit -> kept channel indices
        The pruned units only.
    ranks : mapping layer -> rank
        The factorized layers only.
    """
    p = fitted.pruner_
    original, example = p.model_, p.example_inputs_
    consumers = {c.name: c for c in p.consumer_order_ if any(r.unit in pruned_keep for r in p.graph_.readers(c.name))}
    overlap = set(consumers) & set(ranks)
    if overlap:
        raise ValueError(f"layers {sorted(overlap)} are factorized and read pruned units.")
    layers = [types.SimpleNamespace(name=n) for n in ranks]
    order = [c.name for c in forward_order(original, [*consumers.values(), *layers], example)]
    found = find_residual_targets(original, list(ranks), example) if p.residual_targets and ranks else {}
    keep = dict(pruned_keep)
    updates: dict[str, Any] = {}
    factors: dict[str, LayerFactors] = {}
    working = masked_copy(original, p.graph_, PruningPlan(keep, {}))
    for name in tqdm(order, desc="joint refit", disable=not p.progress, leave=False):
        if name in consumers:
            c = consumers[name]
            target = p.residual_targets_.get(name)
            offsets = None if target is None else {name: target.offset(original)}
            reference = original if p.targets_ is None else p.targets_
            acc = collect_statistics(working, [c], p.batches_, reference=reference, offsets=offsets,
                                     positions_per_image=p.positions_per_image, seed=p.seed, progress=False,
                                     float32=p.float32_statistics)[name]
            updates[name] = p._update(c, keep, acc, p._problem(acc, c, original, check=False))
            write_updates(working, p.graph_, PruningPlan(keep, updates), [name])
        else:
            offsets = {name: found[name].offset(original)} if name in found else None
            acc = collect_statistics(working, [name], p.batches_, reference=original, offsets=offsets,
                                     positions_per_image=p.positions_per_image, seed=p.seed, progress=False)[name]
            factors[name] = fitted._layer_factors(name, original, acc, fitted._problem(name, acc), ranks[name])
            working = reconstructed_copy(working, {name: factors[name]}, fitted.norms_)
    return PruningPlan(keep, updates), factors
