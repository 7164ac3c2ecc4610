"""The no-refit baselines users of LLM pruners know, on the same units and budgets.

* ``magnitude``: a channel's score is the squared norm of every weight it owns (its q/k/v or
  gate/up rows and its output-projection columns); the same keep ratio in every unit.
* ``wanda_sp``: Wanda's structured variant, ``sum_j sum_i |W_ij| * ||x_j||_2`` over the channel's
  input columns ``j`` of the output projection; the same keep ratio in every unit.
* ``flap``: FLAP's fluctuation score ``sum_j Var(x_j) * ||W_:j||^2``, standardised within the
  attention units and within the MLP units, the lowest scores removed across all layers until the
  budget is met (its adaptive structure); the removed columns' mean contribution
  ``W_:j mean(x_j)`` is added to the output bias (its bias compensation).
* ``taylor``: LLM-Pruner's first-order Taylor importance, ``sum |w * dL/dw|`` over every weight and
  bias the channel owns (its q/k/v or gate/up rows and its output-projection columns; LLM-Pruner's
  ``param_first``), with ``dL/dw`` the gradient of a loss summed over the calibration batches (by
  default the next-token cross-entropy of a causal LM); the same keep ratio in every unit, as in
  LLM-Pruner's block-wise setting.

None of them changes the kept weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from orprune.layer.problem import StatisticsAccumulator
from orprune.network.cost_model import CostModel
from orprune.transformer.adapters import HEADS, TransformerUnit, is_conv1d, weight_out_in
from orprune.transformer.calibration import run_model
from orprune.transformer.surgery import UnitUpdate

__all__ = ["BASELINES", "channel_scores", "baseline_keep", "baseline_update", "next_token_loss", "taylor_gradients"]

BASELINES = ("magnitude", "wanda_sp", "flap", "taylor")


def next_token_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """Mean next-token cross-entropy of a causal LM on a batch of token ids (a ``(B, T)`` integer
    tensor, or a mapping with ``input_ids``): the loss LLM-Pruner differentiates."""
    ids = batch.get("input_ids") if hasattr(batch, "keys") else batch
    if not (isinstance(ids, torch.Tensor) and ids.dim() == 2 and not ids.is_floating_point()):
        raise ValueError("the default Taylor loss needs batches of token ids ((B, T) integer tensors or "
                         "mappings with `input_ids`); give `loss(model, batch)` to TransformerPruner.")
    logits = getattr(run_model(model, batch), "logits", None)
    if logits is None:
        raise ValueError("the model's output has no `logits`; give `loss(model, batch)` to TransformerPruner.")
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


def taylor_gradients(model: nn.Module, units: list[TransformerUnit], batches: Iterable[Any],
                     loss: Callable[[nn.Module, Any], torch.Tensor] | None = None) -> dict[str, np.ndarray]:
    """``|w * dL/dw|`` of every weight and bias of the units' modules, ``L`` summed over ``batches``
    (``model`` in eval mode, its ``.grad`` untouched). Keys: ``"<module>.weight"`` in ``(out, in)``
    layout and ``"<module>.bias"``."""
    loss = next_token_loss if loss is None else loss
    names = list(dict.fromkeys([m for u in units for m, _, _ in u.rows] + [u.out for u in units]))
    params = {}
    for name in names:
        module = model.get_submodule(name)
        params[f"{name}.weight"] = module.weight
        if getattr(module, "bias", None) is not None:
            params[f"{name}.bias"] = module.bias
    flags = {key: p.requires_grad for key, p in params.items()}
    total = {key: torch.zeros_like(p, dtype=torch.float64) for key, p in params.items()}
    was_training = model.training
    model.eval()
    try:
        for p in params.values():
            p.requires_grad_(True)
        for batch in batches:
            value = loss(model, batch)
            grads = torch.autograd.grad(value, list(params.values()), allow_unused=True)
            for key, grad in zip(params, grads):
                if grad is not None:
                    total[key] += grad.detach().double()
    finally:
        for key, p in params.items():
            p.requires_grad_(flags[key])
        model.train(was_training)
    out = {}
    for key, p in params.items():
        score = (p.detach().double() * total[key]).abs()
        if key.endswith(".weight") and is_conv1d(model.get_submodule(key.rsplit(".", 1)[0])):
            score = score.T  # Conv1D stores (in, out)
        out[key] = score.cpu().numpy()
    return out


def _column_sums(unit: TransformerUnit, per_column: np.ndarray) -> np.ndarray:
    return per_column.reshape(unit.n_channels, unit.group_size).sum(axis=1)


def channel_scores(method: str, model: nn.Module, unit: TransformerUnit, acc: StatisticsAccumulator,
                   taylor: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
    """Importance of each channel of ``unit`` (higher is kept first); ``taylor``: the output of
    :func:`taylor_gradients`, needed by ``method="taylor"``."""
    weight = weight_out_in(model.get_submodule(unit.out)).detach().double().cpu().numpy()
    if method == "taylor":
        if taylor is None:
            raise ValueError("`taylor` (the output of taylor_gradients) is needed for method 'taylor'.")
        score = _column_sums(unit, taylor[f"{unit.out}.weight"].sum(axis=0))
        for module_name, offset, size in unit.rows:
            rows = taylor[f"{module_name}.weight"].sum(axis=1)
            if f"{module_name}.bias" in taylor:
                rows = rows + taylor[f"{module_name}.bias"]
            score = score + rows[offset : offset + unit.n_channels * size].reshape(unit.n_channels, size).sum(axis=1)
        return score
    if method == "magnitude":
        score = _column_sums(unit, (weight**2).sum(axis=0))
        for module_name, offset, size in unit.rows:
            rows = weight_out_in(model.get_submodule(module_name)).detach().double().cpu().numpy()
            block = rows[offset : offset + unit.n_channels * size]
            score = score + (block**2).sum(axis=1).reshape(unit.n_channels, size).sum(axis=1)
        return score
    gram_diag = np.diag(acc.statistics()[0])
    if method == "wanda_sp":
        return _column_sums(unit, np.abs(weight).sum(axis=0) * np.sqrt(np.maximum(gram_diag, 0.0)))
    if method == "flap":
        mean_x = acc.means()[0]
        variance = np.maximum(gram_diag / max(acc.n_samples - 1, 1) - mean_x**2 * acc.n_samples
                              / max(acc.n_samples - 1, 1), 0.0)
        return _column_sums(unit, variance * (weight**2).sum(axis=0))
    raise ValueError(f"`method` must be one of {BASELINES}, got {method!r}.")


def _uniform_keep(units: list[TransformerUnit], cost: CostModel, budget: float, min_channels: int) -> dict[str, int]:
    """The largest common keep ratio within the budget; heads come in coarse steps, so the MLP
    units then share a second common ratio that uses what the heads' rounding left."""
    def keep(ratio: float, fixed: dict[str, int] | None = None) -> dict[str, int]:
        counts = {u.name: int(min(u.n_channels, max(min_channels, round(ratio * u.n_channels)))) for u in units}
        return {**counts, **(fixed or {})}

    def largest(fixed: dict[str, int] | None = None) -> float:
        lo, hi = 0.0, 1.0
        if cost.evaluate(keep(1.0, fixed)) <= budget:
            return 1.0
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if cost.evaluate(keep(mid, fixed)) <= budget else (lo, mid)
        return lo

    first = keep(largest())
    heads = {u.name: first[u.name] for u in units if u.kind == HEADS}
    return keep(largest(heads), heads)


