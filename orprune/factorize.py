"""Low-rank factorization of a whole network under a MACs / params budget (issue 23).

1. Calibration statistics of every ``Linear`` / ``Conv2d`` (``groups=1``) layer, as for pruning
   (:func:`orprune.collect_statistics`, centred, relative ridge).
2. Per layer, the certified error of every rank from one SVD (:func:`orprune.rank_curve`).
3. The allocation MILP (:func:`orprune.allocate`) picks per layer a rank or "keep the layer", minimising the
   summed relative errors under the budgets. Each option is labelled by its MACs, an integer, so every
   budget is linear in the labels (``formulations/low_rank.md``, section 7).
4. Each chosen layer gets its optimal rank-``r`` map (:func:`orprune.select_rank`), refitted in forward order
   on inputs from the already factorized network (targets from the original), and becomes two layers
   (:func:`orprune.apply_factorization`).
"""

from __future__ import annotations

import copy
import time
import types
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from orprune._pipeline_steps import batch_inputs, check_fraction, forward_order, keep_options
from orprune.budget.allocation import Allocation, AllocationProblem, allocate
from orprune.layer.low_rank import RankCurve, rank_curve, select_rank
from orprune.layer.problem import LayerProblem, StatisticsAccumulator
from orprune.network.calibration import DEFAULT_POSITIONS_PER_IMAGE, TargetCache, collect_statistics
from orprune.network.cost_model import CostModel
from orprune.network.costs import count_macs_params
from orprune.network.factorization import LayerFactors, apply_factorization, factorizable_layers, following_norms
from orprune.network.graph import DEFAULT_MAX_FEATURES, call_model, weight_matrix
from orprune.network.residual_targets import find_residual_targets

__all__ = ["FactorizeResult", "LayerRank", "factorize", "factorization_options", "output_positions"]


@dataclass(frozen=True)
class LayerRank:
    """One layer of a :class:`FactorizeResult`.

    Attributes
    ----------
    name : str
    rank : int or None
        The rank of the two-layer form, None when the layer is kept whole.
    max_rank : int
        ``min(C*kh*kw, N)``.
    relative_error : float
        Certified optimal ``e(rank) / ||Y||^2`` on the original statistics (0 when kept whole).
    macs_before, macs_after : int
        The layer's multiply-accumulates per sample (weights only, without bias).
    """

    name: str
    rank: int | None
    max_rank: int
    relative_error: float
    macs_before: int
    macs_after: int


@dataclass(frozen=True)
class FactorizeResult:
    """Outcome of :func:`factorize`.

    Attributes
    ----------
    model : nn.Module
        The factorized copy (factorized layers are ``nn.Sequential`` of two layers under their names).
    macs_before, macs_after, params_before, params_after : int
        As torch-pruning's counter reports them (:func:`orprune.count_macs_params`).
    layers : tuple of LayerRank
    allocation : Allocation
        The MILP's certificate; its ``keep`` maps each layer to the MACs of its chosen option.
    curves : mapping name -> RankCurve
    factors : mapping name -> LayerFactors
    factorize_time : float
    """

    model: nn.Module
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    layers: tuple[LayerRank, ...]
    allocation: Allocation
    curves: Mapping[str, RankCurve]
    factors: Mapping[str, LayerFactors]
    factorize_time: float

    @property
    def ranks(self) -> dict[str, int | None]:
        return {layer.name: layer.rank for layer in self.layers}


