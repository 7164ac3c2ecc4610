"""A fitted :class:`orprune.Pruner`'s pruned model for given keep counts: the surgery and refit of
:meth:`~orprune.Pruner.apply`, the per-unit report, and the over-budget warning.

Split from ``pipeline.py`` so that the class holds the fit and the allocation; these steps only read the fitted
attributes (``curves_``, ``graph_``, ``model_``, the statistics and targets) of the pruner they are given.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

from orprune._phases import PhaseTime, module_device, timed_phase
from orprune._pipeline_steps import top_channels
from orprune._refit import refit_updates
from orprune.budget.allocation import Allocation
from orprune.network.costs import count_macs_params
from orprune.network.surgery import ConsumerUpdate, PruningPlan, apply_pruning
from orprune.prune_result import PruneResult, RefitReport, UnitReport

__all__ = ["apply_allocation", "pruner_refit", "unit_report", "warn_over_budget"]


def pruner_refit(p: Any, pruned_keep: dict[str, np.ndarray]) -> tuple[dict[str, ConsumerUpdate], RefitReport]:
    """:func:`orprune._refit.refit_updates` with the fitted Pruner ``p``'s statistics, targets and options."""
    return refit_updates(p.model_, p.graph_, pruned_keep, p.batches_, order=p.consumer_order_,
                         statistics=p.statistics_, problems=p.problems_, targets=p.targets_,
                         residual_targets=p.residual_targets_, sequential=p.sequential, ridge=p.ridge,
                         positions_per_image=p.positions_per_image, seed=p.seed,
                         float32=p.float32_statistics, progress=p.progress,
                         max_bytes=None if p.refit_memory is None else int(p.refit_memory))


def unit_report(p: Any, unit: str, k: int, mask: np.ndarray | None = None) -> UnitReport:
    """The curve's entry at ``k`` of the fitted Pruner ``p`` (``+swap`` when polished there); with a ``mask`` of
    given scores, that mask's own error."""
    curve = p.curves_[unit]
    i = int(np.flatnonzero(curve.keep_counts == k)[0])
    if mask is None:
        solver = curve.solver + ("+swap" if k in getattr(p, "polished_", {}).get(unit, ()) else "")
        error = curve.errors[i]
    else:
        solver, error = "scores", p.unit_problems_[unit].objective(mask)
    return UnitReport(unit=unit, channels_before=p.graph_[unit].n_channels, channels_after=k,
                      solver=solver, relative_error=float(error), bound=float(curve.bounds[i]),
                      status=curve.statuses[i], solve_time=curve.solve_time)


def apply_allocation(p: Any, chosen: Allocation, budgets: Mapping[str, float] | None = None, *,
                     start: float | None = None, scores: Mapping[str, np.ndarray] | None = None,
                     report_latency: bool = True) -> PruneResult:
    """:meth:`orprune.Pruner.apply` of the fitted Pruner ``p`` (its docstring says what each argument does).

    The refit goes through ``p._refit_updates`` and the report through ``p._report``, so that wrappers of those
    methods (``benchmarks/scale_prune_phase.py`` times the refit) see every call.
    """
    start = time.perf_counter() if start is None else start
    budgets = dict(budgets or {})
    masks = {u: p.curves_[u].mask_for(k) if scores is None or u not in scores else top_channels(scores[u], k)
             for u, k in chosen.keep.items()}
    keep = {u: np.flatnonzero(m) for u, m in masks.items()}
    pruned_keep = {u.name: keep[u.name] for u in p.graph_.units if keep[u.name].size < u.n_channels}
    phases: list[PhaseTime] = list(getattr(p, "fit_phases_", ()))
    with timed_phase(phases, "refit", module_device(p.model_)):
        updates, refit = p._refit_updates(pruned_keep)
    plan = PruningPlan(pruned_keep, updates)
    with timed_phase(phases, "surgery", module_device(p.model_)):
        model = apply_pruning(p.model_, p.graph_, plan, p.example_inputs_)
        macs_after, params_after = count_macs_params(model, p.example_inputs_)
    report = tuple(p._report(u.name, int(keep[u.name].size),
                             None if scores is None or u.name not in scores else masks[u.name])
                   for u in p.graph_.units)
    prune_time = time.perf_counter() - start
    timing = None
    if report_latency and hasattr(p, "latency_"):
        with timed_phase(phases, "latency", module_device(p.model_)):
            timing = p._latency_report(model, dict(chosen.keep), budgets.get("latency"))
    result = PruneResult(model=model, macs_before=p.macs_before_, macs_after=macs_after,
                         params_before=p.params_before_, params_after=params_after, report=report,
                         allocation=chosen, plan=plan, prune_time=prune_time, latency=timing, refit=refit,
                         phases=tuple(phases))
    warn_over_budget(result, budgets, stacklevel=4)
    return result


def warn_over_budget(result: PruneResult, budgets: Mapping[str, float], stacklevel: int = 3) -> None:
    """A ``RuntimeWarning`` for each MACs / params budget the counted pruned model exceeds (the cost model and
    torch-pruning's counter disagree); ``stacklevel`` 3 points at the caller of the function that calls this."""
    for name, budget in budgets.items():
        achieved = {"macs": result.macs_after, "params": result.params_after}.get(name)
        if achieved is not None and achieved > budget * (1 + 1e-9):
            warnings.warn(f"pruned model has {achieved:,} {name}, above the budget {budget:,.0f}.", RuntimeWarning,
                          stacklevel=stacklevel)
