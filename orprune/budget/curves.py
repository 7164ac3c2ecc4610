"""Error curves: the best reconstruction error of a layer for every keep count.

The curves are what the global allocation trades off across layers (design.md, section 3). They
are computed once; every new budget only re-solves the allocation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from orprune._status import FEASIBLE, OPTIMAL
from orprune._validation import check_integer
from orprune.layer.problem import LayerProblem
from orprune.layer.selection import resolve_solver, select
from orprune.layer.solvers.greedy import greedy_path
from orprune.layer.solvers.paths import best_paths

__all__ = ["ErrorCurve", "error_curve", "join_curves", "PATH_SOLVERS"]

#: Solvers whose one run gives the whole curve (nested paths); the others solve each count alone.
PATH_SOLVERS = ("greedy", "path")


@dataclass(frozen=True)
class ErrorCurve:
    """Reconstruction error of one layer against the number of kept channels.

    Attributes
    ----------
    keep_counts : ndarray of int
        Increasing keep counts ``k``.
    errors : ndarray
        ``errors[i]`` is the error of ``masks[i]``, which keeps ``keep_counts[i]`` channels.
    bounds : ndarray
        Proven lower bounds on the best error at each count.
    statuses : tuple of str
    masks : ndarray of bool, shape (len(keep_counts), C)
    solver : str
    scale : float
        ``||Y||^2``: ``errors / scale`` is the relative error used to compare layers.
    solve_time : float
    """

    keep_counts: np.ndarray
    errors: np.ndarray
    bounds: np.ndarray
    statuses: tuple[str, ...]
    masks: np.ndarray
    solver: str
    scale: float
    solve_time: float

    @property
    def relative_errors(self) -> np.ndarray:
        return self.errors / max(self.scale, np.finfo(float).tiny)

    def mask_for(self, k: int) -> np.ndarray:
        """The mask the curve found for ``k`` kept channels."""
        hits = np.flatnonzero(self.keep_counts == k)
        if not hits.size:
            raise ValueError(f"`k`={k} is not on this curve; it has {self.keep_counts.tolist()}.")
        return self.masks[hits[0]].copy()


def _keep_counts(prob: LayerProblem, keep_counts: Sequence[int] | None) -> np.ndarray:
    if keep_counts is None:
        return np.arange(prob.n_channels + 1)
    counts = [check_integer(int(k) if isinstance(k, np.integer) else k, "keep_counts", 0, prob.n_channels)
              for k in keep_counts]
    if not counts:
        raise ValueError("`keep_counts` must not be empty.")
    return np.unique(counts)


def error_curve(
    prob: LayerProblem,
    keep_counts: Sequence[int] | None = None,
    *,
    solver: str = "auto",
    time_limit: float | None = None,
    **options: Any,
) -> ErrorCurve:
    """Best error for each keep count (all of ``0..C`` by default).

    ``"greedy"`` gets the whole curve from one forward path (nested sets), ``"path"`` from a
    blocked forward and a blocked backward path (the better mask at each count; see
    :mod:`orprune.layer.solvers.paths`). Other solvers are run once per count; ``time_limit``
    applies to each solve.
    """
    import time

    start = time.perf_counter()
    counts = _keep_counts(prob, keep_counts)
    name = resolve_solver(solver, prob.n_channels, prob.n_features)
    C = prob.n_channels
    masks = np.zeros((counts.size, C), dtype=bool)
    if name in PATH_SOLVERS:
        if name == "greedy":
            order, path_errors = greedy_path(prob, int(counts.max()))
            for i, k in enumerate(counts):
                masks[i, order[:k]] = True
            errors = path_errors[counts]
        else:
            masks, errors = best_paths(prob, counts, progress=bool(options.get("progress", False)))
        # The path's running errors equal the prefix refits up to rounding (tested), and cost
        # nothing; refitting every prefix would dominate the time of a whole network's curves.
        errors = np.maximum(errors, 0.0)
        bounds = np.full(counts.size, prob.full_objective)
        statuses = tuple(OPTIMAL if k in (0, C) else FEASIBLE for k in counts)
        bounds[counts == 0] = prob.yy
        bounds[counts == C] = prob.full_objective
    else:
        selections = [select(prob, int(k), solver=name, time_limit=time_limit, **options) for k in counts]
        for i, sel in enumerate(selections):
            masks[i] = sel.mask
        errors = np.array([s.objective for s in selections])
        bounds = np.array([s.bound for s in selections])
        statuses = tuple(s.status for s in selections)
    return ErrorCurve(
        keep_counts=counts,
        errors=errors,
        bounds=bounds,
        statuses=statuses,
        masks=masks,
        solver=name,
        scale=prob.yy,
        solve_time=time.perf_counter() - start,
    )


def join_curves(parts: Sequence[ErrorCurve]) -> ErrorCurve:
    """One curve from curves of the same layer and solver at disjoint keep counts (e.g. solved in
    parallel, one count each); ``solve_time`` is the sum of the parts'."""
    if not parts:
        raise ValueError("`parts` must hold at least one ErrorCurve.")
    if len({(p.solver, p.scale, p.masks.shape[1]) for p in parts}) != 1:
        raise ValueError("`parts` must come from the same layer and solver.")
    counts = np.concatenate([p.keep_counts for p in parts])
    if np.unique(counts).size != counts.size:
        raise ValueError(f"`parts` repeat keep counts: {sorted(counts.tolist())}.")
    order = np.argsort(counts, kind="stable")
    statuses = [s for p in parts for s in p.statuses]
    return ErrorCurve(
        keep_counts=counts[order],
        errors=np.concatenate([p.errors for p in parts])[order],
        bounds=np.concatenate([p.bounds for p in parts])[order],
        statuses=tuple(statuses[i] for i in order),
        masks=np.concatenate([p.masks for p in parts])[order],
        solver=parts[0].solver,
        scale=parts[0].scale,
        solve_time=float(sum(p.solve_time for p in parts)),
    )
