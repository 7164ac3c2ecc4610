"""The allocation step of :meth:`orprune.Pruner.prune` after its checks: the fitted pruner's absolute budgets and
cost models, the keep counts under given limits (the chosen points of path curves polished by swap search and the
allocation re-checked with the polished errors, ``formulations/swap_polish.md``), and the pruned model built,
re-allocated until its counted costs meet the budgets (:mod:`orprune.budget.self_check`).

Split from ``pipeline.py``; these steps read the fitted pruner they are given (``costs_``, ``curves_``,
``output_errors_``, ``unit_problems_``, ``polished_``, ``latency_``), add polished points to its curves and build
through its :meth:`~orprune.Pruner.apply`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from orprune._phases import PhaseTime, module_device, timed_phase
from orprune._pruned_model import warn_over_budget
from orprune.budget.allocation import Allocation, AllocationProblem, allocate
from orprune.budget.curves import ErrorCurve
from orprune.budget.recheck import PolishedPoint, recheck_allocation
from orprune.budget.self_check import meet_counted_budgets
from orprune.budget.uniform_allocation import allocate_uniform
from orprune.layer.solvers.polish import polish_swap
from orprune.prune_result import PruneResult

__all__ = ["budgets_and_costs", "polished_allocator", "prune_within_budgets"]


def budgets_and_costs(p: Any, macs: float | None, params: float | None,
                      latency: float | None) -> tuple[dict[str, float], dict[str, Any]]:
    """The fitted Pruner ``p``'s absolute budgets for the given fractions, and the cost model of each budget the
    allocation may see (latency once ``p.fit_latency`` has run)."""
    full = p.costs_.evaluate()
    budgets = {name: fraction * full[name] for name, fraction in (("macs", macs), ("params", params))
               if fraction is not None}
    if latency is not None:
        budgets["latency"] = latency * p.latency_.full
    costs = {"macs": p.costs_.macs, "params": p.costs_.params}
    if hasattr(p, "latency_"):
        costs["latency"] = p.latency_.cost
    return budgets, costs


def polished_allocator(p: Any, costs: dict[str, Any], *, ties: Sequence[tuple[str, ...]], allocation: str,
                       time_limit: float | None, phases: list[PhaseTime],
                       points: list[PolishedPoint]) -> Callable[[dict[str, float]], Allocation]:
    """``limits -> Allocation`` for :func:`orprune.budget.self_check.meet_counted_budgets`, timed in ``phases``.

    ``allocation`` is ``"milp"`` (:func:`orprune.allocate`) or ``"uniform"``; the MILP sums the curves' errors, or
    ``p.output_errors_`` when fitted with ``errors="output"``. With ``p.polish_time`` set (and layer errors), each
    keep count chosen for a path unit is polished by ``p.polish_time`` seconds of swap search and the allocation is
    solved again until no chosen point improves (:func:`orprune.budget.recheck.recheck_allocation`); the polished
    points are appended to ``points`` and recorded in ``p.polished_``.
    """
    polished = {u for u, c in p.curves_.items() if c.solver == "path"}
    device = module_device(p.model_)

    def solve(curves: dict[str, ErrorCurve], limits: dict[str, float]) -> Allocation:
        problem = AllocationProblem(
            options={u: c.keep_counts for u, c in curves.items()},
            errors={u: c.errors for u, c in curves.items()} if p.output_errors_ is None else p.output_errors_,
            ties=ties)
        if allocation == "uniform":
            return allocate_uniform(problem, costs, limits)
        return allocate(problem, costs=costs, budgets=limits, time_limit=time_limit)

    def polish(unit: str, k: int, mask: np.ndarray) -> tuple[np.ndarray, float, int]:
        with timed_phase(phases, "polish", device):  # at least one round of swaps, then until the deadline
            return polish_swap(p.unit_problems_[unit], mask, deadline=time.perf_counter() + p.polish_time)

    def allocate_within(limits: dict[str, float]) -> Allocation:
        with timed_phase(phases, "allocation", device):
            if p.polish_time is None or p.output_errors_ is not None or not polished:
                return solve(p.curves_, limits)
            # swap search at the chosen counts only, then the allocation re-checked with the new errors
            chosen, more = recheck_allocation(p.curves_, lambda curves: solve(curves, limits), polish, polished,
                                              done=p.polished_)
            points.extend(more)
            return chosen

    return allocate_within


def prune_within_budgets(p: Any, macs: float | None, params: float | None, latency: float | None, *,
                         ties: Sequence[tuple[str, ...]], allocation: str, time_limit: float | None,
                         scores: dict[str, np.ndarray] | None) -> PruneResult:
    """:meth:`orprune.Pruner.prune` of the fitted Pruner ``p`` for checked budget fractions, ties and scores, with
    the latency tables' budget taken as given (the measured-latency loop calls this once per round)."""
    start = time.perf_counter()
    budgets, costs = budgets_and_costs(p, macs, params, latency)
    points: list[PolishedPoint] = []
    phases: list[PhaseTime] = []
    allocate_within = polished_allocator(p, costs, ties=ties, allocation=allocation, time_limit=time_limit,
                                         phases=phases, points=points)

    def build(chosen: Allocation) -> PruneResult:
        result = p.apply(chosen, start=start, scores=scores, report_latency=False)
        phases.extend(result.phases[len(p.fit_phases_):])
        return result

    result = meet_counted_budgets(allocate_within, build, costs, budgets)
    warn_over_budget(result, budgets, stacklevel=4)
    timing = None
    if hasattr(p, "latency_"):
        with timed_phase(phases, "latency", module_device(p.model_)):
            timing = p._latency_report(result.model, dict(result.allocation.keep), budgets.get("latency"))
    return replace(result, prune_time=time.perf_counter() - start, latency=timing, polished=tuple(points),
                   phases=(*p.fit_phases_, *phases))
