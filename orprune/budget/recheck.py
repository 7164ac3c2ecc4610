"""Polish only where the allocation looks, then re-check the allocation (``formulations/swap_polish.md``).

A whole error curve from a fast path is cheap; polishing a mask (swap search) is not, and only the keep
count the allocation picks for each unit is ever used. :func:`recheck_allocation` therefore alternates:

1. solve the allocation on the current curves;
2. polish each chosen point not polished before; a point's error only falls
   (the polished mask replaces the path's only when its exact error is lower);
3. if any error fell, re-solve on the updated curves and go to 2; otherwise stop.

The last allocation always comes from a solve on the final curves, so it is optimal for them (to the
allocation solver's gap); when the loop stops because nothing fell, every chosen point of a polished
unit is a polished one. Rounds are capped (``max_rounds``); at the cap the last solve still sees every
polished point.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Hashable, Mapping, MutableMapping
from dataclasses import dataclass

import numpy as np

from orprune.budget.allocation_problem import Allocation
from orprune.budget.curves import ErrorCurve

__all__ = ["PolishedPoint", "recheck_allocation", "replace_point"]


@dataclass(frozen=True)
class PolishedPoint:
    """One polished point of a curve: the error before (the path's) and after, and the swaps made."""

    unit: Hashable
    keep: int
    error_before: float
    error_after: float
    moves: int
    seconds: float


def replace_point(curve: ErrorCurve, k: int, mask: np.ndarray, error: float) -> ErrorCurve:
    """``curve`` with the point at ``k`` replaced by ``mask`` and its exact ``error`` (a new curve)."""
    i = int(np.flatnonzero(curve.keep_counts == k)[0])
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != (curve.masks.shape[1],) or int(mask.sum()) != k:
        raise ValueError(f"`mask` must keep exactly {k} of {curve.masks.shape[1]} channels.")
    masks, errors = curve.masks.copy(), curve.errors.copy()
    masks[i], errors[i] = mask, float(error)
    return dataclasses.replace(curve, masks=masks, errors=errors)


def recheck_allocation(
    curves: MutableMapping[Hashable, ErrorCurve],
    solve: Callable[[Mapping[Hashable, ErrorCurve]], Allocation],
    polish: Callable[[Hashable, int, np.ndarray], tuple[np.ndarray, float, int]],
    units: Collection[Hashable],
    *,
    done: MutableMapping[Hashable, set[int]] | None = None,
    max_rounds: int = 5,
) -> tuple[Allocation, list[PolishedPoint]]:
    """Allocate, polish the chosen points of ``units``, re-allocate until no chosen point improves.

    Parameters
    ----------
    curves : mutable mapping unit -> ErrorCurve
        Updated in place with every improved point.
    solve : callable
        ``solve(curves) -> Allocation`` (the allocation MILP on the curves' errors).
    polish : callable
        ``polish(unit, k, mask) -> (mask, exact_error, moves)`` starting from the curve's ``mask``.
    units : collection
        Units whose chosen points are polished (those whose curve comes from a fast path).
    done : mutable mapping unit -> set of int, optional
        Points polished already (skipped; updated in place), to share work between budgets.
    max_rounds : int, default 5
        Polishing rounds at most (each followed by a re-solve when an error fell).

    Returns
    -------
    allocation : Allocation
        Solved on the final ``curves``.
    points : list of PolishedPoint
        The points polished by this call, in order.
    """
    import time

    done = {} if done is None else done
    points: list[PolishedPoint] = []
    allocation = solve(curves)
    for _ in range(max_rounds):
        todo = [(u, int(k)) for u, k in allocation.keep.items()
                if u in units and int(k) not in done.get(u, set()) and 0 < int(k) < curves[u].masks.shape[1]]
        if not todo:
            break
        improved = False
        for u, k in todo:
            curve = curves[u]
            before = float(curve.errors[np.flatnonzero(curve.keep_counts == k)[0]])
            start = time.perf_counter()
            mask, error, moves = polish(u, k, curve.mask_for(k))
            done.setdefault(u, set()).add(k)
            after = before
            if error < before:  # the path's error is exact up to rounding: keep whichever is lower
                curves[u] = replace_point(curve, k, mask, error)
                after, improved = float(error), True
            points.append(PolishedPoint(u, k, before, after, int(moves), time.perf_counter() - start))
        if not improved:
            break
        allocation = solve(curves)
    return allocation, points
