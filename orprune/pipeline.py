"""From a torch model to a smaller torch model (design.md, section 3).

1. Trace the model once: prunable channel groups (units) and their consumer layers.
2. Stream calibration batches once: each consumer's least-squares statistics.
3. Per unit, an error curve: the best reconstruction error for each keep count (independent
   problems, solved through any ``concurrent.futures.Executor``).
4. Per budget, a MILP chooses one keep count per unit under MACs / params budgets.
5. Surgery: remove the channels, write least-squares weights and compensated biases.

Steps 1-3 are :meth:`Pruner.fit`; steps 4-5 are :meth:`Pruner.prune`, so many budgets come from
one set of curves.
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from orprune.allocation import Allocation, AllocationProblem, allocate
from orprune.baselines import count_macs_params
from orprune.calibration import DEFAULT_POSITIONS_PER_IMAGE, collect_statistics
from orprune.costs import network_costs
from orprune.curves import ErrorCurve, error_curve
from orprune.graph import DEFAULT_MAX_FEATURES, Consumer, PruningGraph, find_groups, weight_matrix
from orprune.problem import LayerProblem, StatisticsAccumulator
from orprune.selection import resolve_solver
from orprune.surgery import ConsumerUpdate, PruningPlan, apply_pruning, masked_copy

__all__ = ["Pruner", "PruneResult", "UnitReport", "prune"]


@dataclass(frozen=True)
class UnitReport:
    """What happened to one channel group."""

    unit: str
    channels_before: int
    channels_after: int
    solver: str
    relative_error: float  # summed over consumers, each relative to its ||Y||^2
    bound: float
    status: str
    solve_time: float  # the whole curve of this unit


@dataclass(frozen=True)
class PruneResult:
    """A pruned model with its costs and the per-unit report."""

    model: nn.Module
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    report: tuple[UnitReport, ...]
    allocation: Allocation
    plan: PruningPlan
    prune_time: float

    def summary(self) -> str:
        lines = [
            f"MACs {self.macs_before:,} -> {self.macs_after:,} ({self.macs_after / self.macs_before:.3f}); "
            f"params {self.params_before:,} -> {self.params_after:,} ({self.params_after / self.params_before:.3f}); "
            f"allocation {self.allocation.status}, {self.prune_time:.1f} s",
            f"{'unit':<32} {'channels':>10} {'solver':>10} {'rel. error':>11} {'status':>10}",
        ]
        lines += [
            f"{r.unit:<32} {r.channels_before:>4} -> {r.channels_after:<3} {r.solver:>10} {r.relative_error:>11.4g} {r.status:>10}"
            for r in self.report
        ]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "macs_before": self.macs_before,
            "macs_after": self.macs_after,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "allocation_status": self.allocation.status,
            "allocation_gap": self.allocation.gap,
            "prune_time": self.prune_time,
            "units": [asdict(r) for r in self.report],
        }


def _curve_task(problem: LayerProblem, keep_counts: np.ndarray, solver: str, time_limit: float | None) -> ErrorCurve:
    """One unit's curve; a top-level function so process pools can pickle it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # time-limit warnings: the status is in the curve
        return error_curve(problem, keep_counts, solver=solver, time_limit=time_limit)


def _keep_options(n_channels: int, max_options: int, min_channels: int) -> np.ndarray:
    low = min(min_channels, n_channels)
    if n_channels - low + 1 <= max_options:
        return np.arange(low, n_channels + 1)
    return np.unique(np.round(np.linspace(low, n_channels, max_options)).astype(int))


def _fraction(value: float | None, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"`{name}` must be a fraction of the original in (0, 1], got {value!r}.")
    return float(value)


def _inputs(batch: Any) -> Any:
    return batch[0] if isinstance(batch, (tuple, list)) else batch