def _global_keep(units: list[TransformerUnit], scores: Mapping[str, np.ndarray], cost: CostModel, budget: float,
                 min_channels: int) -> dict[str, np.ndarray]:
    kept = {u.name: np.ones(u.n_channels, dtype=bool) for u in units}
    standard = {}
    for kind in {u.kind for u in units}:
        pooled = np.concatenate([scores[u.name] for u in units if u.kind == kind])
        mean, std = pooled.mean(), max(pooled.std(), np.finfo(float).tiny)
        standard.update({u.name: (scores[u.name] - mean) / std for u in units if u.kind == kind})
    order = sorted(((float(standard[u.name][c]), u.name, c) for u in units for c in range(u.n_channels)))
    total = cost.evaluate({u.name: u.n_channels for u in units})
    for _score, name, c in order:
        if total <= budget:
            break
        if kept[name].sum() <= min_channels:
            continue
        kept[name][c] = False
        total -= cost.linear[name]
    return kept


def baseline_keep(method: str, model: nn.Module, units: list[TransformerUnit],
                  statistics: Mapping[str, StatisticsAccumulator], cost: CostModel, budget: float,
                  min_channels: int = 1, taylor: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Kept channel indices of every unit under ``cost <= budget`` (the tightest reachable if not)."""
    scores = {u.name: channel_scores(method, model, u, statistics[u.name], taylor) for u in units}
    if method == "flap":
        masks = _global_keep(units, scores, cost, budget, min_channels)
        return {name: np.flatnonzero(mask) for name, mask in masks.items()}
    counts = _uniform_keep(units, cost, budget, min_channels)
    return {u.name: np.sort(np.argsort(-scores[u.name], kind="stable")[: counts[u.name]]) for u in units}


def baseline_update(method: str, model: nn.Module, unit: TransformerUnit, acc: StatisticsAccumulator,
                    kept: np.ndarray) -> UnitUpdate:
    """The update of ``unit``: FLAP adds the removed columns' mean output to the bias."""
    if method != "flap":
        return UnitUpdate(kept)
    module = model.get_submodule(unit.out)
    weight = weight_out_in(module).detach().double().cpu().numpy()
    dropped = np.setdiff1d(np.arange(unit.n_channels), kept)
    cols = (dropped[:, None] * unit.group_size + np.arange(unit.group_size)).ravel()
    bias = module.bias.detach().double().cpu().numpy() if getattr(module, "bias", None) is not None else 0.0
    return UnitUpdate(kept, bias=bias + weight[:, cols] @ acc.means()[0][cols])