def output_positions(model: nn.Module, names: list[str], example_inputs: Any) -> dict[str, int]:
    """Output positions per sample of each layer (H_out W_out of a conv, rows of a Linear)."""
    found: dict[str, int] = {}

    def hook(name: str, module: nn.Module, out: torch.Tensor) -> None:
        per_channel = out.shape[1] if isinstance(module, nn.Conv2d) else out.shape[-1]
        found.setdefault(name, int(out.numel() // (out.shape[0] * per_channel)))

    handles = [model.get_submodule(n).register_forward_hook(lambda m, _a, out, n=n: hook(n, m, out)) for n in names]
    try:
        with torch.no_grad():
            call_model(model, example_inputs)
    finally:
        for h in handles:
            h.remove()
    return found


def factorization_options(n_features: int, n_outputs: int, positions: int, max_options: int = 32,
                          min_rank: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """``(ranks, macs)`` of a layer's options: the ranks whose two-layer form costs fewer MACs than the
    layer (a grid of at most ``max_options - 1``), then rank -1 standing for the whole layer, last.

    MACs per sample: ``P r (n_features + n_outputs)`` for rank ``r``, ``P n_features n_outputs`` whole.
    """
    whole = positions * n_features * n_outputs
    below = (n_features * n_outputs - 1) // (n_features + n_outputs)  # largest r with r (n + m) < n m
    ranks = keep_options(max(below, 0), max(max_options - 1, 1), min_rank) if below >= min_rank else np.zeros(0, int)
    ranks = ranks[ranks >= min_rank]
    macs = positions * ranks * (n_features + n_outputs)
    return np.r_[ranks, -1].astype(int), np.r_[macs, whole].astype(np.int64)


def factorize(
    model: nn.Module,
    calibration: Iterable[Any],
    *,
    macs: float | None = None,
    params: float | None = None,
    ridge: float = 1e-4,
    positions_per_image: int | None = DEFAULT_POSITIONS_PER_IMAGE,
    max_options: int = 32,
    min_rank: int = 1,
    ignored_layers: Iterable[nn.Module | str] = (),
    max_features: int = DEFAULT_MAX_FEATURES,
    sequential: bool = True,
    residual_targets: bool = True,
    time_limit: float | None = None,
    progress: bool = False,
    seed: int = 0,
) -> FactorizeResult:
    """Factorize ``model``'s layers into two thinner ones, ranks chosen by the allocation MILP.

    .. math::

        \\min_{o}\\ \\sum_l \\frac{e_l(r_{o_l})}{\\|Y_l\\|^2}
        \\quad\\text{s.t.}\\quad \\sum_l \\mathrm{MACs}_l(o_l) + \\mathrm{MACs}_{\\text{rest}} \\le \\beta,

    with :math:`e_l(r)` the certified optimal error of rank ``r`` (:func:`orprune.rank_curve`) and
    option ``o_l`` a rank or the whole layer (error 0). See ``formulations/low_rank.md``, section 7.

    Parameters
    ----------
    model : nn.Module
        Not modified.
    calibration : iterable
        Input tensors or (input, target) batches.
    macs, params : float, optional
        Fractions of the original MACs / parameters to keep at most, in (0, 1]. At least one.
    ridge : float, default 1e-4
        Ridge of each layer's least squares, relative to the mean diagonal of its Gram matrix.
    positions_per_image : int or None
        Sampled output positions per image for conv layers.
    max_options : int, default 32
        Options per layer offered to the allocation (a grid of ranks, and the whole layer).
    min_rank : int, default 1
    ignored_layers : iterable of nn.Module or str
        Layers never factorized.
    max_features : int
        Layers whose design matrix would have more columns (``C*kh*kw`` or ``in_features``) are left
        whole, with a warning.
    sequential : bool, default True
        Refit each chosen layer, in forward order, on inputs from the network with the earlier layers
        already factorized (targets from the original model); False uses the original statistics.
    residual_targets : bool, default True
        In sequential mode, a layer whose output (after its BatchNorm) is added to a residual stream is
        refitted to reproduce the original *sum*, absorbing the other operand's error, as
        :class:`orprune.Pruner` does (``formulations/least_squares_reconstruction.md``, section 6).
    time_limit : float, optional
        Seconds for the allocation MILP.
    progress : bool, default False
    seed : int

    Returns
    -------
    FactorizeResult
    """
    start = time.perf_counter()
    macs, params = check_fraction(macs, "macs"), check_fraction(params, "params")
    if macs is None and params is None:
        raise ValueError("give a budget: `macs` and/or `params` as a fraction in (0, 1].")
    if not (isinstance(ridge, (int, float)) and np.isfinite(ridge) and ridge >= 0):
        raise ValueError(f"`ridge` must be a finite number >= 0, got {ridge!r}.")
    for name, value in (("max_options", max_options), ("min_rank", min_rank), ("max_features", max_features)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
    if not isinstance(model, nn.Module):
        raise ValueError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
    batches = [batch_inputs(b).detach() if torch.is_tensor(batch_inputs(b)) else batch_inputs(b) for b in calibration]
    if not batches:
        raise ValueError("`calibration` is empty: factorization needs at least one batch of inputs.")
    names = factorizable_layers(model, ignored_layers)  # on the user's model: ignored modules are its own
    original = copy.deepcopy(model).eval()
    example = batches[0][:1] if torch.is_tensor(batches[0]) else batches[0]
    if not names:
        raise ValueError("the model has no Linear or Conv2d (groups=1) layer to factorize.")
    positions = output_positions(original, names, example)
    names = [n for n in names if n in positions]  # layers the forward pass never runs are left alone
    wide = [n for n in names if weight_matrix(original.get_submodule(n)).shape[0] > max_features]
    if wide:
        warnings.warn(f"layers {wide} have more than `max_features` = {max_features} input features and are "
                      "left whole.", UserWarning, stacklevel=2)
        names = [n for n in names if n not in wide]
    if not names:
        raise ValueError("no layer of the model can be factorized (see `ignored_layers` and `max_features`).")
    macs_before, params_before = count_macs_params(original, example)
    cache = TargetCache() if sequential else None
    found = find_residual_targets(original, names, example) if sequential and residual_targets else {}
    offsets = {n: t.offset(original) for n, t in found.items()}  # the cache keeps the original operands
    stats = collect_statistics(original, names, batches, cache=cache, offsets=offsets or None,
                               positions_per_image=positions_per_image, seed=seed, progress=progress)
    problems = {n: _problem(stats[n], ridge) for n in names}
    curves = {n: rank_curve(p) for n, p in problems.items()}
    options, labels, errors = {}, {}, {}
    for n, p in problems.items():
        ranks, cost = factorization_options(p.n_features, p.n_outputs, positions[n], max_options, min_rank)
        options[n], labels[n] = ranks, cost
        errors[n] = np.r_[curves[n].relative_errors[ranks[:-1]], 0.0]
    allocation = _allocate(original, names, positions, labels, errors, macs_before, params_before,
                           macs, params, time_limit)
    chosen = {n: int(options[n][np.flatnonzero(labels[n] == allocation.keep[n])[0]]) for n in names}
    factored = [n for n in names if chosen[n] >= 0]
    norms = following_norms(original, example, factored)
    factors: dict[str, LayerFactors] = {}
    order = [c.name for c in forward_order(original, [types.SimpleNamespace(name=n) for n in factored], example)]
    for n in tqdm(order, desc="refit", disable=not progress, leave=False):
        if sequential:
            working = apply_factorization(original, factors, norms)
            offset = {n: offsets[n]} if n in offsets else None
            acc = collect_statistics(working, [n], batches, reference=cache, offsets=offset,
                                     positions_per_image=positions_per_image, seed=seed, progress=False)[n]
            prob = _problem(acc, ridge)
        else:
            acc, prob = stats[n], problems[n]
        factors[n] = _factors(original.get_submodule(n), acc, prob, chosen[n])
    result_model = apply_factorization(original, factors, norms)
    macs_after, params_after = count_macs_params(result_model, example)
    for what, fraction, before, after in (("macs", macs, macs_before, macs_after),
                                          ("params", params, params_before, params_after)):
        if fraction is not None and after > fraction * before * (1 + 1e-9):
            warnings.warn(f"factorized model has {after:,} {what}, above the budget {fraction * before:,.0f}.",
                          RuntimeWarning, stacklevel=2)
    layers = tuple(
        LayerRank(name=n, rank=None if chosen[n] < 0 else chosen[n], max_rank=curves[n].max_rank,
                  relative_error=0.0 if chosen[n] < 0 else float(curves[n].relative_errors[chosen[n]]),
                  macs_before=int(labels[n][-1]), macs_after=int(allocation.keep[n]))
        for n in names)
    return FactorizeResult(model=result_model, macs_before=macs_before, macs_after=macs_after,
                           params_before=params_before, params_after=params_after, layers=layers,
                           allocation=allocation, curves=types.MappingProxyType(curves),
                           factors=types.MappingProxyType(factors), factorize_time=time.perf_counter() - start)


def _problem(acc: StatisticsAccumulator, ridge: float) -> LayerProblem:
    gram, cross, yy = acc.statistics(center=True)
    return LayerProblem(gram, cross, yy, ridge=ridge * float(np.mean(np.diag(gram))))


def _factors(module: nn.Module, acc: StatisticsAccumulator, prob: LayerProblem, rank: int) -> LayerFactors:
    """The optimal rank-``rank`` factors and the compensated bias ``old_bias + mean_y - mean_x W``."""
    sel = select_rank(prob, rank)
    mean_x, mean_y = acc.means()
    old = module.bias.detach().double().numpy() if module.bias is not None else 0.0
    return LayerFactors(sel.left, sel.right, old + mean_y - mean_x @ sel.weights)


def _allocate(model: nn.Module, names: list[str], positions: Mapping[str, int], labels: Mapping[str, np.ndarray],
              errors: Mapping[str, np.ndarray], macs_before: int, params_before: int, macs: float | None,
              params: float | None, time_limit: float | None) -> Allocation:
    """The allocation MILP over the options labelled by their MACs (linear in every budget)."""
    whole = {n: float(labels[n][-1]) for n in names}
    weights = {n: int(weight_matrix(model.get_submodule(n)).numel()) for n in names}
    costs = {
        # the rest of the network (biases, BatchNorms, other layers) is a constant
        "macs": CostModel(constant=macs_before - sum(whole.values()), linear={n: 1.0 for n in names}),
        # a layer's weights are its MACs divided by its positions, whole or factorized
        "params": CostModel(constant=params_before - sum(weights.values()),
                            linear={n: 1.0 / positions[n] for n in names}),
    }
    budgets = {k: f * total for k, f, total in (("macs", macs, macs_before), ("params", params, params_before))
               if f is not None}
    problem = AllocationProblem(options=dict(labels), errors=dict(errors))
    try:
        return allocate(problem, costs=costs, budgets=budgets, time_limit=time_limit)
    except ValueError as exc:
        raise ValueError(f"the budget cannot be met by factorizing the layers: {exc}") from exc
