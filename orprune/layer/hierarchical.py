"""Coarse-to-fine selection: keep ``k`` channels (groups), then ``K`` single weights inside them.

The hierarchical indicator model (entry indicators below their group's indicator, budgets on both):

.. math::

    \\min_{z, e, W}\\ \\sum_j \\|y_j - X w_j\\|^2 + r\\|w_j\\|^2 \\quad\\text{s.t.}\\quad
    W_{ij} = 0 \\text{ if } e_{ij} = 0,\\quad e_{ij} \\le z_{c(i)},\\quad \\sum_c z_c = k,\\quad
    \\sum_{ij} e_{ij} \\le K.

For fixed groups the output columns couple only through the entry budget: each column has a curve
``g_j(s)`` (its best gain with ``s`` kept weights among the kept groups' features), and the budget is split by
a multiple-choice knapsack solved exactly by dynamic programming. ``"exact"`` enumerates the group sets and
the subsets behind each curve (tiny layers); ``"greedy"`` picks the groups with the greedy channel selection
and builds each curve by forward selection. See ``formulations/hierarchical_selection.md``.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from orprune._status import FEASIBLE, OPTIMAL
from orprune._validation import check_integer
from orprune.layer.nm import _solve, nm_refit
from orprune.layer.problem import LayerProblem
from orprune.layer.result import SolverResult, relative_gap
from orprune.layer.selection import select
from orprune.layer.solvers.greedy import greedy_path

__all__ = ["HierarchicalSelection", "select_hierarchical"]


@dataclass(frozen=True)
class HierarchicalSelection(SolverResult):
    """Kept groups, kept single weights inside them, the refit weights and the certificate.

    Attributes
    ----------
    groups : ndarray of bool, shape (C,)
        Kept channels (groups of ``g`` feature rows).
    mask : ndarray of bool, shape (C*g, outputs)
        Kept weights; only rows of kept groups can be True.
    weights : ndarray, shape (C*g, outputs)
        Least-squares weights of each output column over its kept rows.
    objective : float
        Summed reconstruction error.
    bound : float
        Proven lower bound (the optimum for ``"exact"``, the error with everything kept for ``"greedy"``).
    gap, status, solver, solve_time, message, info
        As in :class:`orprune.layer.result.Selection`.
    """

    groups: np.ndarray
    mask: np.ndarray
    weights: np.ndarray
    objective: float
    bound: float
    gap: float
    status: str
    solver: str
    solve_time: float
    message: str = ""
    info: Mapping[str, Any] = field(default_factory=dict)


def allocate_entries(curves: list[np.ndarray], budget: int) -> tuple[float, list[int]]:
    """Maximise ``sum_j curves[j][s_j]`` subject to ``sum_j s_j <= budget`` (multiple-choice knapsack, exact DP).

    ``curves[j][s]`` is column j's gain with ``s`` kept entries (``curves[j][0] = 0``).
    """
    best = np.zeros(budget + 1)  # best[t]: max gain of the columns so far with at most t entries
    choices = []
    for curve in curves:
        new, arg = np.full(budget + 1, -np.inf), np.zeros(budget + 1, int)
        for s in range(min(len(curve) - 1, budget) + 1):
            candidate = np.full(budget + 1, -np.inf)
            candidate[s:] = best[: budget + 1 - s] + curve[s]
            better = candidate > new
            new[better], arg[better] = candidate[better], s
        best = new
        choices.append(arg)
    sizes, t = [], budget
    for arg in reversed(choices):
        sizes.append(int(arg[t]))
        t -= sizes[-1]
    return float(best[budget]), sizes[::-1]


def _exact_curves(prob: LayerProblem, features: np.ndarray, h: np.ndarray) -> tuple[list[np.ndarray], list[list]]:
    """Per column, the best gain and subset for every size, by enumerating every subset of ``features``."""
    q = prob.n_outputs
    curves = [np.zeros(features.size + 1) for _ in range(q)]
    subsets = [[np.zeros(0, int)] + [None] * features.size for _ in range(q)]
    for size in range(1, features.size + 1):
        for subset in itertools.combinations(features, size):
            cols = np.array(subset)
            b = prob.cross[cols]
            gains = np.sum(b * _solve(h[np.ix_(cols, cols)], b), axis=0)
            for j in np.flatnonzero(gains > np.array([c[size] for c in curves])):
                curves[j][size], subsets[j][size] = gains[j], cols
        for j in range(q):  # the curve is nondecreasing: a smaller set padded with a zero weight is feasible
            if subsets[j][size] is None:
                subsets[j][size] = subsets[j][size - 1]
    return curves, subsets


def _greedy_curves(prob: LayerProblem, features: np.ndarray, h: np.ndarray) -> tuple[list[np.ndarray], list[list]]:
    curves, subsets = [], []
    sub_h = h[np.ix_(features, features)]
    for j in range(prob.n_outputs):
        column = LayerProblem._trusted(sub_h.copy(), prob.cross[features, j:j + 1].copy(), prob.yy, group_size=1)
        order, errors = greedy_path(column, features.size)
        curves.append(np.maximum.accumulate(prob.yy - errors))
        subsets.append([features[order[:s]] for s in range(features.size + 1)])
    return curves, subsets


def select_hierarchical(
    prob: LayerProblem,
    n_groups: int,
    n_entries: int,
    *,
    solver: str = "greedy",
    max_evaluations: int = 200_000,
) -> HierarchicalSelection:
    """Keep ``n_groups`` channels and at most ``n_entries`` single weights inside them, minimising the refit error.

    Parameters
    ----------
    prob : LayerProblem
        Any group size ``g``; an entry is one (feature row, output) weight.
    n_groups : int
        Channels kept, ``0 <= n_groups <= C``.
    n_entries : int
        Weights kept at most, ``0 <= n_entries <= n_groups * g * outputs``.
    solver : {"greedy", "exact"}, default "greedy"
        ``"exact"``: every group set, every subset of its features per column, the budget split exactly;
        ``"greedy"``: groups from ``select(prob, n_groups, solver="greedy")``, per-column forward selection
        curves, the budget split exactly over those curves.
    max_evaluations : int, default 200000
        ``"exact"`` refuses problems needing more least-squares solves (group sets times feature subsets).

    Returns
    -------
    HierarchicalSelection
    """
    start = time.perf_counter()
    if not isinstance(prob, LayerProblem):
        raise ValueError(f"`prob` must be a LayerProblem, got {type(prob).__name__}.")
    C, g, q = prob.n_channels, prob.group_size, prob.n_outputs
    n_groups = check_integer(n_groups, "n_groups", 0, C)
    n_entries = check_integer(n_entries, "n_entries", 0, n_groups * g * q)
    if solver not in ("greedy", "exact"):
        raise ValueError(f"`solver` must be 'greedy' or 'exact', got {solver!r}.")
    max_evaluations = check_integer(max_evaluations, "max_evaluations", 1, 10**12)
    h = prob.gram + prob.ridge * np.eye(prob.n_features)
    if solver == "exact":
        evaluations = math.comb(C, n_groups) * (2 ** (n_groups * g) - 1)
        if evaluations > max_evaluations:
            raise ValueError(f"the exact search needs {evaluations} least-squares solves, more than "
                             f"`max_evaluations` = {max_evaluations}; use solver='greedy' or raise it.")
        group_sets = [np.array(c, int) for c in itertools.combinations(range(C), n_groups)]
        build = _exact_curves
    else:
        kept = select(prob, n_groups, solver="greedy").kept if 0 < n_groups < C else np.arange(n_groups)
        group_sets, build = [np.asarray(kept, int)], _greedy_curves
    best_gain, best = -math.inf, None
    for groups in group_sets:
        features = (groups[:, None] * g + np.arange(g)).ravel()
        curves, subsets = build(prob, features, h)
        gain, sizes = allocate_entries(curves, n_entries)
        if gain > best_gain:
            best_gain, best = gain, (groups, [subsets[j][s] for j, s in enumerate(sizes)])
    groups, kept_rows = best
    group_mask = np.zeros(C, bool)
    group_mask[groups] = True
    mask = np.zeros((prob.n_features, q), bool)
    for j, rows in enumerate(kept_rows):
        mask[rows, j] = True
    weights, objective = nm_refit(prob, mask)
    if solver == "exact":
        bound, status = objective, OPTIMAL
        message = f"enumerated {len(group_sets)} group sets and every feature subset; budget split by DP"
    else:
        bound, status = min(prob.full_objective, objective), FEASIBLE
        message = "greedy groups, forward-selection curves per column, budget split by DP"
    info = {"group_sets": len(group_sets), "entries": int(mask.sum())}
    return HierarchicalSelection(group_mask, mask, weights, objective, bound, relative_gap(objective, bound, prob.yy),
                                 status, solver, time.perf_counter() - start, message, info)
