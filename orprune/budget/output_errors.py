"""Output-space error curves: what pruning one unit alone does to the network's output.

The allocation MILP sums one error per unit. The layer curves measure each unit's reconstruction
error relative to its own output, which says nothing about how much of it reaches the logits: an
error in a residual stream or early in the network travels further than one in a last block. Here
each unit is pruned alone, to every candidate keep count, with the channels of its curve and its
consumers refitted, and the error is measured where it matters,

    e_j(k) = ||f_masked(X) - f(X)||^2 / ||f(X)||^2        (X: a probe subset of the calibration inputs),

so that the MILP's sum is a first-order model of the whole network's output error
(``formulations/global_allocation.md``, section "Output-space errors").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from orprune.budget.curves import ErrorCurve
from orprune.network.graph import call_model
from orprune.network.surgery import ConsumerUpdate, PruningPlan, masked_copy
from orprune.network.units import PruningGraph

__all__ = ["output_error_curves", "probe_batches"]

#: Updates of a unit's consumers for a kept channel set: (unit name, kept indices) -> {consumer: update}.
UpdateFn = Callable[[str, np.ndarray], Mapping[str, ConsumerUpdate]]


def _leaves(output: Any) -> list[torch.Tensor]:
    """The tensors of a model output (a tensor, or tuples / lists / dicts of them)."""
    if torch.is_tensor(output):
        return [output]
    if isinstance(output, Mapping):
        return [t for v in output.values() for t in _leaves(v)]
    if isinstance(output, (tuple, list)):
        return [t for v in output for t in _leaves(v)]
    return []


def probe_batches(batches: Sequence[Any], n_images: int) -> list[Any]:
    """The first calibration batches holding at least ``n_images`` inputs (all of them if fewer)."""
    if n_images < 1:
        raise ValueError(f"`probe_images` must be a positive integer, got {n_images}.")
    chosen, seen = [], 0
    for batch in batches:
        chosen.append(batch)
        seen += len(batch) if torch.is_tensor(batch) else 1
        if seen >= n_images:
            break
    return chosen


@torch.no_grad()
def _outputs(model: nn.Module, batches: Sequence[Any]) -> list[torch.Tensor]:
    return [t.detach().double() for b in batches for t in _leaves(call_model(model, b))]


def output_error_curves(
    model: nn.Module,
    graph: PruningGraph,
    curves: Mapping[str, ErrorCurve],
    updates: UpdateFn,
    batches: Sequence[Any],
    *,
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """Each unit's relative output error at each keep count of its curve, the unit pruned alone.

    Parameters
    ----------
    model : nn.Module
        The unpruned model (put in eval mode, otherwise not modified).
    graph : PruningGraph
        Its prunable units.
    curves : mapping unit name -> ErrorCurve
        The layer curves: their keep counts and masks are the ones measured.
    updates : callable (unit name, kept indices) -> {consumer name: ConsumerUpdate}
        The refit of the unit's consumers on its kept channels.
    batches : sequence of model inputs
        The probe inputs.

    Returns
    -------
    dict unit name -> array, aligned with ``curves[unit].keep_counts``; 0 where nothing is removed.
    """
    model = model.eval()
    reference = _outputs(model, batches)
    scale = sum(float((r**2).sum()) for r in reference)
    if not reference or scale <= 0.0 or not np.isfinite(scale):
        raise ValueError("the model's output on the probe inputs is empty, zero or not finite: "
                         "output errors cannot be relative to it.")
    errors = {}
    bar = tqdm(total=sum(int((curves[u.name].keep_counts < u.n_channels).sum()) for u in graph.units),
               desc="output errors", disable=not progress, leave=False)
    for unit in graph.units:
        counts = curves[unit.name].keep_counts
        errors[unit.name] = np.zeros(counts.size)
        for i, k in enumerate(counts):
            if k >= unit.n_channels:
                continue
            kept = np.flatnonzero(curves[unit.name].mask_for(int(k)))
            masked = masked_copy(model, graph, PruningPlan({unit.name: kept}, dict(updates(unit.name, kept))))
            out = _outputs(masked.eval(), batches)
            errors[unit.name][i] = sum(float(((o - r) ** 2).sum()) for o, r in zip(out, reference)) / scale
            bar.update()
    bar.close()
    return errors
