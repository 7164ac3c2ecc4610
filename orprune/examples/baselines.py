"""torch-pruning's pruners at a given MACs budget: the baselines orprune is compared against.

torch-pruning takes a pruning *ratio*, not a MACs budget; a bisection on the ratio finds the
smallest pruning that meets the budget, so both libraries are compared at the same MACs.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence

import torch
import torch.nn as nn
import torch_pruning as tp

from orprune.network.costs import count_macs_params

__all__ = ["torch_pruning_baseline", "recalibrate_batchnorm"]

_IMPORTANCE = {
    "magnitude": lambda: tp.importance.GroupMagnitudeImportance(p=2),
    "taylor": lambda: tp.importance.GroupTaylorImportance(),
    "bn_scale": lambda: tp.importance.BNScaleImportance(),
}



def _classifier(model: nn.Module) -> list[nn.Module]:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1:]


def _pruned(model: nn.Module, example_inputs: torch.Tensor, importance: str, ratio: float,
            calibration: Sequence[tuple[torch.Tensor, torch.Tensor]] | None) -> nn.Module:
    model = copy.deepcopy(model).eval()
    pruner = tp.pruner.MagnitudePruner(
        model, example_inputs, importance=_IMPORTANCE[importance](), pruning_ratio=ratio,
        ignored_layers=_classifier(model), global_pruning=False,
    )
    if importance == "taylor":  # Taylor importance needs gradients of the task loss
        if not calibration:
            raise ValueError("`calibration` with (input, target) batches is required for Taylor importance.")
        model.zero_grad()
        for x, y in calibration:
            nn.functional.cross_entropy(model(x), y).backward()
    pruner.step()
    model.zero_grad(set_to_none=True)
    return model


def torch_pruning_baseline(
    model: nn.Module,
    example_inputs: torch.Tensor,
    *,
    macs: float,
    importance: str = "magnitude",
    calibration: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
    tolerance: float = 0.005,
) -> nn.Module:
    """A copy of ``model`` pruned by torch-pruning (uniform ratio per layer) to at most ``macs``
    of its MACs.

    Parameters
    ----------
    macs : float
        Fraction of the original MACs to keep, in (0, 1].
    importance : {"magnitude", "taylor", "bn_scale"}
    calibration : sequence of (input, target) batches
        Needed for ``"taylor"`` only.
    tolerance : float
        Bisection stops when the kept fraction is within this of ``macs`` (always below it).
    """
    if importance not in _IMPORTANCE:
        raise ValueError(f"`importance` must be one of {sorted(_IMPORTANCE)}, got {importance!r}.")
    if not 0 < macs <= 1:
        raise ValueError(f"`macs` must be a fraction in (0, 1], got {macs}.")
    base, _ = count_macs_params(model, example_inputs)

    def kept(ratio: float) -> tuple[float, nn.Module]:
        candidate = _pruned(model, example_inputs, importance, ratio, calibration)
        return count_macs_params(candidate, example_inputs)[0] / base, candidate

    # ratio 0 keeps everything; torch-pruning skips layers it would empty, so ratios near 1 keep
    # *more*: 0.9 is the largest ratio that reliably prunes every layer of a wide network. On narrow
    # ones (4 channels: 0.9 empties them) it can keep everything, so then a grid finds the first
    # ratio that meets the budget, and the bisection runs below it.
    low, high = 0.0, 0.9
    fraction, best = kept(high)
    best_fraction = fraction
    if fraction > macs:
        best = None
        for ratio in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8):
            fraction, candidate = kept(ratio)
            if fraction <= macs:
                best, best_fraction, high = candidate, fraction, ratio
                break
            low = ratio
        if best is None:
            raise ValueError(f"torch-pruning cannot reach {macs:.3f} of the MACs (min {fraction:.3f}).")
    for _ in range(20):
        if macs - best_fraction <= tolerance:
            break
        ratio = 0.5 * (low + high)
        fraction, candidate = kept(ratio)
        if fraction <= macs:
            best, best_fraction, high = candidate, fraction, ratio
        else:
            low = ratio
    return best


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor]) -> nn.Module:
    """Re-estimate BatchNorm running statistics on ``batches`` (in place; returns ``model``).

    Pruning without reconstruction shifts every activation distribution; re-estimating the
    statistics is the cheap repair a fair baseline includes (design.md, section 8).
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over all batches
    model.eval()  # only BatchNorm layers learn statistics; dropout and friends stay off
    for bn in bns:
        bn.train()
    for x in batches:
        model(x[0] if isinstance(x, (tuple, list)) else x)
    model.eval()
    for bn, momentum in zip(bns, saved):
        bn.momentum = momentum
    return model
