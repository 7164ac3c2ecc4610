"""Prune the attention heads and MLP neurons of a Hugging Face transformer with least-squares refits.

1. Calibrate: each unit's output projection's input ``X`` and output ``Y`` on the original model.
2. Per unit, a :class:`LayerProblem` over its channels (o_proj: one channel per key/value group,
   ``heads_per_group * head_dim`` columns; down_proj: one column per neuron) and its error curve.
3. Allocate keep counts under a params / MACs budget with the allocation MILP (costs linear here).
4. Refit each output projection on the kept columns (optionally sequentially: inputs from the
   partly pruned model, targets from the original), slice q/k/v and gate/up rows, update the heads.

The model and what is exact are in ``formulations/transformer_units.md``.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from orprune._status import FEASIBLE, INFEASIBLE, SOLUTION_PRESENT
from orprune.budget.allocation import Allocation, AllocationProblem, allocate
from orprune.budget.curves import ErrorCurve, error_curve
from orprune.layer.problem import LayerProblem, StatisticsAccumulator
from orprune.layer.solvers.local_search import swap_local_search
from orprune.network.cost_model import CostModel
from orprune.transformer.adapters import TransformerUnit, find_units, weight_out_in
from orprune.transformer.baselines import BASELINES, baseline_keep, baseline_update, taylor_gradients
from orprune.transformer.calibration import collect_unit_statistics, projection_hooks, run_model
from orprune.transformer.costs import unit_costs
from orprune.transformer.surgery import UnitUpdate, apply_updates
from orprune.transformer.torch_attention import split_attention

__all__ = ["TransformerPruner", "TransformerPruneResult", "TransformerUnitReport", "prune_transformer"]

METHODS = ("orprune",) + BASELINES


@dataclass(frozen=True)
class TransformerUnitReport:
    """What happened to one unit: counts and the layer's relative reconstruction error."""

    unit: str
    kind: str
    channels_before: int
    channels_after: int
    relative_error: float  # ||Y - X_S W||^2 / ||Y||^2 on the calibration tokens (centred with a bias)


@dataclass(frozen=True)
class TransformerPruneResult:
    """A pruned model, its costs, the per-unit report and the allocation (``None`` for baselines)."""

    model: nn.Module
    method: str
    params_before: int
    params_after: int
    macs_before: float
    macs_after: float
    seq_len: int
    report: tuple[TransformerUnitReport, ...]
    updates: Mapping[str, UnitUpdate]
    allocation: Allocation | None
    prune_time: float
    status: str
    message: str

    @property
    def success(self) -> bool:
        return self.status in SOLUTION_PRESENT


def _options(n_channels: int, max_options: int, min_channels: int) -> np.ndarray:
    low = min(min_channels, n_channels)
    if n_channels - low + 1 <= max_options:
        return np.arange(low, n_channels + 1)
    return np.unique(np.round(np.linspace(low, n_channels, max_options)).astype(int))


