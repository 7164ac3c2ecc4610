"""Closing the loop on latency: re-solve the allocation until the *measured* pruned model meets the budget.

The latency tables predict the pruned model's time from modules timed one at a time; the whole model runs
them back to back, with colder caches and with work the tables hold only in proportion (functional ops,
dispatch), and the allocation picks the cells that happened to time fast. So the tables' prediction is
biased at the keep counts the allocation chooses. The loop measures the pruned model (interleaved with
the unpruned one) and moves the tables' budget (in proportion first, then by secant steps on
measured = f(predicted)) until the measurement is within ``tolerance`` below the budget or the rounds run
out; of the rounds that met the budget it returns the least error. ``formulations/latency_tables.md``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import replace

import torch
import torch.nn as nn

from orprune.network.latency import LatencyModel
from orprune.network.timing import call_times, torch_threads
from orprune.prune_result import LatencyReport, LatencyRound, PruneResult

__all__ = ["check_latency_loop", "latency_inputs", "latency_report", "next_table_fraction",
           "prune_to_measured_latency"]


def latency_inputs(batches: list, batch_size: int) -> torch.Tensor:
    """``batch_size`` calibration inputs to time the model on (repeated when there are fewer)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
    if not all(torch.is_tensor(b) for b in batches):
        raise ValueError("latency tables need tensor inputs (the calibration batches are not tensors).")
    images = torch.cat(batches)
    return images[torch.arange(batch_size) % len(images)]


def latency_report(tables: LatencyModel, reference: nn.Module, model: nn.Module, inputs: torch.Tensor,
                   keep: dict[str, int], budget: float | None) -> LatencyReport:
    """The tables' prediction at ``keep``, and the unpruned ``reference`` and pruned ``model`` timed
    alternately (median of 11 calls each, the tables' thread count)."""
    with torch_threads(tables.threads):
        before, after = call_times([reference, model], inputs, repeats=11, warmup=2, statistic="median")
    return LatencyReport(batch_size=tables.batch_size, threads=tables.threads, budget=budget,
                         predicted=tables.predict(keep), table_full=tables.full, before=before, after=after)


def check_latency_loop(rounds: int, tolerance: float) -> None:
    """``latency_rounds`` a non-negative integer, ``latency_tolerance`` in [0, 1)."""
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
        raise ValueError(f"`latency_rounds` must be a non-negative integer, got {rounds!r}.")
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 <= tolerance < 1:
        raise ValueError(f"`latency_tolerance` must be a number in [0, 1), got {tolerance!r}.")


def next_table_fraction(points: list[tuple[float, float]], target: float) -> float:
    """The tables' budget at which measured latency should equal ``target``, from the (predicted, measured)
    points so far: after one point, the measurement scaled in proportion (``p target / r``); after more, the
    secant through the last two.

    A flat or inverted secant (measurement noise) falls back to the proportional step from the last point.
    """
    p1, r1 = points[-1]
    proportional = p1 * target / r1
    if len(points) < 2:
        return proportional
    p0, r0 = points[-2]
    slope = (r1 - r0) / (p1 - p0) if p1 != p0 else math.nan
    if not math.isfinite(slope) or slope <= 0:
        return proportional
    return p1 + (target - r1) / slope


def prune_to_measured_latency(prune_once: Callable[[float], PruneResult], latency: float, rounds: int,
                              tolerance: float) -> PruneResult:
    """Prune with the tables' budget moved until the measured latency fraction is at most ``latency``.

    Parameters
    ----------
    prune_once : callable fraction -> PruneResult
        Allocates with the tables' latency budget at that fraction, builds the pruned model and measures it
        (its ``latency`` report must hold the measured fraction).
    latency : float
        The user's budget (fraction of the unpruned model's measured latency).
    rounds : int
        Re-solves after the first allocation (0: trust the tables).
    tolerance : float
        Stop once the measurement is within ``[latency * (1 - tolerance), latency]``.

    Returns
    -------
    PruneResult
        Of the rounds whose measurement met the budget, the one of least allocation error (else the fastest,
        with a ``RuntimeWarning``); its ``latency.rounds`` lists every round.
    """
    results: list[PruneResult] = []
    history: list[LatencyRound] = []
    fraction = latency
    for _ in range(rounds + 1):
        try:
            result = prune_once(fraction)
        except ValueError:
            if not results:
                raise
            break  # the tables cannot go that low: keep what was measured
        keep = dict(result.allocation.keep)
        if any(dict(r.allocation.keep) == keep for r in results):
            break  # the moved budget chose counts already measured: the options allow nothing between
        timing = result.latency
        history.append(LatencyRound(table_fraction=fraction, predicted_fraction=timing.predicted_fraction,
                                    measured_fraction=timing.measured_fraction,
                                    objective=result.allocation.objective))
        results.append(result)
        measured = timing.measured_fraction
        if latency * (1 - tolerance) <= measured <= latency:
            break
        # aim at the middle of the accepted band; never above the full model
        aim = latency * (1 - tolerance / 2)
        step = min(1.0, next_table_fraction([(r.predicted_fraction, r.measured_fraction) for r in history], aim))
        if not math.isfinite(step) or step <= 0 or math.isclose(step, fraction, rel_tol=1e-6):
            break
        fraction = step
    met = [r for r in results if r.latency.measured_fraction <= latency]
    if met:
        best = min(met, key=lambda r: r.allocation.objective)
    else:
        best = min(results, key=lambda r: r.latency.measured_fraction)
        warnings.warn(f"the pruned model measured {best.latency.measured_fraction:.3f} of the unpruned latency "
                      f"after {len(results)} round(s), above the budget {latency:.3f}: raise `latency_rounds` "
                      "or re-measure on a quieter machine.", RuntimeWarning, stacklevel=3)
    full = best.latency.table_full
    return replace(best, latency=replace(best.latency, budget=latency * full, rounds=tuple(history)))