class Pruner:
    """Channel pruner: error curves once (:meth:`fit`), any number of budgets (:meth:`prune`).

    Parameters
    ----------
    solver : str, default "auto"
        Layer solver for the curves: ``"auto"`` certifies small units exactly and uses greedy
        beyond; any name of :func:`orprune.available_solvers` forces one.
    ridge : float, default 1e-4
        Ridge of each consumer's least squares, relative to the mean diagonal of its Gram matrix.
    positions_per_image : int, default 32
        Sampled spatial positions per image for conv consumers.
    max_options : int, default 32
        Keep counts per unit offered to the allocation (a grid for wider units).
    min_channels : int, default 1
        Fewest channels a unit may keep.
    ignored_layers : iterable of nn.Module or str
        Left untouched, with everything coupled to them.
    max_features : int
        Consumers whose design matrix would have more columns are left alone (with a warning).
    sequential : bool, default True
        Refit each unit's consumers on inputs from the already pruned part of the network (targets
        from the original), which avoids error accumulation; False refits on the original inputs.
    executor : concurrent.futures.Executor, optional
        Solves the units' curves in parallel (a process pool, ``dask.distributed``'s
        ``Client.get_executor()``); serial when None.
    time_limit : float, optional
        Seconds per exact solve inside the curves.
    progress : bool, default True
    seed : int, default 0

    Attributes
    ----------
    graph_ : PruningGraph
    costs_ : NetworkCosts
    curves_ : dict unit -> ErrorCurve
    """

    def __init__(
        self,
        *,
        solver: str = "auto",
        ridge: float = 1e-4,
        positions_per_image: int | None = DEFAULT_POSITIONS_PER_IMAGE,
        max_options: int = 32,
        min_channels: int = 1,
        ignored_layers: Iterable[nn.Module | str] = (),
        max_features: int = DEFAULT_MAX_FEATURES,
        sequential: bool = True,
        executor: Executor | None = None,
        time_limit: float | None = 10.0,
        progress: bool = True,
        seed: int = 0,
    ) -> None:
        self.solver = solver
        self.ridge = ridge
        self.positions_per_image = positions_per_image
        self.max_options = max_options
        self.min_channels = min_channels
        self.ignored_layers = ignored_layers
        self.max_features = max_features
        self.sequential = sequential
        self.executor = executor
        self.time_limit = time_limit
        self.progress = progress
        self.seed = seed

    # ------------------------------------------------------------------ fit
    def _validate(self) -> None:
        if self.solver != "auto":
            resolve_solver(self.solver, 1)  # unknown / unavailable solver: fail before any work
        if not (isinstance(self.ridge, (int, float)) and np.isfinite(self.ridge) and self.ridge >= 0):
            raise ValueError(f"`ridge` must be a finite number >= 0, got {self.ridge!r}.")
        for name in ("max_options", "min_channels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if self.executor is not None and not hasattr(self.executor, "map"):
            raise ValueError("`executor` must be a concurrent.futures.Executor (with a `map` method).")

    def _problem(self, acc: StatisticsAccumulator, consumer: Consumer, model: nn.Module) -> LayerProblem:
        gram, cross, yy = acc.statistics(center=True)
        ridge = self.ridge * float(np.mean(np.diag(gram)))
        weights = weight_matrix(model.get_submodule(consumer.name)).detach().double().numpy()
        return LayerProblem(gram, cross, yy, group_size=consumer.group_size, ridge=ridge, weights=weights)

    def fit(self, model: nn.Module, calibration: Iterable[Any]) -> Pruner:
        """Trace ``model``, accumulate calibration statistics and compute every unit's curve.

        ``calibration`` is an iterable of input tensors or (input, target) batches (a DataLoader);
        its inputs are kept (detached) for the sequential refit of :meth:`prune`.
        """
        self._validate()
        if not isinstance(model, nn.Module):
            raise ValueError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
        batches = [_inputs(b).detach() if torch.is_tensor(_inputs(b)) else _inputs(b) for b in calibration]
        if not batches:
            raise ValueError("`calibration` is empty: pruning needs at least one batch of inputs.")
        self.model_ = copy.deepcopy(model).eval()
        self.batches_ = batches
        self.example_inputs_ = batches[0][:1] if torch.is_tensor(batches[0]) else batches[0]
        self.graph_ = find_groups(self.model_, self.example_inputs_, ignored_layers=self.ignored_layers,
                                  max_features=self.max_features)
        if not self.graph_.units:
            raise ValueError("the model has no prunable channel group (see the warning for the excluded ones).")
        self.costs_ = network_costs(self.model_, self.graph_, self.example_inputs_)
        self.macs_before_, self.params_before_ = count_macs_params(self.model_, self.example_inputs_)
        stats = collect_statistics(self.model_, self.graph_.consumers, batches,
                                   positions_per_image=self.positions_per_image, seed=self.seed,
                                   progress=self.progress)
        self.statistics_ = stats
        self.problems_ = {c.name: self._problem(stats[c.name], c, self.model_) for c in self.graph_.consumers}
        problems, options = [], []
        for unit in self.graph_.units:
            parts = [self.problems_[c.name] for c in unit.consumers]
            # each consumer's error relative to its own ||Y||^2: layers of any scale compare
            problem = LayerProblem.combine(parts, scales=[1.0 / max(p.yy, 1e-300) for p in parts])
            problems.append(problem)
            options.append(_keep_options(unit.n_channels, self.max_options, self.min_channels))
        solvers = [resolve_solver(self.solver, p.n_channels) for p in problems]
        mapper = self.executor.map if self.executor is not None else map
        results = mapper(_curve_task, problems, options, solvers, [self.time_limit] * len(problems))
        self.curves_ = {
            unit.name: curve
            for unit, curve in zip(self.graph_.units,
                                   tqdm(results, total=len(problems), desc="error curves", disable=not self.progress, leave=False))
        }
        return self

    # ------------------------------------------------------------------ prune
    def _check_fitted(self) -> None:
        if not hasattr(self, "curves_"):
            raise RuntimeError("this Pruner is not fitted yet; call `fit(model, calibration)` first.")

    def _updates(self, unit_names: Sequence[str], keep: Mapping[str, np.ndarray],
                 stats: Mapping[str, StatisticsAccumulator],
                 problems: Mapping[str, LayerProblem] | None = None) -> dict[str, ConsumerUpdate]:
        """Least-squares weights and compensated biases of the consumers of ``unit_names``."""
        updates = {}
        for name in unit_names:
            mask = np.zeros(self.graph_[name].n_channels, dtype=bool)
            mask[keep[name]] = True
            for consumer in self.graph_[name].consumers:
                acc = stats[consumer.name]
                problem = problems[consumer.name] if problems else self._problem(acc, consumer, self.model_)
                weights, _ = problem.refit(mask)
                mean_x, mean_y = acc.means()
                module = self.model_.get_submodule(consumer.name)
                old_bias = module.bias.detach().double().numpy() if getattr(module, "bias", None) is not None else 0.0
                updates[consumer.name] = ConsumerUpdate(weight=weights, bias=old_bias + mean_y - mean_x @ weights)
        return updates

    def _report(self, unit: str, k: int) -> UnitReport:
        curve = self.curves_[unit]
        i = int(np.flatnonzero(curve.keep_counts == k)[0])
        return UnitReport(unit=unit, channels_before=self.graph_[unit].n_channels, channels_after=k,
                          solver=curve.solver, relative_error=float(curve.errors[i]), bound=float(curve.bounds[i]),
                          status=curve.statuses[i], solve_time=curve.solve_time)

    def prune(self, *, macs: float | None = None, params: float | None = None,
              time_limit: float | None = None) -> PruneResult:
        """A pruned copy of the fitted model within the budgets.

        Parameters
        ----------
        macs, params : float, optional
            Fractions of the original MACs / parameters to keep at most, in (0, 1]. At least one.
        time_limit : float, optional
            Seconds for the allocation MILP.
        """
        self._check_fitted()
        macs, params = _fraction(macs, "macs"), _fraction(params, "params")
        if macs is None and params is None:
            raise ValueError("give a budget: `macs` and/or `params` as a fraction in (0, 1].")
        start = time.perf_counter()
        full = self.costs_.evaluate()
        budgets = {name: fraction * full[name] for name, fraction in (("macs", macs), ("params", params))
                   if fraction is not None}
        problem = AllocationProblem(
            options={u: c.keep_counts for u, c in self.curves_.items()},
            errors={u: c.errors for u, c in self.curves_.items()},
        )
        try:
            allocation = allocate(problem, costs={"macs": self.costs_.macs, "params": self.costs_.params},
                                  budgets=budgets, time_limit=time_limit)
        except ValueError as exc:
            raise ValueError(f"the budget cannot be met by pruning the prunable groups: {exc}") from exc
        keep = {u: np.flatnonzero(self.curves_[u].mask_for(k)) for u, k in allocation.keep.items()}
        pruned_units = [u.name for u in self.graph_.units if keep[u.name].size < u.n_channels]
        if self.sequential:
            updates: dict[str, ConsumerUpdate] = {}
            for name in tqdm(pruned_units, desc="refit", disable=not self.progress, leave=False):
                partial = PruningPlan({u: keep[u] for u in _refitted_units(updates, self.graph_)}, updates)
                working = masked_copy(self.model_, self.graph_, partial)
                stats = collect_statistics(working, self.graph_[name].consumers, self.batches_, reference=self.model_,
                                           positions_per_image=self.positions_per_image, seed=self.seed, progress=False)
                updates.update(self._updates([name], keep, stats))
        else:
            updates = self._updates(pruned_units, keep, self.statistics_, self.problems_)
        plan = PruningPlan({u: keep[u] for u in pruned_units}, updates)
        model = apply_pruning(self.model_, self.graph_, plan, self.example_inputs_)
        macs_after, params_after = count_macs_params(model, self.example_inputs_)
        for name, budget in budgets.items():
            achieved = macs_after if name == "macs" else params_after
            if achieved > budget * (1 + 1e-9):  # the cost model and torch-pruning's counter disagree
                warnings.warn(f"pruned model has {achieved:,} {name}, above the budget {budget:,.0f}.", RuntimeWarning)
        report = tuple(self._report(u.name, int(keep[u.name].size)) for u in self.graph_.units)
        return PruneResult(model=model, macs_before=self.macs_before_, macs_after=macs_after,
                           params_before=self.params_before_, params_after=params_after, report=report,
                           allocation=allocation, plan=plan, prune_time=time.perf_counter() - start)


def _refitted_units(updates: Mapping[str, ConsumerUpdate], graph: PruningGraph) -> list[str]:
    """Units all of whose consumers already have an update."""
    return [u.name for u in graph.units if u.consumers and all(c.name in updates for c in u.consumers)]


def prune(
    model: nn.Module,
    calibration: Iterable[Any],
    *,
    macs: float | None = None,
    params: float | None = None,
    solver: str = "auto",
    executor: Executor | None = None,
    **options: Any,
) -> PruneResult:
    """Prune ``model`` to at most ``macs`` (and/or ``params``) of its original cost.

    Shorthand for ``Pruner(solver=..., executor=..., **options).fit(model, calibration).prune(...)``;
    the input model is left unchanged.
    """
    return Pruner(solver=solver, executor=executor, **options).fit(model, calibration).prune(macs=macs, params=params)