class TransformerPruner:
    """Fit once (calibration, problems, error curves), then :meth:`prune` at any budget.

    Parameters
    ----------
    solver : str, default "greedy"
        Layer solver for the error curves (any of :func:`orprune.available_solvers`, or "auto").
    swap : bool, default False
        Polish each unit's selected channels, at the allocated count, with best-improvement 1-swaps
        (:func:`orprune.swap_local_search`; never worse than the greedy selection). The allocation
        uses the greedy curves: polishing every point of them is too slow for wide MLPs.
    swap_time : float, optional, default 30
        Seconds of swap search per unit (``None``: until a local optimum).
    ridge : float, default 1e-4
        Ridge relative to the mean diagonal of each unit's Gram matrix.
    errors : {"absolute", "relative"}
        What the allocation sums: squared errors in the residual stream (every unit writes into the
        same stream, so they share units), or each relative to its unit's ``||Y||^2``.
    max_options : int, default 32
        Candidate keep counts per unit (evenly spaced; all of them for small units).
    min_channels : int, default 1
        Channels every unit keeps (a block never loses all its heads or neurons).
    sequential : bool, default False
        Refit each output projection on inputs from the partly pruned model (targets stay the
        original outputs), in forward order.
    time_limit : float, optional
        Seconds per layer solve (exact solvers) and for the allocation MILP.
    loss : callable, optional
        ``loss(model, batch) -> scalar tensor``, differentiated on the calibration batches by the
        ``"taylor"`` baseline only (default: next-token cross-entropy of a causal LM on token ids).
    """

    def __init__(self, *, solver: str = "greedy", swap: bool = False, swap_time: float | None = 30.0,
                 ridge: float = 1e-4,
                 errors: str = "absolute", max_options: int = 32, min_channels: int = 1,
                 sequential: bool = False, time_limit: float | None = None,
                 loss: Callable[[nn.Module, Any], torch.Tensor] | None = None) -> None:
        self.solver = solver
        self.swap = swap
        self.swap_time = swap_time
        self.ridge = ridge
        self.errors = errors
        self.max_options = max_options
        self.min_channels = min_channels
        self.sequential = sequential
        self.time_limit = time_limit
        self.loss = loss

    def _validate(self) -> None:
        if not (isinstance(self.ridge, (int, float)) and np.isfinite(self.ridge) and self.ridge >= 0):
            raise ValueError(f"`ridge` must be a finite number >= 0, got {self.ridge!r}.")
        if self.loss is not None and not callable(self.loss):
            raise ValueError(f"`loss` must be None or a callable loss(model, batch), got {self.loss!r}.")
        if self.errors not in ("absolute", "relative"):
            raise ValueError(f"`errors` must be 'absolute' or 'relative', got {self.errors!r}.")
        if self.swap_time is not None and not (isinstance(self.swap_time, (int, float)) and self.swap_time > 0):
            raise ValueError(f"`swap_time` must be a positive number of seconds or None, got {self.swap_time!r}.")
        for name in ("max_options", "min_channels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (2 if name == "max_options" else 1):
                raise ValueError(f"`{name}` must be an integer >= {2 if name == 'max_options' else 1}, got {value!r}.")

    def _problem(self, unit: TransformerUnit, acc: StatisticsAccumulator, model: nn.Module) -> LayerProblem:
        center = getattr(model.get_submodule(unit.out), "bias", None) is not None
        gram, cross, yy = acc.statistics(center=center)
        ridge = self.ridge * float(np.mean(np.diag(gram)))
        return LayerProblem(gram, cross, yy, group_size=unit.group_size, ridge=ridge)

    def fit(self, model: nn.Module, calibration: Iterable[Any]) -> TransformerPruner:
        """Calibrate on ``calibration`` (batches of input ids / pixel values, or keyword dicts) and
        compute every unit's error curve."""
        self._validate()
        self.model_ = split_attention(copy.deepcopy(model)).eval()
        self.taylor_ = None
        self.units_ = find_units(self.model_)
        self.batches_ = list(calibration)
        if not self.batches_:
            raise ValueError("`calibration` is empty: pruning needs at least one batch.")
        self.statistics_ = collect_unit_statistics(self.model_, self.units_, self.batches_)
        self.problems_ = {u.name: self._problem(u, self.statistics_[u.name], self.model_) for u in self.units_}
        self.curves_: dict[str, ErrorCurve] = {}
        for unit in self.units_:
            self.curves_[unit.name] = error_curve(
                self.problems_[unit.name], _options(unit.n_channels, self.max_options, self.min_channels),
                solver=self.solver, time_limit=self.time_limit)
        return self

    def _taylor(self) -> dict[str, np.ndarray]:
        """``|w * dL/dw|`` on the calibration batches, computed once."""
        if getattr(self, "taylor_", None) is None:
            self.taylor_ = taylor_gradients(self.model_, self.units_, self.batches_, self.loss)
        return self.taylor_

    def _polish(self, unit: str, mask: np.ndarray) -> np.ndarray:
        prob = self.problems_[unit]
        if not (self.swap and 0 < mask.sum() < prob.n_channels):
            return mask
        deadline = None if self.swap_time is None else time.perf_counter() + self.swap_time
        return swap_local_search(prob, mask, deadline=deadline)[0]

    # ------------------------------------------------------------------ prune
    def costs(self, seq_len: int = 1) -> dict:
        """Params and MACs (one sequence of ``seq_len`` tokens) as :class:`CostModel` of the keep counts."""
        self._check_fitted()
        return unit_costs(self.model_, self.units_, seq_len)

    def _check_fitted(self) -> None:
        if not hasattr(self, "curves_"):
            raise RuntimeError("this TransformerPruner is not fitted yet; call `fit(model, calibration)` first.")

    def _budgets(self, costs: dict, params: float | None, macs: float | None) -> dict[str, float]:
        full = {u.name: u.n_channels for u in self.units_}
        budgets = {}
        for name, value in (("params", params), ("macs", macs)):
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or value <= 0:
                raise ValueError(f"`{name}` must be a positive number (a fraction <= 1 or an absolute count).")
            budgets[name] = float(value) * costs[name].evaluate(full) if value <= 1 else float(value)
        if not budgets:
            raise ValueError("give a budget: `params` and/or `macs`.")
        return budgets

    def prune(self, *, params: float | None = None, macs: float | None = None, seq_len: int = 128,
              method: str = "orprune", kinds: Iterable[str] = ("heads", "neurons")) -> TransformerPruneResult:
        """A pruned copy of the fitted model within the budgets.

        Parameters
        ----------
        params, macs : float, optional
            Fraction of the whole model's params / MACs to keep (``<= 1``) or an absolute count.
        seq_len : int, default 128
            Sequence length the MACs are counted at.
        method : {"orprune", "magnitude", "wanda_sp", "flap", "taylor"}
            Least-squares selection + allocation + refit, or a no-refit baseline at the same budget.
        kinds : iterable of {"heads", "neurons"}
            Which units may shrink; the others keep every channel (``("neurons",)``: MLP only).
        """
        self._check_fitted()
        if method not in METHODS:
            raise ValueError(f"`method` must be one of {METHODS}, got {method!r}.")
        start = time.perf_counter()
        costs = self.costs(seq_len)
        budgets = self._budgets(costs, params, macs)
        kinds = set(kinds)
        if not kinds or not kinds <= {"heads", "neurons"}:
            raise ValueError(f"`kinds` must be a non-empty subset of ('heads', 'neurons'), got {sorted(kinds)}.")
        free = [u for u in self.units_ if u.kind in kinds]
        allocation = None
        if method == "orprune":
            options, errors = {}, {}
            for unit in self.units_:
                curve = self.curves_[unit.name]
                values = curve.errors if self.errors == "absolute" else curve.relative_errors
                at = slice(None) if unit.kind in kinds else slice(-1, None)  # the last option keeps everything
                options[unit.name], errors[unit.name] = curve.keep_counts[at], values[at]
            problem = AllocationProblem(options=options, errors=errors)
            allocation = allocate(problem, costs, budgets, time_limit=self.time_limit)
            kept = {u: np.flatnonzero(self._polish(u, self.curves_[u].mask_for(k))) for u, k in allocation.keep.items()}
            status, message = allocation.status, allocation.message
        else:
            if len(budgets) != 1:
                raise ValueError("the baselines take one budget: `params` or `macs`.")
            (name, budget), = budgets.items()
            fixed = [u for u in self.units_ if u.kind not in kinds]
            cost = costs[name]  # the fixed units' full cost moves into the constant
            cost = CostModel(constant=cost.constant + sum(cost.linear[u.name] * u.n_channels for u in fixed),
                             linear={u.name: cost.linear[u.name] for u in free})
            taylor = self._taylor() if method == "taylor" else None
            kept = baseline_keep(method, self.model_, free, self.statistics_, cost, budget, self.min_channels, taylor)
            kept.update({u.name: np.arange(u.n_channels) for u in fixed})
            within = costs[name].evaluate({u: k.size for u, k in kept.items()}) <= budget * (1 + 1e-9)
            status = FEASIBLE if within else INFEASIBLE
            message = "" if within else f"{method} cannot meet the {name} budget with `min_channels` kept"
        model, updates, report = self._apply(method, kept)
        keep = {u.name: int(kept[u.name].size) for u in self.units_}
        full = {u.name: u.n_channels for u in self.units_}
        return TransformerPruneResult(
            model=model, method=method, params_before=sum(p.numel() for p in self.model_.parameters()),
            params_after=sum(p.numel() for p in model.parameters()), macs_before=costs["macs"].evaluate(full),
            macs_after=costs["macs"].evaluate(keep), seq_len=seq_len, report=tuple(report), updates=updates,
            allocation=allocation, prune_time=time.perf_counter() - start,
            status=status, message=message)

    def _apply(self, method: str, kept: Mapping[str, np.ndarray]) -> tuple[nn.Module, dict, list]:
        model = copy.deepcopy(self.model_)
        updates, report = {}, []
        targets = self._targets() if method == "orprune" and self.sequential else None
        for unit in self.units_:
            acc = self.statistics_[unit.name]
            if targets is not None:  # inputs from the partly pruned copy, targets from the original
                acc = self._sequential_statistics(model, unit, targets[unit.name])
            if method == "orprune":
                updates[unit.name], error = self._refit(unit, acc, kept[unit.name])
            else:
                updates[unit.name] = baseline_update(method, self.model_, unit, acc, kept[unit.name])
                mask = np.zeros(unit.n_channels, dtype=bool)
                mask[kept[unit.name]] = True
                prob = self.problems_[unit.name]
                error = self._fixed_error(unit, prob, mask)
            report.append(TransformerUnitReport(unit.name, unit.kind, unit.n_channels, int(kept[unit.name].size),
                                                error))
            if targets is not None:
                apply_updates(model, self.units_, {unit.name: updates[unit.name]})
        if targets is None:
            apply_updates(model, self.units_, updates)
        return model, updates, report

    def _fixed_error(self, unit: TransformerUnit, prob: LayerProblem, mask: np.ndarray) -> float:
        """Relative error of keeping the original weights of the kept columns (no refit)."""
        weight = weight_out_in(self.model_.get_submodule(unit.out)).detach().double().cpu().numpy().T
        cols = prob.columns(mask)
        w = np.zeros_like(weight)
        w[cols] = weight[cols]
        error = prob.yy - 2 * np.sum(prob.cross * w) + np.sum(w * (prob.gram @ w))
        return float(max(error, 0.0) / max(prob.yy, np.finfo(float).tiny))

    def _refit(self, unit: TransformerUnit, acc: StatisticsAccumulator, kept: np.ndarray) -> tuple[UnitUpdate, float]:
        prob = self._problem(unit, acc, self.model_)
        mask = np.zeros(unit.n_channels, dtype=bool)
        mask[kept] = True
        weights, value = prob.refit(mask)  # (in, out)
        module = self.model_.get_submodule(unit.out)
        bias = None
        if getattr(module, "bias", None) is not None:  # centred problem: the intercept is the bias
            mean_x, mean_y = acc.means()
            bias = module.bias.detach().double().cpu().numpy() + mean_y - mean_x @ weights
        return UnitUpdate(kept, weight=weights.T, bias=bias), float(value / max(prob.yy, np.finfo(float).tiny))

    def _targets(self) -> dict[str, list[torch.Tensor]]:
        """The original model's output-projection outputs (without bias) on every batch."""
        out: dict[str, list[torch.Tensor]] = {u.name: [] for u in self.units_}
        with torch.no_grad(), projection_hooks(self.model_, self.units_, inputs=False) as seen:
            for batch in self.batches_:
                run_model(self.model_, batch)
                for name, pairs in seen.items():
                    out[name].append(torch.cat([y for _, y in pairs]))
                    pairs.clear()
        return out

    def _sequential_statistics(self, model: nn.Module, unit: TransformerUnit,
                               targets: list[torch.Tensor]) -> StatisticsAccumulator:
        n_out, n_in = weight_out_in(model.get_submodule(unit.out)).shape
        acc = StatisticsAccumulator(n_in, n_out)
        with torch.no_grad(), projection_hooks(model, [unit], outputs=False) as seen:
            for batch, y in zip(self.batches_, targets):
                run_model(model, batch)
                acc.update(torch.cat([x for x, _ in seen[unit.name]]), y)
                seen[unit.name].clear()
        return acc


def prune_transformer(model: nn.Module, calibration_batches: Iterable[Any], *, params: float | None = None,
                      macs: float | None = None, seq_len: int = 128, method: str = "orprune",
                      **options: Any) -> TransformerPruneResult:
    """Prune the heads and MLP neurons of ``model`` to ``params`` / ``macs`` (fractions kept or counts).

    ``options`` go to :class:`TransformerPruner`. The model itself is not changed; the result holds
    a pruned copy whose attention modules and ``config.orprune_widths`` record the new widths.
    """
    pruner = TransformerPruner(**options).fit(model, calibration_batches)
    return pruner.prune(params=params, macs=macs, seq_len=seq_len, method=method)
